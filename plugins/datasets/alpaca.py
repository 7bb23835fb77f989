"""The ``alpaca`` dataset format: ``{"instruction": ..., "input": ..., "output": ...}``.

One row becomes one user turn and one assistant turn. A non-empty ``input`` is appended to
the instruction after a blank line (the way the Alpaca prompt shows it); ``input`` may be
missing, null or empty. An optional ``system`` column becomes the system prompt, and an
optional ``history`` column (LLaMA-Factory's and ms-swift's: ``[[question, answer], ...]``)
the exchanges before it, every answer trained.

The columns are options named as LLaMA-Factory's ``dataset_info.json`` maps them (``prompt``,
``query``, ``response``, ``system``, ``history``), so its mapping copies over:
ms-swift's ``query``/``response`` files read with ``data.alpaca.prompt=query``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import DataError
from sft.core.formats import content_text, refuse_media, require_text
from sft.core.interfaces import DatasetFormat, Message

__all__ = ["AlpacaFormat", "AlpacaOptions", "register_dataset_formats"]


@dataclass
class AlpacaOptions:
    prompt: str = opt("instruction", "Column holding the instruction (the user's turn).")
    query: str = opt("input", "Column holding the optional input, appended to the instruction after a blank line.")
    response: str = opt("output", "Column holding the answer (the assistant's turn).")
    system: str = opt("system", "Column holding the optional system prompt.")
    history: str = opt("history", "Column holding the optional earlier exchanges, [[question, answer], ...]; "
                                  "every answer is trained.")


class AlpacaFormat(DatasetFormat):
    name = "alpaca"
    version = "2"
    description = "Alpaca: instruction, optional input, output; optional system and history (LLaMA-Factory)"
    columns = ("instruction", "output")
    options = AlpacaOptions

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        o = options or AlpacaOptions()
        return o.prompt in columns and o.response in columns

    def read_columns(self, options: Any = None) -> Collection[str]:
        o = options or AlpacaOptions()
        return (o.prompt, o.query, o.response, o.system, o.history)

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        o = options or AlpacaOptions()
        refuse_media(row)
        user = require_text(row, o.prompt)
        extra = content_text(row.get(o.query), o.query)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"expected text, got {type(extra).__name__}", field=o.query)
        if extra and extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [*_history(row.get(o.history), o.history), Message("user", user),
                    Message("assistant", require_text(row, o.response))]
        system = row.get(o.system)
        if isinstance(system, str) and system.strip():
            messages.insert(0, Message("system", system))
        return messages


def _history(value: Any, field: str) -> list[Message]:
    """``[[question, answer], ...]`` as user and assistant turns; none when absent or empty."""
    if value is None or value == []:
        return []
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list of [question, answer] pairs, got {type(value).__name__}", field=field)
    turns = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"expected a [question, answer] pair, got {pair!r:.60}", field=f"{field}[{i}]")
        pair_row = {"0": pair[0], "1": pair[1]}
        turns.append(Message("user", require_text(pair_row, "0", f"{field}[{i}]")))
        turns.append(Message("assistant", require_text(pair_row, "1", f"{field}[{i}]")))
    return turns


@hookimpl
def register_dataset_formats(register):
    register(AlpacaFormat())
