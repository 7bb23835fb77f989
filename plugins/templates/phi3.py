"""The ``phi3`` chat template: Phi-3 / Phi-3.5 ``<|user|>`` ... ``<|end|>`` turns.

The end-of-turn token is ``<|end|>``; ``<|endoftext|>`` also stops generation. As Phi-3's and
Phi-3.5's own template, a whole conversation ends with ``<|endoftext|>`` (untrained).
"""

from __future__ import annotations

from sft.core import hookimpl
from sft.core.templating import Turn, TurnTemplate

__all__ = ["Phi3", "register_chat_templates"]


class Phi3(TurnTemplate):
    name = "phi3"
    version = "2"
    description = "Phi-3: <|user|> ... <|end|> <|assistant|> ... <|end|>"

    system = Turn("<|system|>\n", "<|end|>\n")
    user = Turn("<|user|>\n", "<|end|>\n")
    assistant = Turn("<|assistant|>\n", "\n")
    eot = "<|end|>"
    extra_stops = ("<|endoftext|>",)
    final = "<|endoftext|>"


@hookimpl
def register_chat_templates(register):
    register(Phi3())
