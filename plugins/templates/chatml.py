"""The ``chatml`` chat template: ``<|im_start|>role\\n...<|im_end|>\\n`` (OpenAI ChatML, Qwen, SmolLM2).

The end-of-turn token is ``<|im_end|>``; the newline after it is not trained.
"""

from __future__ import annotations

from sft.core import hookimpl
from sft.core.templating import Turn, TurnTemplate

__all__ = ["ChatML", "register_chat_templates"]


class ChatML(TurnTemplate):
    name = "chatml"
    version = "1"
    description = "ChatML: <|im_start|>role ... <|im_end|> (Qwen, SmolLM2, OpenAI)"

    system = Turn("<|im_start|>system\n", "<|im_end|>\n")
    user = Turn("<|im_start|>user\n", "<|im_end|>\n")
    assistant = Turn("<|im_start|>assistant\n", "\n")
    eot = "<|im_end|>"


@hookimpl
def register_chat_templates(register):
    register(ChatML())
