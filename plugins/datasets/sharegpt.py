"""The ``sharegpt`` dataset format: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``.

Roles ``human``/``user``, ``gpt``/``assistant`` and ``system`` are recognised. Other datasets
in the same shape with different keys or role names are read by overriding the mapping in
the config, e.g. ``data.sharegpt.role_key: role`` and ``data.sharegpt.content_key: text``.

Tool use in the glaive / LLaMA-Factory spelling is read through the same mapping: a
``function_call`` turn's value is the JSON call ``{"name", "arguments"}`` (or a list of them,
for parallel calls) and becomes an assistant turn's tool calls (merged into the assistant turn
right before it, when there is one); an ``observation`` turn is the tool's result; the row's
``tools`` column (a list, or its JSON text) declares the functions. A ``system`` column (LLaMA-Factory's)
is the system prompt. Rows with ``images`` (vision data) are refused.
"""

from __future__ import annotations

import json

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, List

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import DataError, did_you_mean
from sft.core.formats import MEDIA_COLUMNS, parse_tool_call, parse_tools, refuse_media, require_list, require_text
from sft.core.interfaces import Conversation, DatasetFormat, Message

__all__ = ["ShareGPT", "ShareGPTOptions", "register_dataset_formats"]


@dataclass
class ShareGPTOptions:
    conversations_key: str = opt("conversations", "Column holding the list of turns.")
    role_key: str = opt("from", "Key of a turn's speaker.")
    content_key: str = opt("value", "Key of a turn's text.")
    user: List[str] = opt(["human", "user"], "Speaker names that mean the user.")
    assistant: List[str] = opt(["gpt", "assistant"], "Speaker names that mean the assistant.")
    system: List[str] = opt(["system"], "Speaker names that mean the system prompt.")
    function_call: List[str] = opt(["function_call"], "Speaker names whose value is a JSON tool call (or a list of them) by the assistant.")
    observation: List[str] = opt(["observation", "tool"], "Speaker names that mean a tool's result.")
    tools_key: str = opt("tools", "Column holding the row's tool specs (a list, or its JSON text); optional.")
    system_key: str = opt("system", "Column holding the row's system prompt (LLaMA-Factory's `system`); optional.")


class ShareGPT(DatasetFormat):
    name = "sharegpt"
    version = "3"
    description = "ShareGPT: conversations of {from: human|gpt|system|function_call|observation, value}, tools"
    options = ShareGPTOptions

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        return (options or ShareGPTOptions()).conversations_key in columns

    def read_columns(self, options: Any = None) -> Collection[str]:
        o = options or ShareGPTOptions()
        return (o.conversations_key, o.tools_key, o.system_key)

    def unread(self, row: Mapping[str, Any], options: Any = None) -> list[str]:
        o = options or ShareGPTOptions()
        turns = row.get(o.conversations_key) if isinstance(row.get(o.conversations_key), list) else []
        read = {o.role_key, o.content_key}
        # A turn holding just the keys read (nearly every turn) has nothing to look through.
        nested = {k for t in turns if isinstance(t, (dict, Mapping)) and t.keys() != read
                  for k, v in t.items() if k not in read and v is not None}
        return [*super().unread(row, options), *(f"{o.conversations_key}[].{k}" for k in sorted(nested))]

    def plain_turns(self, row: Mapping[str, Any], options: Any = None) -> list[tuple[str, str]] | None:
        o: ShareGPTOptions = options or ShareGPTOptions()
        turns = row.get(o.conversations_key)
        if type(turns) is not list or not turns or row.get(o.tools_key) is not None or any(map(row.get, MEDIA_COLUMNS)):
            return None
        roles = _roles(o)
        role_key, content_key = o.role_key, o.content_key
        out = []
        for turn in turns:
            if type(turn) is not dict:
                return None
            # A known speaker (not a call) and non-empty text: the turns to_conversation appends as they are.
            speaker, value = turn.get(role_key), turn.get(content_key)
            role = roles.get(speaker) if type(speaker) is str else None
            if role is None or role == "call" or type(value) is not str or not value.strip() or not speaker.strip():
                return None
            out.append((role, value))
        system = row.get(o.system_key)
        if system is None or system == "":
            return out
        return [("system", system), *out] if type(system) is str and system.strip() and out[0][0] != "system" else None

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        plain = self.plain_turns(row, options)
        if plain is not None:  # nearly every row
            return [Message(role, text) for role, text in plain]
        o: ShareGPTOptions = options or ShareGPTOptions()
        refuse_media(row)
        roles = _roles(o)
        turns = require_list(row, o.conversations_key)
        messages: list[Message] = []
        for i, turn in enumerate(turns):
            where = f"{o.conversations_key}[{i}]"
            if not isinstance(turn, (dict, Mapping)):  # dict first: a plain type check, before the ABC's
                raise DataError(f"expected an object with '{o.role_key}' and '{o.content_key}', got {turn!r:.60}", field=where)
            speaker = require_text(turn, o.role_key, where)
            if speaker not in roles:
                raise DataError(
                    f"unknown speaker '{speaker}'{did_you_mean(speaker, roles)}; expected one of {', '.join(roles)} "
                    f"(map more names with data.sharegpt.user/assistant/system/function_call/observation)",
                    field=f"{where}.{o.role_key}")
            value = require_text(turn, o.content_key, where)
            if roles[speaker] != "call":
                messages.append(Message(roles[speaker], value))
                continue
            calls = tuple(parse_tool_call(c, f"{where}.{o.content_key}") for c in _calls(value, f"{where}.{o.content_key}"))
            previous = messages[-1] if messages else None
            if previous is not None and previous.role == "assistant" and not previous.tool_calls:
                messages[-1] = Message("assistant", previous.content, tool_calls=calls)  # text, then the calls
            else:
                messages.append(Message("assistant", "", tool_calls=calls))
        system = row.get(o.system_key)
        if isinstance(system, str) and system.strip():
            if messages and messages[0].role == "system":
                raise DataError(f"the row has both a '{o.system_key}' column and a system turn; keep one",
                                field=o.system_key)
            messages.insert(0, Message("system", system))
        elif system is not None and not isinstance(system, str):
            raise DataError(f"expected text, got {type(system).__name__}", field=o.system_key)
        tools = parse_tools(row.get(o.tools_key), o.tools_key)
        return Conversation(messages, tools) if tools else messages


def _roles(o: ShareGPTOptions) -> dict[str, str]:
    """Speaker name -> role (``call`` for a function_call turn); a later list wins a name listed twice."""
    key = tuple(map(tuple, (o.user, o.assistant, o.system, o.function_call, o.observation)))
    if key not in _ROLES:  # the same few option sets for every row: built once each
        names = zip(key, ("user", "assistant", "system", "call", "tool"))
        _ROLES[key] = {name: role for speakers, role in names for name in speakers}
    return _ROLES[key]


_ROLES: dict[tuple, dict[str, str]] = {}


def _calls(value: str, field: str) -> list[Any]:
    """The JSON call(s) of a ``function_call`` turn: one object or a list of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"a function_call turn must hold a JSON tool call: {exc.msg} (column {exc.colno})",
                        field=field) from None
    return parsed if isinstance(parsed, list) else [parsed]


@hookimpl
def register_dataset_formats(register):
    register(ShareGPT())
