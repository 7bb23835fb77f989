"""The ``alpaca`` dataset format: ``{"instruction": ..., "input": ..., "output": ...}``.

One row becomes one user turn and one assistant turn. A non-empty ``input`` is appended to
the instruction after a blank line (the way the Alpaca prompt shows it); ``input`` may be
missing, null or empty. An optional ``system`` column becomes the system prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sft.core import hookimpl
from sft.core.errors import DataError
from sft.core.formats import require_text
from sft.core.interfaces import DatasetFormat, Message

__all__ = ["AlpacaFormat", "register_dataset_formats"]


class AlpacaFormat(DatasetFormat):
    name = "alpaca"
    version = "1"
    description = "Alpaca: instruction, optional input, output"
    columns = ("instruction", "output")

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        user = require_text(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"expected text, got {type(extra).__name__}", field="input")
        if extra and extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [Message("user", user), Message("assistant", require_text(row, "output"))]
        system = row.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, Message("system", system))
        return messages


@hookimpl
def register_dataset_formats(register):
    register(AlpacaFormat())
