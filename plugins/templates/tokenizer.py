"""The ``tokenizer`` chat template: the model tokenizer's own ``chat_template``.

Training spans come from rendering prefixes of the conversation with the tokenizer's Jinja:
for assistant turn *i*, ``render(messages[:i], add_generation_prompt=True)`` ends where the
answer starts, and the answer's content plus the end-of-turn token that follows it are
trained. A template that is not prefix-preserving (a later turn rewrites earlier text), or
that does not close assistant turns with a special token, is refused with a clear error.

The end-of-turn token is found by rendering a probe conversation: the first special token
after the assistant's text (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>`` ...), else eos.
The Ollama template is derived the same way, by rendering sentinel conversations and reading
off each role's prefix and suffix; templates that don't fit that shape are refused.
"""

from __future__ import annotations

from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.errors import SftError
from sft.core.interfaces import ChatTemplate, Message, Segment
from sft.core.templating import Turn, TurnTemplate, as_messages

__all__ = ["TokenizerTemplate", "register_chat_templates"]

_U, _A, _U2, _S = "SFTPROBEUSER", "SFTPROBEANSWER", "SFTPROBEUSERTWO", "SFTPROBESYSTEM"


def _apply(tokenizer: Any, messages: Sequence[Message], generation: bool = False) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this model"
        raise SftError(f"template 'tokenizer': the tokenizer of {name} has no chat_template; "
                       f"set template.name to a named template (chatml, llama3, ...)")
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=generation)


class TokenizerTemplate(ChatTemplate):
    name = "tokenizer"
    version = "1"
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
        messages = as_messages(messages)
        full = _apply(tokenizer, messages)
        eot = self._probe_eot(tokenizer)
        eos = getattr(tokenizer, "eos_token", None)

        def still_open(text: str) -> str:
            # Some templates end the whole conversation with eos (Phi-3.5: "<|end|>\n<|endoftext|>");
            # a conversation cut after turn i is then prefix-preserving once that last eos is set aside.
            return text[: -len(eos)] if eos and eos != eot and text.endswith(eos) else text

        segments: list[Segment] = []
        pos = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = _apply(tokenizer, messages[:i], generation=True)
            upto = still_open(_apply(tokenizer, messages[: i + 1]))
            if not (upto.startswith(before) and full.startswith(upto)) or len(before) < pos:
                raise SftError(f"template 'tokenizer': the chat_template is not prefix-preserving at turn {i} "
                               f"(rendering more turns changes earlier text), so trained spans cannot be found; "
                               f"choose a named template")
            start = upto.find(message.content, len(before))
            if start < 0:
                raise SftError(f"template 'tokenizer': the chat_template changes the text of assistant turn {i} "
                               f"(e.g. strips it), so its span cannot be found; choose a named template")
            end = upto.find(eot, start + len(message.content))
            if end < 0:
                raise SftError(f"template 'tokenizer': the chat_template does not end assistant turn {i} with "
                               f"{eot!r}, so the model could never learn to stop; choose a named template")
            end += len(eot)
            segments.append(Segment(full[pos:start], False))
            segments.append(Segment(full[start:end], True))
            pos = end
        segments.append(Segment(full[pos:], False))
        return [s for s in segments if s.text]

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
