"""What the Jinja-driven chat templates share: the ``tokenizer`` template and the built-ins that ship a
model family's real ``chat_template`` (``qwen``, ``qwen3``, ``hermes``, ``llama31``).

These templates never re-implement a model's format in Python: the text is the model's own Jinja
rendered by transformers, so the training text is, by construction, what ``apply_chat_template``,
vLLM and llama.cpp's ``--jinja`` produce. :func:`jinja_segments` finds the trained spans in it: each
assistant turn is located in the whole conversation's text, starting where the model's output
starts (where the text stops agreeing with the generation prompt) and ending with the terminator
that closes it.

Not a plugin module (nothing registers here); template plugins import it, no other kind does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from sft.core.errors import SftError, as_user_error
from sft.core.formats import has_reasoning, split_reasoning
from sft.core.interfaces import ChatTemplate, Message, Segment, tools_of
from sft.core.templating import as_messages, chat_dicts
from sft.core.timelimit import render_time_limit

__all__ = ["JinjaTemplate", "jinja_segments", "special_tokens", "render_chat_template", "chatml_tools_ollama", "THINK"]

#: The delimiters of a reasoning block, as Qwen3, DeepSeek-R1 and most reasoning models write it.
THINK = ("<think>", "</think>")

#: ``apply(messages, add_generation_prompt) -> text``: one rendering of a conversation prefix.
Apply = Callable[[Sequence[Message], bool], str]


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (named ones and added ones marked special); none without a tokenizer."""
    if tokenizer is None:
        return []
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(t for t in found if t)


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


#: A user message at least this long is not found inside another turn's text by chance ("end" is in <|end|>).
UNMISTAKABLE = 24


def jinja_segments(name: str, apply: Apply, messages: Sequence[Message], ends: str | Sequence[str],
                   think: tuple[str, str] | None = THINK, specials: Sequence[str] = ()) -> list[Segment]:
    """Segments of ``apply(messages)`` with each assistant turn (text, tool calls, reasoning, its end) trained.

    A think block that opens an answer (DeepSeek-R1's way of writing reasoning) is the turn's
    reasoning here, as a ``reasoning_content`` is (:func:`~sft.core.formats.split_reasoning`): the
    template may rebuild it or drop it from earlier turns (QwQ's), the turn's text must be there,
    and the block is marked as reasoning. (A template with a reasoning format is handed such a
    block as its reasoning field, :func:`~sft.core.templating.chat_dicts`.)

    Each assistant turn is found in the whole conversation's text, as the model's template renders
    it there (earlier turns may lose their reasoning, the last turn may end differently), never in
    a shorter render: :meth:`_Turn.start` finds where the model's output begins, :meth:`_Turn.end`
    what closes it. ``ends`` are the strings that close a turn (the first is the
    end-of-turn token; Command R7B's is two tokens, gpt-oss closes earlier turns with ``<|end|>``
    and the last with ``<|return|>``). ``specials`` are the tokenizer's special tokens (they
    delimit channels). Reasoning (a ``think`` block or a reasoning channel) is marked as such,
    also when the generation prompt already opened it. Raises :class:`SftError` for a turn that
    cannot be located, that the template rewrites, or whose span would hold another turn's text.
    """
    ends = [ends] if isinstance(ends, str) else list(ends)
    full = apply(messages, False)
    _check_system(name, messages, full)
    segments: list[Segment] = []
    reasoned: list[str] = []  # each turn's reasoning, its opening think block included
    pos = 0
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        turn = _Turn(name, apply, messages, i, full, specials)
        reasoned += [turn.message.reasoning.strip()] if turn.message.reasoning else []
        start = turn.start(pos)
        _check_span(name, i, turn.message, full[start:])  # what the turn says follows its start
        end = turn.end(start, ends)
        span = full[start:end]
        _check_span(name, i, turn.message, span)
        _check_outside(name, i, messages, span)
        segments.append(Segment(full[pos:start], False))
        cut = turn.reasoning_end(start, end, ends, think)
        segments.append(Segment(full[start:cut], True, reasoning=True))
        segments.append(Segment(full[cut:end], True))
        pos = end
    segments.append(Segment(full[pos:], False))
    if reasoned and not any(r in full for r in reasoned):
        raise SftError(f"template '{name}': the chat_template renders no reasoning, so this row's reasoning would be "
                       f"dropped; choose a template that has a reasoning format (qwen3, or tokenizer with a "
                       f"reasoning model such as Qwen3, gpt-oss or Nemotron 3)")
    return [s for s in segments if s.text]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _whole(text: str, agreed: int, specials: Sequence[str]) -> int:
    """``agreed`` characters of ``text`` cut back to whole pieces: a prompt's ``<think>`` and a turn's ``<tool_call>``
    agree on ``<t``, which belongs to neither. Kept: up to the last newline or special token."""
    if agreed >= len(text):
        return agreed
    cut = text.rfind("\n", 0, agreed) + 1
    for token in specials:
        at = text.rfind(token, 0, agreed)
        if at >= 0 and at + len(token) <= agreed:
            cut = max(cut, at + len(token))
    return cut


