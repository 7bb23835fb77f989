"""The ``tokenizer`` chat template: the model tokenizer's own ``chat_template``.

Training spans come from rendering prefixes of the conversation with the tokenizer's Jinja
(:func:`~sft.plugins.templates.common.jinja_segments`): for assistant turn *i*,
``render(messages[:i], add_generation_prompt=True)`` ends where the answer starts, and the
answer (text, tool calls, reasoning) plus the end-of-turn token that closes it are trained.
The row's tools, tool calls, tool results and reasoning are passed to the Jinja in the OpenAI
schema, as ``apply_chat_template(messages, tools=...)`` receives them. A template that is not
prefix-preserving (a later turn rewrites earlier text), that drops what a turn says, or that
does not close assistant turns with a special token, is refused with a clear error.

The end-of-turn token is found by rendering a probe conversation: the first special token
after the assistant's text (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>`` ...), else eos.
The Ollama template is derived the same way, by rendering sentinel conversations and reading
off each role's prefix and suffix; templates that don't fit that shape are refused.
"""

from __future__ import annotations

from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.errors import SftError
from sft.core.interfaces import ChatTemplate, Message, Segment, tools_of
from sft.core.templating import Turn, TurnTemplate, as_messages, chat_dicts

from .common import jinja_segments

__all__ = ["TokenizerTemplate", "register_chat_templates"]

_U, _A, _U2, _S = "SFTPROBEUSER", "SFTPROBEANSWER", "SFTPROBEUSERTWO", "SFTPROBESYSTEM"


def _apply(tokenizer: Any, messages: Sequence[Message], generation: bool = False) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this model"
        raise SftError(f"template 'tokenizer': the tokenizer of {name} has no chat_template; "
                       f"set template.name to a named template (chatml, llama3, ...)")
    return tokenizer.apply_chat_template(chat_dicts(messages), tools=tools_of(messages) or None,
                                         tokenize=False, add_generation_prompt=generation)


class TokenizerTemplate(ChatTemplate):
    name = "tokenizer"
    version = "2"
    description = "the model tokenizer's own chat_template (trained spans found by rendering prefixes)"

    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        eot = self._probe_eot(tokenizer)
        eos = getattr(tokenizer, "eos_token", None)
        return [eot] + ([eos] if eos and eos != eot else [])

    def _probe_eot(self, tokenizer: Any) -> str:
        text = _apply(tokenizer, [Message("user", _U), Message("assistant", _A)])
        after = text[text.index(_A) + len(_A):]
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        found = [(after.find(t), -len(t), t) for t in specials if t and after.find(t) >= 0]
        if found:
            return min(found)[2]
        eos = getattr(tokenizer, "eos_token", None)
        if eos:
            return eos
        raise SftError("template 'tokenizer': cannot tell which token ends an assistant turn "
                       "(the chat_template puts no special token after the answer and the tokenizer has no eos)")

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        return jinja_segments(self.name, lambda m, g: _apply(tokenizer, m, g), as_messages(messages),
                              self._probe_eot(tokenizer))

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return _apply(tokenizer, as_messages(messages), generation=True)

    def jinja(self, tokenizer: Any = None) -> str:
        _apply(tokenizer, [Message("user", _U)])  # raises the clear error when there is none
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
        probe = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")]
        # Text before the first turn is either a BOS or the start of the system turn; try both readings.
        for bos in dict.fromkeys(["", getattr(tokenizer, "bos_token", None) or ""]):
            try:
                derived = _derive(bos, eot, u, ug, ua, uau, su)
            except ValueError:
                continue
            if all("".join(s.text for s in derived.render(c, tokenizer)) == _apply(tokenizer, c)
                   for c in (probe, [Message("system", "s")] + probe)):
                return derived
        raise SftError("template 'tokenizer': this chat_template is not a fixed prefix/suffix per role, so no "
                       "Ollama template can be derived from it; choose a named template for Ollama export")


def _derive(bos: str, eot: str, u: str, ug: str, ua: str, uau: str, su: str) -> TurnTemplate:
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
        "name": "tokenizer-derived", "bos": bos, "eot": eot, "default_system": default,
        "system": Turn(system_prefix, system_suffix), "user": Turn(user_prefix, user_suffix),
        "assistant": Turn(assistant_prefix, assistant_suffix),
    })()


@hookimpl
def register_chat_templates(register):
    register(TokenizerTemplate())
