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
    system_prompt: Optional[str] = opt(None, "A system turn added to every conversation (ignored when context_position=system puts the context there).")


def _text(row: Mapping[str, Any], key: str, required: bool) -> str:
    """The stripped string in ``row[key]``; "" for an absent optional field.

    Raises a :class:`DataError` naming the field when a required one is absent, null, empty or
    not a string, so the core can report file:line and the row.
    """
    if key not in row or row[key] is None:
        if required:
            missing = "missing" if key not in row else "null"
            raise DataError(f"{missing} field; a dolly row needs instruction and response (context is optional)", field=key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} {value!r:.60}", field=key)
    if required and not value.strip():
        raise DataError("empty text", field=key)
    return value.strip()


class DollyFormat(DatasetFormat):
    """Instruction-following rows with an optional context passage (databricks-dolly-15k)."""

    name = "dolly"
    version = "1"
    description = "Dolly-style rows: instruction, optional context, response (databricks-dolly-15k)."
    options = DollyOptions
    columns = ("instruction", "context", "response")

    def to_conversation(self, row: Mapping[str, Any], options: DollyOptions | None = None) -> list[Message]:
        options = options or DollyOptions()
        instruction = _text(row, "instruction", required=True)
        context = _text(row, "context", required=False)
        response = _text(row, "response", required=True)
        messages: list[Message] = []
        user = instruction
        if context and options.context_position == "system":
            messages.append(Message("system", context))
        elif options.system_prompt:
            messages.append(Message("system", options.system_prompt))
        if context and options.context_position != "system":
            block = f"{options.context_header}\n{context}" if options.context_header else context
            user = f"{block}\n\n{instruction}" if options.context_position == "before" else f"{instruction}\n\n{block}"
        messages.append(Message("user", user))
        messages.append(Message("assistant", response))
        return messages


@hookimpl
def register_dataset_formats(register) -> None:
    register(DollyFormat())
