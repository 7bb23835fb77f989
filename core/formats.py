"""Helpers for dataset-format plugins, and the conversation checks every format shares.

Format plugins read their fields with :func:`require_text` / :func:`require_list`, which raise
a :class:`DataError` naming the field; the data pipeline adds the file, line and row.
:func:`validate_conversation` is run by the core on every normalized conversation, whatever
format produced it, so a plugin never has to re-implement role, emptiness or tool-call checks.
:func:`parse_tools` and :func:`parse_tool_call` read the OpenAI tool schema (and its common
variants) for any format that has tool calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .errors import DataError, did_you_mean
from .interfaces import ROLES, Message, ToolCall, tools_of

__all__ = ["split_reasoning", "MEDIA_COLUMNS", "refuse_media", "content_parts", "content_text", "require_text", "require_list",
           "validate_conversation", "parse_tools", "parse_tool_call", "parse_arguments", "present_field", "tool_names"]


def present_field(row: Mapping[str, Any], key: str, prefix: str = "") -> tuple[str, Any]:
    """The dotted field name and ``row[key]``; a :class:`DataError` when it is missing or null."""
    field = f"{prefix}.{key}" if prefix else key
    if key not in row:
        present = ", ".join(map(str, row.keys())) or "none"
        raise DataError(f"missing field (present: {present})", field=field)
    if row[key] is None:
        raise DataError("null value", field=field)
    return field, row[key]


#: Columns that carry images, video or audio (LLaMA-Factory's, ms-swift's and Axolotl's names).
MEDIA_COLUMNS = ("images", "videos", "audios", "image", "video", "audio")


def refuse_media(row: Mapping[str, Any]) -> None:
    """A :class:`DataError` for a row that carries images, video or audio: sft trains text-only models.

    Trained as text, an ``<image>`` marker would teach the model to write it; the row is refused
    instead (``data.on_bad_row=skip`` leaves such rows out, counted).
    """
    for key in MEDIA_COLUMNS:
        if row.get(key):
            raise DataError(f"this row carries {key} (a vision or audio dataset); sft fine-tunes text-only models, so "
                            f"it cannot train it: remove the '{key}' column, or set data.on_bad_row=skip to leave "
                            f"such rows out", field=key)


def content_parts(value: Any, field: str) -> tuple[Any, str | None, list[Any]]:
    """A content as ``(text, reasoning, tool calls)``: OpenAI content parts split by type, anything else as it is.

    Parts are ``{"type": "text", "text": ...}`` (OpenAI) or ``{"type": ..., "value": ...}``
    (LLaMA-Factory's v1 files, whose assistant turns hold ``reasoning`` and ``tool_call`` parts,
    the latter a JSON call). Text parts are joined, reasoning parts too; other parts are refused, as media are.
    """
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, Mapping) for p in value):
        return value, None, []
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[Any] = []
    for i, part in enumerate(value):
        text = part.get("text", part.get("value"))
        kind = part.get("type", "text" if text is not None else None)
        if kind not in (known := ("text", "reasoning", "tool_call")) or not isinstance(text, str):
            raise DataError(f"a {kind} part has no text under 'text' or 'value' (present: {', '.join(map(str, part))})"
                            if kind in known else f"a content part of type {kind!r}{did_you_mean(str(kind), known)}: "
                            f"sft fine-tunes text-only models and reads text, reasoning and tool_call parts", field=f"{field}[{i}]")
        if kind == "tool_call":
            try:
                calls.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise DataError(f"a tool_call part must hold a JSON call: {exc.msg} (column {exc.colno})",
                                field=f"{field}[{i}]") from None
        else:
            (texts if kind == "text" else reasoning).append(text)
    return "".join(texts), ("".join(reasoning) if reasoning else None), calls


def content_text(value: Any, field: str) -> Any:
    """OpenAI content parts as one text (see :func:`content_parts`); other values as they are.

    Only where a turn can hold nothing but text: a reasoning or tool-call part is refused there.
    """
    text, reasoning, calls = content_parts(value, field)
    if reasoning is not None or calls:
        raise DataError("reasoning or tool_call content parts where only text can be", field=field)
    return text


def require_text(row: Mapping[str, Any], key: str, prefix: str = "") -> str:
    """``row[key]`` as non-empty text (OpenAI text content parts joined), or a :class:`DataError` naming ``prefix.key``."""
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return value  # the common case, ahead of the checks that would pass it unchanged (a turn's every field)
    field, value = present_field(row, key, prefix)
    value = content_text(value, field)
    if not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", field=field)
    if not value.strip():
        raise DataError("empty text", field=field)
    return value


def require_list(row: Mapping[str, Any], key: str, prefix: str = "") -> list:
    """``row[key]`` as a non-empty list, or a :class:`DataError` naming the field."""
    field, value = present_field(row, key, prefix)
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list, got {type(value).__name__}", field=field)
    if not value:
        raise DataError("empty list", field=field)
    return list(value)


def parse_arguments(value: Any, field: str) -> dict[str, Any]:
    """Tool-call arguments as a JSON object: a dict as is, a string parsed; else a :class:`DataError`."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"tool-call arguments are not valid JSON: {exc.msg} (column {exc.colno}) in {value!r:.80}",
                            field=field) from None
    if not isinstance(value, Mapping):
        raise DataError(f"tool-call arguments must be a JSON object, got {type(value).__name__}", field=field)
    return dict(value)