def _pieces(message: Message) -> list[str]:
    """What an assistant turn says, in the order templates write it: reasoning, text, each call's name and values."""
    out = [message.reasoning.strip() if message.reasoning else "", message.content.strip()]
    for call in message.tool_calls:
        out.append(call.name)
        # Text and numbers are written as they are by every template; booleans are not (true, True).
        out += [str(v) for v in call.arguments.values()
                if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v)]
    return [p for p in out if p]


class _Turn:
    """Assistant turn ``i`` of ``messages`` inside ``full``, the render of the whole conversation."""

    def __init__(self, name: str, apply: Apply, messages: Sequence[Message], i: int, full: str,
                 specials: Sequence[str]):
        self.name, self.apply, self.messages, self.i, self.full = name, apply, messages, i, full
        self.specials = specials
        #: what the turn says: its think block, if its content opens with one, as its reasoning
        self.message = split_reasoning(messages[i])
        self.prompt = apply(messages[:i], True)  # the generation prompt of this turn
        self._header: str | None = None

    @property
    def header(self) -> str:
        """What the generation prompt adds after the conversation so far (``<|im_start|>assistant\\n<think>\\n``)."""
        if self._header is None:
            history = self.apply(self.messages[: self.i], False) if self.i else ""
            self._header = self.prompt[_common_prefix(history, self.prompt):]
        return self._header

    def start(self, pos: int) -> int:
        """Where the model's output for this turn begins in ``full`` (at or after ``pos``).

        Where the generation prompt is a prefix of the text, its end. Otherwise the text since
        the previous message is matched as far as it agrees with the generation prompt's: a
        prompt that opens a think block or a channel the turn does not write (Qwen3.5's
        ``<think>\\n``), or a history the whole conversation renders differently (Qwen3 drops
        earlier reasoning, Mistral v0.3 moves the system prompt), still finds the turn.
        """
        full, prompt = self.full, self.prompt
        start = -1
        if full.startswith(prompt) and len(prompt) >= pos:
            start = len(prompt)
        elif (anchor := self._previous_end(pos)) is not None:
            in_full, in_prompt = anchor
            glue = prompt[in_prompt:]
            start = in_full + _whole(glue, _common_prefix(glue, full[in_full:]), self.specials)
        else:
            agreed = _common_prefix(prompt, full)
            header_at = len(prompt) - len(self.header)
            if agreed >= pos and agreed >= header_at:
                start = header_at + _whole(self.header, agreed - header_at, self.specials)
        if start >= 0:
            return start
        raise SftError(f"template '{self.name}': cannot find where assistant turn {self.i} begins in the "
                       f"chat_template's text (the text before it renders differently once the turn is there); "
                       f"check the row with `sft preview --check-template`, or choose a named template")

    def _previous_end(self, pos: int) -> tuple[int, int] | None:
        """End of the previous message's text in ``full`` and in the generation prompt, when both hold it."""
        if not self.i:
            return None
        previous = self.messages[self.i - 1]
        text = previous.content.strip()
        if previous.role == "assistant" or not text:
            return None
        in_prompt = self.prompt.rfind(text)
        in_full = self.full.find(text, pos)
        if in_prompt < 0 or in_full < 0:
            return None
        return in_full + len(text), in_prompt + len(text)

    def end(self, start: int, ends: Sequence[str]) -> int:
        """Where the turn ends: after the first terminator that follows everything the turn says.

        A turn with tool calls whose results the template writes before any terminator (gpt-oss
        closes a call with ``<|call|>``, Gemma 4 writes the responses inside the model turn) ends
        where the text of the conversation up to this turn ends.
        """
        full = self.full
        following = self.messages[self.i + 1] if self.i + 1 < len(self.messages) else None
        # What a template leaves out (Qwen3 drops earlier turns' reasoning) is not looked for past the next
        # question: the same words in a later turn ("Let me check." reasoning twice) are not this turn's.
        asked = following.content.strip() if following is not None and following.role == "user" else ""
        bound = full.find(asked, start) if len(asked) >= UNMISTAKABLE else -1
        bound = bound if bound >= 0 else len(full)
        said, last = start, ""
        for piece in _pieces(self.message):
            at = full.find(piece, said)
            if 0 <= at < bound:
                said, last = at + len(piece), piece
        # A turn ends with one of ``ends``, or with the last token of one (Command R7B ends a call
        # <|END_ACTION|><|END_OF_TURN_TOKEN|>, an answer <|END_RESPONSE|><|END_OF_TURN_TOKEN|>).
        closers = {next((t for t in self.specials if e.endswith(t)), e) for e in ends}
        found = [(at, -len(e), e) for e in {*ends, *closers} if (at := full.find(e, said)) >= 0]
        close = min(found)[0] + len(min(found)[2]) if found else -1
        if self.message.tool_calls and following is not None and following.role == "tool":
            result = full.find(following.content.strip(), said) if following.content.strip() else -1
            if close < 0 or 0 <= result < close:
                # The conversation cut after this turn ends where the call's text ends (gpt-oss: "}<|call|>);
                # what follows the turn's last piece there is the rest of the turn.
                upto = self.apply(self.messages[: self.i + 1], False)
                at = upto.rfind(last) if last else -1
                if at >= 0:
                    return said + _common_prefix(upto[at + len(last):], full[said:])
                close = -1
        if close < 0:
            raise SftError(f"template '{self.name}': the chat_template does not end assistant turn {self.i} with "
                           f"{' or '.join(map(repr, ends))}, so the model could never learn to stop; choose a "
                           f"named template")
        return close

    def reasoning_end(self, start: int, end: int, ends: Sequence[str], think: tuple[str, str] | None) -> int:
        """The end of the turn's leading reasoning (``start`` when there is none): untrained under ``assistant_no_reasoning``.

        The reasoning runs from the turn's start through its closing delimiter: ``</think>``, a
        terminator and the next header (gpt-oss's analysis message), or a special token (Gemma
        4's ``<channel|>``), and the newlines after it. With no reasoning text, an empty think
        block at the start (Qwen3's last turn), or one the generation prompt opened, counts too.
        """
        full = self.full
        span = full[start:end]
        reasoning = (self.message.reasoning or "").strip()
        said = _pieces(self.message)[1 if reasoning else 0:]
        first_said = min((at for p in said if (at := span.find(p)) >= 0), default=len(span))
        at = span.find(reasoning) if reasoning else -1
        if 0 <= at < first_said:
            cut = start + at + len(reasoning)
            cut += len(full[cut:end]) - len(full[cut:end].lstrip())
            rest = full[cut:end]
            closer = think[1] if think and rest.startswith(think[1]) else None
            if closer is None:
                closer = next((e for e in sorted(ends, key=len, reverse=True) if rest.startswith(e)), None)
                if closer is not None:
                    cut += len(closer)
                    return cut + _common_prefix(self.header, full[cut:end])
                closer = next((s for s in sorted(self.specials, key=len, reverse=True) if rest.startswith(s)), "")
            cut += len(closer)
            return cut + len(full[cut:end]) - len(full[cut:end].lstrip("\n"))
        if think:
            opening, closing = think
            lead = len(span) - len(span.lstrip())
            opened = self.header.rstrip().endswith(opening)
            if (opened or span.startswith(opening, lead)) and 0 <= (close := span.find(closing)) < first_said:
                cut = start + close + len(closing)
                return cut + len(full[cut:end]) - len(full[cut:end].lstrip("\n"))
        return start


