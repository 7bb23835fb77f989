"""The ``llama3`` chat template: Llama 3 / 3.1 header tokens, ``<|eot_id|>`` ends a turn.

``<|begin_of_text|>`` is part of the rendered text (texts are tokenized without special
tokens). On a tokenizer that lacks these tokens, ``template.on_missing_eot`` decides whether
``<|eot_id|>`` is added; the header tokens then tokenize as ordinary text, which trains fine.
"""

from __future__ import annotations

from sft.core import hookimpl
from sft.core.templating import Turn, TurnTemplate

__all__ = ["Llama3", "register_chat_templates"]


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


class Llama3(TurnTemplate):
    name = "llama3"
    version = "2"
    description = "Llama 3: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>"

    bos = "<|begin_of_text|>"
    system = Turn(_header("system"), "<|eot_id|>")
    user = Turn(_header("user"), "<|eot_id|>")
    assistant = Turn(_header("assistant"))
    eot = "<|eot_id|>"
    extra_stops = ("<|end_of_text|>",)
    trim = True  # Llama 3's template writes message['content'] | trim


@hookimpl
def register_chat_templates(register):
    register(Llama3())
