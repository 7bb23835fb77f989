"""The ``messages`` dataset format: OpenAI-style ``{"messages": [{"role": "user", "content": "..."}, ...]}``.

The OpenAI tool schema is read as OpenAI and vLLM write it: a row-level ``tools`` list of
function specs; assistant turns with ``tool_calls`` (``{id, type: function, function: {name,
arguments}}``, arguments as JSON text or an object; ``content`` may then be null or hold text
said before the calls); ``tool`` turns with ``tool_call_id``/``name``; and the assistant's
thinking in ``reasoning_content`` (``reasoning`` is read too). A content may be a list of OpenAI
parts (``[{"type": "text", "text": ...}]``; LLaMA-Factory's v1 files also ``reasoning`` and
``tool_call`` parts, under ``value``), read as the turn's text, reasoning and calls; image or
audio parts, and rows with ``images``, are refused (sft fine-tunes text-only models).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import DataError, did_you_mean
from sft.core.formats import MEDIA_COLUMNS, content_parts, parse_tool_call, parse_tools, refuse_media, require_list, require_text
from sft.core.interfaces import ROLES, Conversation, DatasetFormat, Message

__all__ = ["Messages", "MessagesOptions", "register_dataset_formats"]

#: Keys of an assistant turn that hold its reasoning, in order of preference.
_REASONING_KEYS = ("reasoning_content", "reasoning")
#: The keys of a message this format reads (others, such as LLaMA-Factory's loss_weight, are counted).
_READ = {"role", "content", "tool_calls", "tool_call_id", "name", *_REASONING_KEYS}
#: The roles a turn of plain text may have (a tool result answers a call: not plain).
_PLAIN_ROLES = ("system", "user", "assistant")


@dataclass
class MessagesOptions:
    messages_key: str = opt("messages", "Column holding the list of {role, content} messages.")
    tools_key: str = opt("tools", "Column holding the row's tool specs (a list, or its JSON text); optional.")


class Messages(DatasetFormat):
    name = "messages"
    version = "4"
    description = "OpenAI messages: [{role: system|user|assistant|tool, content, tool_calls, reasoning_content}], tools"
    options = MessagesOptions

    def detect(self, columns: Collection[str], options: Any = None) -> bool:
        return (options or MessagesOptions()).messages_key in columns

    def read_columns(self, options: Any = None) -> Collection[str]:
        o = options or MessagesOptions()
        return (o.messages_key, o.tools_key)

    def unread(self, row: Mapping[str, Any], options: Any = None) -> list[str]:
        key = (options or MessagesOptions()).messages_key
        turns = row.get(key) if isinstance(row.get(key), list) else []
        # A tool result's name says which call it answers; a user's or assistant's name no template renders.
        nested = {k for m in turns if isinstance(m, Mapping) for k, v in m.items() if v not in (None, "") and
                  (k not in _READ or (k == "name" and m.get("role") != "tool"))}
        return [*super().unread(row, options), *(f"{key}[].{k}" for k in sorted(nested))]

    def plain_turns(self, row: Mapping[str, Any], options: Any = None) -> list[tuple[str, str]] | None:
        o = options or MessagesOptions()
        items = row.get(o.messages_key)
        if type(items) is not list or not items or row.get(o.tools_key) is not None or any(map(row.get, MEDIA_COLUMNS)):
            return None
        out = []
        for item in items:
            if type(item) is not dict:
                return None
            role, content = item.get("role"), item.get("content")
            if role not in _PLAIN_ROLES or type(content) is not str or not content.strip():
                return None
            # Keys beyond role and content (a Hub dataset's columns are all there, None) must add nothing to the turn.
            if len(item) > 2 and (item.get("tool_calls") or any(item.get(k) is not None for k in _REASONING_KEYS)
                                  or item.get("tool_call_id") not in (None, "") or item.get("name") not in (None, "")):
                return None
            out.append((role, content))
        return out

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        plain = self.plain_turns(row, options)
        if plain is not None:  # nearly every row
            return [Message(role, text) for role, text in plain]
        o = options or MessagesOptions()
        refuse_media(row)
        key = o.messages_key
        messages = []
        for i, item in enumerate(require_list(row, key)):
            where = f"{key}[{i}]"
            if not isinstance(item, Mapping):
                raise DataError(f"expected an object with 'role' and 'content', got {item!r:.60}", field=where)
            messages.append(self._message(item, where))
        tools = parse_tools(row.get(o.tools_key), o.tools_key)
        return Conversation(messages, tools) if tools else messages

    def _message(self, item: Mapping[str, Any], where: str) -> Message:
        role = require_text(item, "role", where)
        if role not in ROLES:
            raise DataError(f"unknown role '{role}'{did_you_mean(role, ROLES)}; expected one of {', '.join(ROLES)}",
                            field=f"{where}.role")
        # Content parts may carry the turn's reasoning and calls too (LLaMA-Factory's v1 files).
        content, part_reasoning, part_calls = content_parts(item.get("content"), f"{where}.content")
        calls = tuple(parse_tool_call(c, f"{where}.tool_calls[{j}]")
                      for j, c in enumerate(item.get("tool_calls") or ()))
        calls += tuple(parse_tool_call(c, f"{where}.content") for c in part_calls)
        reasoning = next((item[k] for k in _REASONING_KEYS if item.get(k) is not None), part_reasoning)
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"expected text, got {type(reasoning).__name__}", field=f"{where}.reasoning_content")
        # An assistant turn that only calls tools has null (or no) content, as OpenAI writes it.
        if not calls:
            content = require_text(item if content is None else {"content": content}, "content", where)
        if content is not None and not isinstance(content, str):
            raise DataError(f"expected text, got {type(content).__name__}", field=f"{where}.content")
        return Message(role, content or "", tool_calls=calls,
                       tool_call_id=_optional_text(item, "tool_call_id", where),
                       name=_optional_text(item, "name", where), reasoning=reasoning)


def _optional_text(item: Mapping[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int)):
        raise DataError(f"expected text, got {type(value).__name__}", field=f"{where}.{key}")
    return str(value)


@hookimpl
def register_dataset_formats(register):
    register(Messages())
