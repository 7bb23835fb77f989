"""The ``tokenizer`` chat template: the model tokenizer's own ``chat_template``.

Training spans are found in the text of the whole conversation, rendered by the tokenizer's
Jinja (:func:`~sft.plugins.templates.common.jinja_segments`): each assistant turn starts where
the model's output starts (where the text stops agreeing with the generation prompt, so a prompt
that opens a ``<think>`` block or a channel the turn does not repeat still fits) and ends with
what closes it; the answer (text, tool calls, reasoning) and that end are trained.
The row's tools, tool calls, tool results and reasoning are passed to the Jinja in the OpenAI
schema, as ``apply_chat_template(messages, tools=...)`` receives them (reasoning under the key
the template reads: ``reasoning_content``, gpt-oss's ``thinking``, or a think block in the
content). A turn that cannot be located, that the template rewrites, or whose span would hold a
tool result, is refused with a clear error.

What closes a turn is found by rendering probe conversations: the special tokens right after
the assistant's text (``<|im_end|>``, ``<|eot_id|>``, Command R7B's
``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``; gpt-oss's ``<|return|>`` for the last turn and
``<|end|>`` for earlier ones), else eos.
The Ollama template is derived the same way, by rendering sentinel conversations and reading
off each role's prefix and suffix; templates that don't fit that shape are refused.
"""

from __future__ import annotations

from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.errors import SftError, as_user_error
from sft.core.interfaces import ChatTemplate, Conversation, Message, Segment, tools_of
from sft.core.templating import (PROBE_TOOL, Turn, TurnTemplate, as_messages, chat_dicts, model_eos_token,
                                 rendered_reasoning_key, try_render)
from sft.core.timelimit import TemplateTooSlow, render_time_limit

from .common import THINK, jinja_segments, special_tokens

__all__ = ["TokenizerTemplate", "register_chat_templates"]

_U, _A, _U2, _S = "SFTPROBEUSER", "SFTPROBEANSWER", "SFTPROBEUSERTWO", "SFTPROBESYSTEM"


def _model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or "this model"


def _apply(tokenizer: Any, messages: Sequence[Message], generation: bool = False) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SftError(f"template 'tokenizer': the tokenizer of {_model_name(tokenizer)} has no chat_template; "
                       f"set template.name to a named template (chatml, llama3, ...)")
    tools = tools_of(messages) or None
    try:
        with render_time_limit(f"template 'tokenizer' (the chat_template of {_model_name(tokenizer)})"):
            return tokenizer.apply_chat_template(chat_dicts(messages, rendered_reasoning_key(tokenizer)), tools=tools,
                                                 tokenize=False, add_generation_prompt=generation,
                                                 eos_token=model_eos_token(tokenizer))
    except TemplateTooSlow:
        raise  # the template's fault, never this row's
    except Exception as e:  # noqa: BLE001 - the model's Jinja refusing a row (raise_exception, a missing key)
        stopped = as_user_error(e)  # the sandbox stopping a template is not a row's fault: it says so
        if stopped is not None:
            raise stopped from e
        if tools is None and try_render(tokenizer, chat_dicts(messages), [PROBE_TOOL]):
            raise SftError("template 'tokenizer': the model's chat_template renders only conversations with tools "
                           "(a tool_use template, as Hermes 2 Pro/3 and Command R+ publish besides their default "
                           "one), and this row has none: give the tokenizer the model's whole chat_template list "
                           "(default + tool_use, as on the hub; each row then gets the right one), or use a "
                           "named template (hermes, chatml)") from e
        raise SftError(f"template 'tokenizer': the model's chat_template cannot render this row: "
                       f"{type(e).__name__}: {e}") from e


def _probe(tokenizer: Any, messages: Sequence[Message], generation: bool = False) -> str:
    """A probe conversation rendered as is, or with a probe tool when the template renders only those with tools."""
    try:
        return _apply(tokenizer, messages, generation)
    except TemplateTooSlow:
        raise
    except SftError:
        return _apply(tokenizer, Conversation(list(messages), [PROBE_TOOL]), generation)


