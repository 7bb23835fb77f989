"""The ``dolly`` dataset format: Databricks Dolly-style ``instruction``/``context``/``response`` rows.

A row such as::

    {"instruction": "Summarize this.", "context": "A long text ...", "response": "A summary.",
     "category": "summarization"}

becomes a user turn (the instruction, plus the context when there is one) and an assistant
turn (the response). ``category`` and any other columns are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from sft.core import DataError, DatasetFormat, Message, hookimpl
from sft.core.config import opt
from sft.core.formats import require_text

__all__ = ["DollyFormat", "DollyOptions", "register_dataset_formats"]


@dataclass
class DollyOptions:
    context_position: str = opt(
        "after",
        "Where a non-empty context goes in the user turn: after or before the instruction, "
        "or system (as a system turn).",
        ["after", "before", "system"],
    )
    context_header: str = opt("Context:", "A line put above the context in the user turn (empty for none).")
    system_prompt: Optional[str] = opt(None, "A system turn added to every conversation (the context follows it when context_position=system).")


def _context(row: Mapping[str, Any]) -> str:
    """The optional context: absent, null or blank means none; anything but text is an error."""
    value = row.get("context")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected text or null, got {type(value).__name__}", field="context")
    return value.strip()


class DollyFormat(DatasetFormat):
    """Instruction-following rows with an optional context passage (databricks-dolly-15k)."""

    name = "dolly"
    version = "1"
    description = "Dolly-style rows: instruction, optional context, response (databricks-dolly-15k)."
    options = DollyOptions
    columns = ("instruction", "context", "response")
    #: Valid raw rows, for docs and for sft's matrix tests (every format x template x exporter).
    sample_rows = (
        {"instruction": "Who are you?", "context": "", "response": "I'm Forge.", "category": "open_qa"},
        {"instruction": "Summarize the text.", "context": "Forge is a small assistant\nmade by sft-forge.",
         "response": "A small assistant.", "category": "summarization"},
    )

    def to_conversation(self, row: Mapping[str, Any], options: DollyOptions | None = None) -> list[Message]:
        options = options or DollyOptions()
        instruction = require_text(row, "instruction").strip()
        context = _context(row)
        response = require_text(row, "response").strip()
        messages: list[Message] = []
        user = instruction
        in_system = bool(context) and options.context_position == "system"
        system = "\n\n".join(t for t in (options.system_prompt, context if in_system else "") if t)
        if system:
            messages.append(Message("system", system))
        if context and not in_system:
            block = f"{options.context_header}\n{context}" if options.context_header else context
            user = f"{block}\n\n{instruction}" if options.context_position == "before" else f"{instruction}\n\n{block}"
        messages.append(Message("user", user))
        messages.append(Message("assistant", response))
        return messages


@hookimpl
def register_dataset_formats(register) -> None:
    register(DollyFormat())
