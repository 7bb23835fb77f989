"""What the Jinja-driven chat templates share: the ``tokenizer`` template and the built-ins that ship a
model family's real ``chat_template`` (``qwen``, ``qwen3``, ``hermes``, ``llama31``).

These templates never re-implement a model's format in Python: the text is the model's own Jinja
rendered by transformers, so the training text is, by construction, what ``apply_chat_template``,
vLLM and llama.cpp's ``--jinja`` produce. :func:`jinja_segments` finds the trained spans in it by
rendering prefixes of the conversation: assistant turn *i* starts where the generation prompt of
``messages[:i]`` ends and ends with the end-of-turn token that closes it.

Not a plugin module (nothing registers here); template plugins import it, no other kind does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from sft.core.errors import SftError
from sft.core.interfaces import ChatTemplate, Message, Segment, tools_of
from sft.core.templating import as_messages, chat_dicts

__all__ = ["JinjaTemplate", "jinja_segments", "render_chat_template", "chatml_tools_ollama", "THINK"]

#: The delimiters of a reasoning block, as Qwen3, DeepSeek-R1 and most reasoning models write it.
THINK = ("<think>", "</think>")

#: ``apply(messages, add_generation_prompt) -> text``: one rendering of a conversation prefix.
Apply = Callable[[Sequence[Message], bool], str]


def render_chat_template(chat_template: str, messages: Sequence[Message], generation: bool = False,
                         **variables: Any) -> str:
    """Render ``chat_template`` the way ``tokenizer.apply_chat_template`` does (transformers' own renderer).

    ``variables`` are the extra names a template reads (``bos_token``, ``eos_token``, ...). The
    conversation's tools are passed as ``tools`` (None when there are none: Llama 3.1's template
    tests ``tools is not none``).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    tools = tools_of(messages) or None
    rendered, _ = render_jinja_template([chat_dicts(messages)], tools=tools, chat_template=chat_template,
                                        add_generation_prompt=generation, **variables)
    return rendered[0]


def jinja_segments(name: str, apply: Apply, messages: Sequence[Message], eot: str,
                   think: tuple[str, str] | None = THINK) -> list[Segment]:
    """Segments of ``apply(messages)`` with each assistant turn (text, tool calls, reasoning, EOT) trained.

    For assistant turn *i* the span starts at the end of ``apply(messages[:i], True)`` (the
    generation prompt, which must be a prefix of the full text) and ends after the end-of-turn
    token that closes the turn: the last ``eot`` of ``apply(messages[:i+1])`` when that is a
    prefix of the full text, else (a template that renders the last turn differently, as Qwen3
    writes an empty think block only there) the first ``eot`` after the start. A leading
    ``think`` block of a span is marked ``reasoning``. Raises :class:`SftError` when the
    template is not prefix-preserving or drops what the turn says.
    """
    full = apply(messages, False)
    segments: list[Segment] = []
    pos = 0
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = apply(messages[:i], True)
        if not full.startswith(before) or len(before) < pos:
            raise SftError(f"template '{name}': the chat_template is not prefix-preserving at turn {i} "
                           f"(rendering more turns changes earlier text), so trained spans cannot be found; "
                           f"choose a named template")
        start = len(before)
        upto = apply(messages[: i + 1], False)
        last_eot = upto.rfind(eot)
        if full.startswith(upto) and last_eot >= start:
            end = last_eot + len(eot)
        else:
            end = full.find(eot, start)
            if end < 0:
                raise SftError(f"template '{name}': the chat_template does not end assistant turn {i} with "
                               f"{eot!r}, so the model could never learn to stop; choose a named template")
            end += len(eot)
        _check_span(name, i, message, full[start:end])
        segments.append(Segment(full[pos:start], False))
        segments.extend(_split_reasoning(full[start:end], think))
        pos = end
    segments.append(Segment(full[pos:], False))
    if any(m.reasoning for m in messages) and not any(m.reasoning.strip() in full for m in messages if m.reasoning):
        raise SftError(f"template '{name}': the chat_template renders no reasoning, so this row's reasoning would be "
                       f"dropped; choose a template that has a reasoning format (qwen3, or tokenizer with a "
                       f"reasoning model)")
    return [s for s in segments if s.text]


def _check_span(name: str, i: int, message: Message, span: str) -> None:
    """The span holds what the turn says; a template that silently drops part of it is refused."""
    missing = []
    if message.content.strip() and message.content.strip() not in span:
        missing.append("its text")
    missing += [f"its call of '{c.name}'" for c in message.tool_calls if c.name not in span]
    if missing:
        raise SftError(f"template '{name}': the chat_template changes the text of assistant turn {i} (it drops or "
                       f"rewrites {' and '.join(missing)}), so that turn cannot be trained as written")


def _split_reasoning(span: str, think: tuple[str, str] | None) -> list[Segment]:
    """``span`` as trained segments, its leading think block (with the newlines after it) marked as reasoning."""
    if think:
        opening, closing = think
        lead = len(span) - len(span.lstrip())
        if span.startswith(opening, lead) and (close := span.find(closing, lead)) >= 0:
            end = close + len(closing)
            end += len(span[end:]) - len(span[end:].lstrip("\n"))
            return [Segment(span[:lead], True), Segment(span[lead:end], True, reasoning=True),
                    Segment(span[end:], True)]
    return [Segment(span, True)]