def _check_outside(name: str, i: int, messages: Sequence[Message], span: str) -> None:
    """No other message's text (a tool result, a user question) is inside assistant turn ``i``'s span."""
    own = messages[i]
    said = own.content + (own.reasoning or "") + "".join(str(c.arguments) + c.name for c in own.tool_calls)
    for j, other in enumerate(messages):
        text = other.content.strip()
        # Tool results always; a user turn only when long enough not to match by chance.
        short = other.role == "user" and len(text) < UNMISTAKABLE
        if other.role not in ("tool", "user") or short or not text or text in said:
            continue
        if text in span:
            fix = (" (Gemma 4 writes tool results before the text of the turn that called: give that turn "
                   "its calls alone and the text to the next assistant turn)" if other.role == "tool" and own.tool_calls
                   else "")
            raise SftError(f"template '{name}': the chat_template writes the {other.role} message {j} inside "
                           f"assistant turn {i}, so it would be trained{fix}; or choose a template that keeps "
                           f"{other.role} messages outside the model's turn")


def _check_system(name: str, messages: Sequence[Message], full: str) -> None:
    """A system prompt the template leaves out of the row is refused, not trained without.

    Mistral v0.3's and Nemo's Jinja write it only before a final user turn (the generation
    prompt), so a row that ends with an answer loses it; so did Phi-3-mini's first template.
    """
    for j, message in enumerate(messages):
        if message.role == "system" and message.content.strip() and message.content.strip() not in full:
            raise SftError(f"template '{name}': the chat_template leaves out system message {j} of this row, so it "
                           f"would train without its system prompt; choose a template that writes it (mistral-v3 "
                           f"or mistral-nemo for Mistral models, which put it before the last user turn as "
                           f"Mistral's own tokenizer does)")


