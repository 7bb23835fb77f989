"""Helpers for dataset-format plugins, and the conversation checks every format shares.

Format plugins read their fields with :func:`require_text` / :func:`require_list`, which raise
a :class:`DataError` naming the field; the data pipeline adds the file, line and row.
:func:`validate_conversation` is run by the core on every normalized conversation, whatever
format produced it, so a plugin never has to re-implement role or emptiness checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DataError
from .interfaces import ROLES, Message

__all__ = ["require_text", "require_list", "validate_conversation"]


def _present(row: Mapping[str, Any], key: str, prefix: str) -> tuple[str, Any]:
    """The dotted field name and ``row[key]``; a :class:`DataError` when it is missing or null."""
    field = f"{prefix}.{key}" if prefix else key
    if key not in row:
        present = ", ".join(map(str, row.keys())) or "none"
        raise DataError(f"missing field (present: {present})", field=field)
    if row[key] is None:
        raise DataError("null value", field=field)
    return field, row[key]


def require_text(row: Mapping[str, Any], key: str, prefix: str = "") -> str:
    """``row[key]`` as non-empty text, or a :class:`DataError` naming ``prefix.key``."""
    field, value = _present(row, key, prefix)
    if not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", field=field)
    if not value.strip():
        raise DataError("empty text", field=field)
    return value


def require_list(row: Mapping[str, Any], key: str, prefix: str = "") -> list:
    """``row[key]`` as a non-empty list, or a :class:`DataError` naming the field."""
    field, value = _present(row, key, prefix)
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list, got {type(value).__name__}", field=field)
    if not value:
        raise DataError("empty list", field=field)
    return list(value)


def _a(word: str) -> str:
    return f"an {word}" if word == "assistant" else f"a {word}"


def validate_conversation(messages: Sequence[Message]) -> None:
    """Check a normalized conversation; raise :class:`DataError` naming the turn at fault.

    Rules: roles are system/user/assistant; a system turn may only come first; after it,
    turns alternate user, assistant, user, ... starting with user and ending with assistant
    (a trailing question would be rendered but never answered); no content is empty.
    """
    if not messages:
        raise DataError("empty conversation")
    expected = "user"
    for i, message in enumerate(messages):
        where = f"turn {i}"
        if not isinstance(message, Message):
            raise DataError(f"{where}: the format returned {type(message).__name__}, not a Message")
        if message.role not in ROLES:
            raise DataError(f"{where}: unknown role '{message.role}'")
        if not isinstance(message.content, str) or not message.content.strip():
            raise DataError(f"{where} ({message.role}): empty content")
        if message.role == "system":
            if i != 0:
                raise DataError(f"{where}: a system turn may only come first")
            continue
        if message.role != expected:
            previous = f"{_a(messages[i - 1].role)} turn" if i else "the start"
            raise DataError(f"{where}: roles must alternate user/assistant: {_a(message.role)} turn follows "
                            f"{previous} (expected {expected})")
        expected = "assistant" if expected == "user" else "user"
    if not any(m.role == "assistant" for m in messages):
        raise DataError("no assistant turn")
    if messages[-1].role != "assistant":
        raise DataError(f"turn {len(messages) - 1}: the conversation ends with an unanswered user turn")
