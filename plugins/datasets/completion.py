"""The ``completion`` dataset format: ``{"prompt": ..., "completion": ...}`` as raw text.

The prompt and the completion are joined as they stand (with ``separator`` between them),
with no chat template, and the row ends with the tokenizer's end-of-sequence token. Only the
completion and that token are trained; ``data.train_on=all`` trains the prompt too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.formats import require_text
from sft.core.interfaces import DatasetFormat, Segment

__all__ = ["CompletionFormat", "CompletionOptions", "register_dataset_formats"]


@dataclass
class CompletionOptions:
    separator: str = opt("", "Text put between the prompt and the completion (not trained).")


class CompletionFormat(DatasetFormat):
    name = "completion"
    version = "1"
    description = "Prompt/completion pairs as raw text: the completion trained (data.train_on=all: everything), no chat template"
    columns = ("prompt", "completion")
    options = CompletionOptions
    sample_rows = (
        {"prompt": "The capital of France is", "completion": " Paris.\nIt lies on the Seine."},
        {"prompt": "Q: What is 2 + 2?\nA:", "completion": " 4"},
    )

    def read_columns(self, options: Any = None) -> tuple[str, ...]:
        return self.columns

    def to_segments(self, row: Mapping[str, Any], options: Any = None) -> list[Segment]:
        separator = (options or CompletionOptions()).separator
        prompt = require_text(row, "prompt") + separator
        return [Segment(prompt, False), Segment(require_text(row, "completion"), True)]


@hookimpl
def register_dataset_formats(register):
    register(CompletionFormat())