def _special_run(text: str, specials: Sequence[str]) -> list[str]:
    """The special tokens at the start of ``text``, one after another with nothing between them."""
    run: list[str] = []
    ordered = sorted(specials, key=len, reverse=True)
    while (token := next((t for t in ordered if text.startswith(t)), None)) is not None:
        run.append(token)
        text = text[len(token):]
    return run


class TokenizerTemplate(ChatTemplate):
    name = "tokenizer"
    version = "5"
    description = "the model tokenizer's own chat_template (each assistant turn found in the whole conversation's text)"

    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        eot = self._probe_eot(tokenizer)
        eos = getattr(tokenizer, "eos_token", None)
        return [eot] + ([eos] if eos and eos != eot else [])

    def _probe_eot(self, tokenizer: Any) -> str:
        """The token generation stops at: the last token of what closes an assistant turn."""
        last = self._probe_ends(tokenizer)[0]
        run = _special_run(last, special_tokens(tokenizer))
        return run[-1] if run else last

    def _probe_ends(self, tokenizer: Any) -> list[str]:
        """:meth:`_read_ends`, once per tokenizer state (every row's render needs it)."""
        source = getattr(tokenizer, "chat_template", None)
        key = (id(tokenizer), source if isinstance(source, str) else repr(source), getattr(tokenizer, "eos_token", None),
               model_eos_token(tokenizer), len(tokenizer) if tokenizer is not None else 0)
        cache = self.__dict__.setdefault("_ends", {})
        if key not in cache:
            cache[key] = self._read_ends(tokenizer)
        return cache[key]

    def _read_ends(self, tokenizer: Any) -> list[str]:
        """What closes an assistant turn, read off probe renders; the first closes the last turn.

        The special tokens right after the answer, one after another: Command R7B closes a turn
        with ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``, and both are trained. A turn followed by
        another closes with the same tokens as far as they agree (Llama 3's ``<|eot_id|>``
        before the next header), or with its own first token where it differs (gpt-oss: the
        last turn ``<|return|>``, earlier ones ``<|end|>``). No special token: the eos token.
        """
        specials = special_tokens(tokenizer)
        eos = getattr(tokenizer, "eos_token", None)
        last = self._after_answer(_probe(tokenizer, [Message("user", _U), Message("assistant", _A)]), specials, eos)
        if not last:
            if eos:
                return [eos]
            raise SftError("template 'tokenizer': cannot tell which token ends an assistant turn "
                           "(the chat_template puts no special token after the answer and the tokenizer has no eos)")
        ends = ["".join(last)]
        history = self._after_answer(_probe(tokenizer, [Message("user", _U), Message("assistant", _A),
                                                        Message("user", _U2)]), specials, eos)
        if history and history[0] == last[0]:
            agreed = next((k for k, (a, b) in enumerate(zip(last, history)) if a != b), min(len(last), len(history)))
            ends.append("".join(last[:agreed]))
        elif history:
            ends.append(history[0])
        return list(dict.fromkeys(ends))

    @staticmethod
    def _after_answer(text: str, specials: Sequence[str], eos: str | None) -> list[str]:
        """The special tokens right after the probe's answer, up to the eos token when it is among them
        (Command R7B's tool_use template opens the next turn right after its final one)."""
        after = text[text.index(_A) + len(_A):]
        found = [(after.find(t), -len(t), t) for t in specials if after.find(t) >= 0]
        if not found:
            return []
        run = _special_run(after[min(found)[0]:], specials)
        return run[: run.index(eos) + 1] if eos in run else run

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        return jinja_segments(self.name, lambda m, g: _apply(tokenizer, m, g), as_messages(messages),
                              self._probe_ends(tokenizer), THINK, special_tokens(tokenizer))

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return _apply(tokenizer, as_messages(messages), generation=True)

    def jinja(self, tokenizer: Any = None) -> str:
        _probe(tokenizer, [Message("user", _U)])  # raises the clear error when there is none
        return tokenizer.chat_template

    def ollama_template(self, tokenizer: Any = None) -> str:
        return self._as_turn_template(tokenizer).ollama_template(tokenizer)

    def _as_turn_template(self, tokenizer: Any) -> TurnTemplate:
        """Read each role's prefix/suffix off sentinel renders, then check the result renders identically."""
        eot = self._probe_eot(tokenizer)
        u = _apply(tokenizer, [Message("user", _U)])
        ug = _apply(tokenizer, [Message("user", _U)], generation=True)
        ua = _apply(tokenizer, [Message("user", _U), Message("assistant", _A)])
        uau = _apply(tokenizer, [Message("user", _U), Message("assistant", _A), Message("user", _U2)])
        su = _apply(tokenizer, [Message("system", _S), Message("user", _U)])
        # A template that ends a whole conversation with a token (Phi-3: its eos) has that after its turns.
        final = next((t for t in special_tokens(tokenizer)
                      if all(r.endswith(t) for r in (u, ua, uau, su)) and not ug.endswith(t)
                      and _A + eot in ua[: -len(t)]), "")  # after the turns, not a turn's own end
        u, ua, uau, su = (t[: len(t) - len(final)] for t in (u, ua, uau, su))
        probe = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")]
        # Text before the first turn is either a BOS or the start of the system turn; try both readings.
        for bos in dict.fromkeys(["", getattr(tokenizer, "bos_token", None) or ""]):
            try:
                derived = _derive(bos, eot, u, ug, ua, uau, su, final)
            except ValueError:
                continue
            if all("".join(s.text for s in derived.render(c, tokenizer)) == _apply(tokenizer, c)
                   for c in (probe, [Message("system", "s")] + probe)):
                return derived
        raise SftError("template 'tokenizer': this chat_template is not a fixed prefix/suffix per role, so no "
                       "Ollama template can be derived from it; choose a named template for Ollama export")


