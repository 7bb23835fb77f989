"""The ``text`` dataset format: raw text, every token trained (continued pre-training).

``{"text": "..."}`` rows are trained as they stand, with no chat template: the step Unsloth
recommends before SFT on a new domain. Each row ends with the tokenizer's end-of-sequence
token, trained too. Mix it with chat data through ``data.datasets``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.formats import require_text
from sft.core.interfaces import DatasetFormat, Segment

__all__ = ["TextFormat", "TextOptions", "register_dataset_formats"]


@dataclass
class TextOptions:
    field: str = opt("text", "The column that holds the text.")


class TextFormat(DatasetFormat):
    name = "text"
    version = "1"
    description = "Raw text (continued pre-training): every token of the text column trained, no chat template"
    columns = ("text",)
    options = TextOptions
    sample_rows = (
        {"text": "The forge heats the iron until it glows; the smith then shapes it on the anvil."},
        {"text": "A LoRA adapter adds small trainable matrices beside the frozen weights of a model."},
    )

    def detect(self, columns, options: Any = None) -> bool:
        return (options or TextOptions()).field in columns and len(list(columns)) == 1

    def read_columns(self, options: Any = None) -> tuple[str, ...]:
        return ((options or TextOptions()).field,)

    def to_segments(self, row: Mapping[str, Any], options: Any = None) -> list[Segment]:
        return [Segment(require_text(row, (options or TextOptions()).field), True)]


@hookimpl
def register_dataset_formats(register):
    register(TextFormat())