def parse_tools(value: Any, field: str = "tools") -> list[dict[str, Any]]:
    """A row's tool list in OpenAI form ``[{"type": "function", "function": {name, description, parameters}}]``.

    Accepts the list or its JSON text (LLaMA-Factory stores it as a string), and bare
    ``{name, description, parameters}`` specs, which are wrapped. None or empty means no tools.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", field=field) from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list of tool specs, got {type(value).__name__}", field=field)
    tools = []
    for i, spec in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(spec, Mapping):
            raise DataError(f"expected a tool spec object, got {spec!r:.60}", field=where)
        if "function" in spec:
            function = spec["function"]
            if not isinstance(function, Mapping):
                raise DataError("expected an object", field=f"{where}.function")
            spec = dict(spec)
        else:
            function, spec = spec, {"type": "function", "function": dict(spec)}
        require_text(function, "name", where + (".function" if "function" in value[i] else ""))
        tools.append(spec)
    return tools


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """The function names of an OpenAI-form tool list."""
    return [str(t["function"]["name"]) for t in tools if isinstance(t.get("function"), Mapping)]


def parse_tool_call(item: Any, field: str) -> ToolCall:
    """One tool call: OpenAI ``{id, type: function, function: {name, arguments}}`` or flat ``{name, arguments}``.

    ``arguments`` may be a JSON string or an object (``parameters`` is accepted for it, as Llama
    3.1 writes calls); either way the result holds the parsed object.
    """
    if not isinstance(item, Mapping):
        raise DataError(f"expected a tool-call object, got {item!r:.60}", field=field)
    function, where = item, field
    if "function" in item:
        function, where = item["function"], f"{field}.function"
        if not isinstance(function, Mapping):
            raise DataError("expected an object with 'name' and 'arguments'", field=where)
    name = require_text(function, "name", where)
    key = "arguments" if "arguments" in function or "parameters" not in function else "parameters"
    arguments = parse_arguments(function.get(key) if function.get(key) is not None else {}, f"{where}.{key}")
    call_id = item.get("id")
    return ToolCall(name, arguments, str(call_id) if call_id not in (None, "") else None)


#: How reasoning is written inline in an assistant's content (DeepSeek-R1, Qwen3, QwQ).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def has_reasoning(message: Message) -> bool:
    """True when an assistant turn reasons: a ``reasoning`` field, or a ``<think>`` block in its content. Both
    sources follow one policy: a template without a reasoning format refuses the row either way."""
    return bool(message.reasoning) or (message.role == "assistant" and isinstance(message.content, str)
                                       and THINK_OPEN in message.content)


def split_reasoning(message: Message) -> Message:
    """``message`` with the one closed think block its content opens with as ``reasoning``, the rest as content
    (when an answer or a call follows: DeepSeek-R1's way of writing reasoning); else ``message`` itself."""
    text = message.content.lstrip() if message.role == "assistant" and message.reasoning is None else ""
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return message
    inner, answer = text[len(THINK_OPEN):].split(THINK_CLOSE)
    return replace(message, content=answer.strip(), reasoning=inner.strip()) if answer.strip() or message.tool_calls \
        else message


def _check_reasoning(message: Message, where: str) -> None:
    """An assistant turn's reasoning comes from one source, and an inline think block is closed."""
    content = message.content if isinstance(message.content, str) else ""
    opened = content.find(THINK_OPEN)
    if opened < 0:
        return
    if message.reasoning is not None:
        raise DataError(f"{where} (assistant): reasoning twice, in its reasoning_content and as a {THINK_OPEN} block "
                        f"in its content (it would be rendered as two think blocks); keep one")
    if THINK_CLOSE not in content[opened:]:
        raise DataError(f"{where} (assistant): its content opens {THINK_OPEN} and never closes it with {THINK_CLOSE} "
                        f"(a generation cut short?): the reasoning and the answer cannot be told apart")


def _a(word: str) -> str:
    return f"an {word}" if word == "assistant" else f"a {word}"


def validate_conversation(messages: Sequence[Message]) -> list[str]:
    """Check a normalized conversation; raise :class:`DataError` naming the turn at fault.

    Rules: roles are system/user/assistant/tool; a system turn may only come first; after it,
    user and assistant turns alternate, starting with user and ending with assistant (a trailing
    question would be rendered but never answered). An assistant turn with tool calls is
    followed by one ``tool`` turn per call (the results, in any order, matched by
    ``tool_call_id``, else by ``name``, else in order) and then by the next assistant turn; a
    tool result with no matching call is an error. Content is never empty, except on an
    assistant turn that makes tool calls. Reasoning and tool calls belong to assistant turns;
    tool-call arguments are JSON objects. A turn's reasoning has one source (``reasoning`` or a
    ``<think>`` block in its content, never both), and a ``<think>`` in content is closed.

    Returns warnings (the core prints them with the row's location): a call of a tool that is
    missing from the conversation's ``tools`` when it declares some.
    """
    if not messages:
        raise DataError("empty conversation")
    warnings: list[str] = []
    declared = set(tool_names(tools_of(messages)))
    expected = "user"
    pending: list[ToolCall] = []  # calls of the last assistant turn still waiting for their result
    for i, message in enumerate(messages):
        where = f"turn {i}"
        if not isinstance(message, Message):
            raise DataError(f"{where}: the format returned {type(message).__name__}, not a Message")
        role = message.role
        if role not in ROLES:
            raise DataError(f"{where}: unknown role '{role}'")
        if message.reasoning is not None and role != "assistant":
            raise DataError(f"{where} ({role}): reasoning on a {role} turn; only assistant turns reason")
        if message.tool_calls and role != "assistant":
            raise DataError(f"{where} ({role}): tool calls on a {role} turn; only assistant turns call tools")
        empty = not isinstance(message.content, str) or not message.content.strip()
        if empty and not (role == "assistant" and message.tool_calls):
            raise DataError(f"{where} ({role}): empty content")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: a system turn may only come first")
            continue
        if role == "tool":
            if not pending:
                raise DataError(f"{where}: a tool result with no matching call"
                                + (" (the previous assistant turn makes no tool call)" if expected != "tool" else
                                   " (every call of the previous assistant turn already has its result)"))
            pending.remove(_match_call(message, pending, where))
            expected = "tool" if pending else "assistant"
            continue
        if pending:
            names = ", ".join(c.name for c in pending)
            raise DataError(f"{where}: {_a(role)} turn follows an assistant turn whose tool call(s) {names} have no "
                            f"result (expected a tool turn)")
        if role != expected:
            previous = f"{_a(messages[i - 1].role)} turn" if i else "the start"
            raise DataError(f"{where}: roles must alternate user/assistant: {_a(role)} turn follows "
                            f"{previous} (expected {expected})")
        if role == "assistant":
            _check_reasoning(message, where)
            for j, call in enumerate(message.tool_calls):
                if not isinstance(call, ToolCall):
                    raise DataError(f"{where}: tool_calls[{j}] is {type(call).__name__}, not a ToolCall")
                parse_arguments(call.arguments, f"turn {i} tool_calls[{j}].arguments")
                if declared and call.name not in declared:
                    warnings.append(f"{where}: calls tool '{call.name}', which the row's tools do not declare"
                                    f"{did_you_mean(call.name, declared)} (declared: {', '.join(sorted(declared))})")
            pending = list(message.tool_calls)
            expected = "tool" if pending else "user"
        else:
            expected = "assistant"
    if not any(m.role == "assistant" for m in messages):
        raise DataError("no assistant turn")
    last = messages[-1]
    if last.role == "tool":
        raise DataError(f"turn {len(messages) - 1}: the conversation ends with a tool result that no assistant turn "
                        f"reads")
    if last.role != "assistant":
        raise DataError(f"turn {len(messages) - 1}: the conversation ends with an unanswered user turn")
    return warnings


def _match_call(message: Message, pending: list[ToolCall], where: str) -> ToolCall:
    """The pending call a tool result answers: by ``tool_call_id``, else by ``name``, else the first."""
    if message.tool_call_id:
        for call in pending:
            if call.id == message.tool_call_id:
                return call
        ids = ", ".join(repr(c.id) for c in pending if c.id) or "none"
        raise DataError(f"{where}: a tool result with no matching call: tool_call_id {message.tool_call_id!r} "
                        f"is not among the pending calls' ids ({ids})")
    if message.name:
        for call in pending:
            if call.name == message.name:
                return call
        names = ", ".join(c.name for c in pending)
        raise DataError(f"{where}: a tool result with no matching call: tool '{message.name}' was not called "
                        f"(pending: {names})")
    return pending[0]