def _check_span(name: str, i: int, message: Message, span: str) -> None:
    """The span holds what the turn says; a template that silently drops part of it is refused."""
    missing = []
    if message.content.strip() and message.content.strip() not in span:
        missing.append("its text")
    missing += [f"its call of '{c.name}'" for c in message.tool_calls if c.name not in span]
    if missing:
        raise SftError(f"template '{name}': the chat_template changes the text of assistant turn {i} (it drops, "
                       f"moves or rewrites {' and '.join(missing)}), so that turn cannot be trained as written")


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

    def source(self, tokenizer: Any = None) -> str:
        """The template's Jinja (``tokenizer``: the model's, for a template that follows what it does)."""
        # The files end with a newline; the chat_template strings they copy do not.
        return (Path(__file__).parent / "assets" / self.asset).read_text(encoding="utf-8").removesuffix("\n")

    def _apply(self, messages: Sequence[Message], generation: bool, tokenizer: Any = None) -> str:
        # The saved tokenizer renders jinja() with its own special tokens; so does training.
        bos = getattr(tokenizer, "bos_token", None) if tokenizer is not None else self.bos
        eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else self.eot
        with render_time_limit(f"chat template '{self.name}'"):
            try:
                return render_chat_template(self.source(tokenizer), messages, generation, bos_token=bos or "",
                                            eos_token=eos or "")
            except Exception as e:  # noqa: BLE001 - the family's Jinja refusing a row (raise_exception) is a row error
                stopped = as_user_error(e)  # the sandbox stopping a template is not a row's fault: it says so
                if stopped is not None:
                    raise stopped from e
                raise SftError(f"chat template '{self.name}' cannot render this row: {type(e).__name__}: {e}") from e

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        messages = as_messages(messages)
        if not self.reasoning and any(map(has_reasoning, messages)):
            raise SftError(f"chat template '{self.name}' has no reasoning format (for a reasoning_content field or a "
                           f"<think> block in an assistant's content); use qwen3 (or tokenizer with a "
                           f"reasoning model) for rows with reasoning")
        return jinja_segments(self.name, lambda m, g: self._apply(m, g, tokenizer), messages, self.eot,
                              THINK if self.reasoning else None, special_tokens(tokenizer))

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return self._apply(as_messages(messages), True, tokenizer)

    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        return [self.eot, *(s for s in self.stops if s != self.eot)]

    def jinja(self, tokenizer: Any = None) -> str:
        return self.source(tokenizer)


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
