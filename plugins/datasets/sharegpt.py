"""The ``sharegpt`` dataset format: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``.

Roles ``human``/``user``, ``gpt``/``assistant`` and ``system`` are recognised. Other datasets
in the same shape with different keys or role names are read by overriding the mapping in
the config, e.g. ``data.sharegpt.role_key: role`` and ``data.sharegpt.content_key: text``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, List

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import DataError, did_you_mean
from sft.core.formats import require_list, require_text
from sft.core.interfaces import DatasetFormat, Message

__all__ = ["ShareGPT", "ShareGPTOptions", "register_dataset_formats"]


@dataclass
class ShareGPTOptions:
    conversations_key: str = opt("conversations", "Column holding the list of turns.")
    role_key: str = opt("from", "Key of a turn's speaker.")
    content_key: str = opt("value", "Key of a turn's text.")
    user: List[str] = opt(["human", "user"], "Speaker names that mean the user.")
    assistant: List[str] = opt(["gpt", "assistant"], "Speaker names that mean the assistant.")
    system: List[str] = opt(["system"], "Speaker names that mean the system prompt.")


class ShareGPT(DatasetFormat):
    name = "sharegpt"
    version = "1"
    description = "ShareGPT: conversations of {from: human|gpt|system, value}"
    options = ShareGPTOptions

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        return (options or ShareGPTOptions()).conversations_key in columns

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        o: ShareGPTOptions = options or ShareGPTOptions()
        roles = {name: "user" for name in o.user}
        roles.update({name: "assistant" for name in o.assistant})
        roles.update({name: "system" for name in o.system})
        turns = require_list(row, o.conversations_key)
        messages = []
        for i, turn in enumerate(turns):
            where = f"{o.conversations_key}[{i}]"
            if not isinstance(turn, Mapping):
                raise DataError(f"expected an object with '{o.role_key}' and '{o.content_key}', got {turn!r:.60}", field=where)
            speaker = require_text(turn, o.role_key, where)
            if speaker not in roles:
                raise DataError(
                    f"unknown speaker '{speaker}'{did_you_mean(speaker, roles)}; expected one of {', '.join(roles)} "
                    f"(map more names with data.sharegpt.user/assistant/system)", field=f"{where}.{o.role_key}")
            messages.append(Message(roles[speaker], require_text(turn, o.content_key, where)))
        return messages


@hookimpl
def register_dataset_formats(register):
    register(ShareGPT())
