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

import os
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
        segments: list[Segment] = []
        pos = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = _apply(tokenizer, messages[:i], generation=True)
            upto = _apply(tokenizer, messages[: i + 1])
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
        try:
            user_suffix = u[u.index(_U) + len(_U):]
            assistant_prefix = ug[len(u):]
            assistant_suffix = ua[ua.index(_A) + len(_A) + len(eot):]
            user_prefix = uau[len(ua):uau.index(_U2)]
            head = u[: u.index(_U) - len(user_prefix)]
            system_part = su[: su.index(_U) - len(user_prefix)]
            bos = os.path.commonprefix([head, system_part[: system_part.index(_S)]])
            system_prefix = system_part[len(bos): system_part.index(_S)]
            system_suffix = system_part[system_part.index(_S) + len(_S):]
            default = head[len(bos):]
            if default:
                if not (default.startswith(system_prefix) and default.endswith(system_suffix)):
                    raise ValueError("default system prompt")
                default = default[len(system_prefix): len(default) - len(system_suffix)]
        except ValueError:
            default = None
            bos = None
        derived = type("DerivedTurns", (TurnTemplate,), {
            "name": "tokenizer-derived", "bos": bos or "", "eot": eot,
            "system": Turn(system_prefix, system_suffix) if bos is not None else Turn(""),
            "user": Turn(user_prefix, user_suffix) if bos is not None else Turn(""),
            "assistant": Turn(assistant_prefix, assistant_suffix) if bos is not None else Turn(""),
            "default_system": default or None,
        })()
        probe = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")]
        for conversation in (probe, [Message("system", "s")] + probe):
            mine = "".join(s.text for s in derived.render(conversation, tokenizer))
            if bos is None or mine != _apply(tokenizer, conversation):
                raise SftError("template 'tokenizer': this chat_template is not a fixed prefix/suffix per role, so no "
                               "Ollama template can be derived from it; choose a named template for Ollama export")
        return derived


@hookimpl
def register_chat_templates(register):
    register(TokenizerTemplate())