class JinjaTemplate(ChatTemplate):
    """A built-in template that *is* a model family's real ``chat_template`` (a file in ``assets/``).

    Subclasses set ``asset`` (the file name), ``eot`` and ``stop``, and, for families that write
    a BOS in the text, ``bos``. ``reasoning`` says whether the format has a reasoning block; rows
    with reasoning are refused by the ones that don't, rather than trained without it.
    """

    asset: str
    eot: str
    stops: tuple[str, ...] = ()
    bos: str = ""
    reasoning: bool = False

    def source(self) -> str:
        # The files end with a newline; the chat_template strings they copy do not.
        return (Path(__file__).parent / "assets" / self.asset).read_text(encoding="utf-8").removesuffix("\n")

    def _apply(self, messages: Sequence[Message], generation: bool, tokenizer: Any = None) -> str:
        # The saved tokenizer renders jinja() with its own special tokens; so does training.
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else self.bos
        eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else self.eot
        return render_chat_template(self.source(), messages, generation, bos_token=bos or "", eos_token=eos or "")

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        messages = as_messages(messages)
        if not self.reasoning and any(m.reasoning for m in messages):
            raise SftError(f"chat template '{self.name}' has no reasoning format; use qwen3 (or tokenizer with a "
                           f"reasoning model) for rows with reasoning")
        return jinja_segments(self.name, lambda m, g: self._apply(m, g, tokenizer), messages, self.eot,
                              THINK if self.reasoning else None)

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return self._apply(as_messages(messages), True, tokenizer)

    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        return [self.eot, *(s for s in self.stops if s != self.eot)]

    def jinja(self, tokenizer: Any = None) -> str:
        return self.source()


def chatml_tools_ollama(default_system: str | None, system_with_tools: str, thinking: bool = False) -> str:
    """Ollama's Go template for the ChatML formats with ``<tool_call>`` JSON and ``<tool_response>`` turns.

    Qwen2.5, Qwen3 and Hermes write tool calls and results the same way; they differ in the
    system turn (``default_system``: Qwen2.5's "You are Qwen ..." when none is given) and in
    how a system prompt joins the tools preamble (``system_with_tools``: the text between the
    system prompt and ``# Tools``). History renders as the model's Jinja renders it, except that
    Ollama writes JSON compactly (``{"a":1}``) where Jinja's ``tojson`` writes ``{"a": 1}``,
    With ``thinking`` (Qwen3), an assistant message's ``.Thinking`` is replayed as a think block
    when no user message follows it (Qwen3 drops the thinking of turns before the last user
    question, and so does this template). Tool results open a user
    turn after the assistant turn that called (the same text as Qwen's Jinja, which opens it at
    the first result), so the template needs no look-behind.
    """
    system = "{{ .System }}" if default_system is None else "{{ if .System }}{{ .System }}{{ else }}" + default_system + "{{ end }}"
    preamble = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
        "function signatures within <tools></tools> XML tags:\n<tools>"
        '{{ range .Tools }}\n{"type": "function", "function": {{ .Function }}}{{ end }}'
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n")
    if default_system is None:
        head = ("{{ if .Tools }}<|im_start|>system\n{{ if .System }}{{ .System }}" + system_with_tools + "{{ end }}"
                + preamble + "{{ else if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}")
    else:
        head = ("{{ if .Tools }}<|im_start|>system\n" + system + system_with_tools + preamble
                + "{{ else }}<|im_start|>system\n" + system + "<|im_end|>\n{{ end }}")
    return head + (
        "{{ range $i, $_ := .Messages }}{{ $rest := slice $.Messages $i }}{{ $last := eq (len $rest) 1 }}"
        '{{ $next := "" }}{{ if not $last }}{{ $next = (index $rest 1).Role }}{{ end }}'
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        "{{ if $last }}<|im_start|>assistant\n{{ end }}"
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant'
        + ('{{ $current := true }}{{ range $rest }}{{ if eq .Role "user" }}{{ $current = false }}{{ end }}{{ end }}'
           "{{ if and $current .Thinking }}\n<think>\n{{ .Thinking }}\n</think>\n{{ end }}" if thinking else "")
        + "{{ if .Content }}\n{{ .Content }}"
        "{{ else if not .ToolCalls }}\n{{ end }}"
        '{{ range .ToolCalls }}\n<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}'
        "\n</tool_call>{{ end }}"
        '{{ if not $last }}<|im_end|>\n{{ if eq $next "tool" }}<|im_start|>user{{ end }}{{ end }}'
        '{{ else if eq .Role "tool" }}\n<tool_response>\n{{ .Content }}\n</tool_response>'
        '{{ if ne $next "tool" }}<|im_end|>\n{{ end }}{{ if $last }}<|im_start|>assistant\n{{ end }}'
        "{{ end }}{{ end }}")