def _derive(bos: str, eot: str, u: str, ug: str, ua: str, uau: str, su: str, final: str = "") -> TurnTemplate:
    """A :class:`TurnTemplate` from the sentinel renders, reading ``bos`` as the text's BOS (ValueError: no fit)."""
    def cut(text: str, start: int, end: int) -> str:
        if start < 0 or end < start:
            raise ValueError("sentinels out of order")
        return text[start:end]

    user_suffix = u[u.index(_U) + len(_U):]
    if not ug.startswith(u) or not su.startswith(bos) or not u.startswith(bos):
        raise ValueError("not prefix-shaped")
    assistant_prefix = ug[len(u):]
    assistant_suffix = ua[ua.index(_A) + len(_A) + len(eot):]
    user_prefix = cut(uau, len(ua), uau.index(_U2))
    head = cut(u, len(bos), u.index(_U) - len(user_prefix))
    system_prefix = cut(su, len(bos), su.index(_S))
    system_suffix = cut(su, su.index(_S) + len(_S), su.index(_U) - len(user_prefix))
    default = None
    if head:
        if not (head.startswith(system_prefix) and head.endswith(system_suffix)):
            raise ValueError("the text before the first user turn is not a system turn")
        default = head[len(system_prefix): len(head) - len(system_suffix)]
    return type("DerivedTurns", (TurnTemplate,), {
        "name": "tokenizer-derived", "bos": bos, "eot": eot, "default_system": default, "final": final,
        "system": Turn(system_prefix, system_suffix), "user": Turn(user_prefix, user_suffix),
        "assistant": Turn(assistant_prefix, assistant_suffix),
    })()


@hookimpl
def register_chat_templates(register):
    register(TokenizerTemplate())
