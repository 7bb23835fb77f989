"""The ``messages`` dataset format: OpenAI-style ``{"messages": [{"role": "user", "content": "..."}, ...]}``."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import DataError, did_you_mean
from sft.core.formats import require_list, require_text
from sft.core.interfaces import ROLES, DatasetFormat, Message

__all__ = ["Messages", "MessagesOptions", "register_dataset_formats"]


@dataclass
class MessagesOptions:
    messages_key: str = opt("messages", "Column holding the list of {role, content} messages.")


class Messages(DatasetFormat):
    name = "messages"
    version = "1"
    description = "OpenAI messages: [{role: system|user|assistant, content}]"
    options = MessagesOptions

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        return (options or MessagesOptions()).messages_key in columns

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        key = (options or MessagesOptions()).messages_key
        messages = []
        for i, item in enumerate(require_list(row, key)):
            where = f"{key}[{i}]"
            if not isinstance(item, Mapping):
                raise DataError(f"expected an object with 'role' and 'content', got {item!r:.60}", field=where)
            role = require_text(item, "role", where)
            if role not in ROLES:
                raise DataError(f"unknown role '{role}'{did_you_mean(role, ROLES)}; expected one of {', '.join(ROLES)}",
                                field=f"{where}.role")
            messages.append(Message(role, require_text(item, "content", where)))
        return messages


@hookimpl
def register_dataset_formats(register):
    register(Messages())
