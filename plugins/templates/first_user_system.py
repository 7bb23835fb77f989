"""Templates of families without a system role: a system turn joins the first user turn.

Gemma and the ``[INST]`` Mistral formats have no system turn. Their own chat templates put the
system text at the start of the first user message, followed by a blank line; the templates
here do the same in all three renderings (training text, Jinja, Ollama), so a conversation
with a system turn trains and generates alike. A system turn anywhere but first, or one not
followed by a user turn, is refused: the format has no place for it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Sequence

from sft.core.errors import SftError
from sft.core.interfaces import Message, Segment
from sft.core.templating import TurnTemplate, as_messages, end_of_turn

__all__ = ["FirstUserSystemTemplate"]


def _lit(text: str) -> str:
    return json.dumps(text)


class FirstUserSystemTemplate(TurnTemplate):
    """A :class:`TurnTemplate` whose leading system turn is folded into the first user turn."""

    #: Between the system text and the first user message.
    system_separator: ClassVar[str] = "\n\n"

    def _fold(self, messages: Sequence[Message]) -> list[Message]:
        messages = as_messages(messages)
        if any(m.role == "system" for m in messages[1:]):
            raise SftError(f"chat template '{self.name}' has no system role; only a first system turn can be "
                           f"folded into the first user turn")
        if messages and messages[0].role == "system":
            if len(messages) < 2 or messages[1].role != "user":
                raise SftError(f"chat template '{self.name}' has no system role: a system turn must be followed by "
                               f"a user turn, which it joins")
            # The user's text is trimmed before the system text joins it (Gemma 3's template trims the
            # message, not the system prefix), so the folded turn is not trimmed again.
            user = TurnTemplate._trimmed(self, messages[1:2])[0]
            first = Message("user", messages[0].content + self.system_separator + user.content)
            return [first, *TurnTemplate._trimmed(self, messages[2:])]
        return list(TurnTemplate._trimmed(self, messages))

    def _trimmed(self, messages: Sequence[Message]) -> Sequence[Message]:
        # _fold has trimmed what is to be trimmed; the base class must not trim the folded turn.
        return messages

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        return super().render(self._fold(messages), tokenizer)

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return super().generation_prompt(self._fold(messages), tokenizer)

    def jinja(self, tokenizer: Any = None) -> str:
        eot = end_of_turn(self, tokenizer)
        u, a = self.user, self.assistant
        content = "(message['content'] | trim)" if self.trim else "message['content']"
        return (
            ("{{ " + _lit(self.bos) + " }}" if self.bos else "")
            + "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system_text = messages[0]['content'] + " + _lit(self.system_separator) + " %}"
            "{% set loop_messages = messages[1:] %}"
            "{% else %}{% set system_text = '' %}{% set loop_messages = messages %}{% endif %}"
            "{% for message in loop_messages %}"
            "{% if message['role'] == 'user' %}{{ " + _lit(u.prefix) + " + (system_text if loop.first else '')"
            " + " + content + " + " + _lit(u.suffix) + " }}"
            "{% elif message['role'] == 'assistant' %}{{ " + _lit(a.prefix) + " + " + content + " + "
            + _lit(eot + a.suffix) + " }}"
            "{% else %}{{ raise_exception('" + self.name + " has no ' + message['role'] + ' role here') }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ " + _lit(a.prefix) + " }}{% endif %}"
        )

    def ollama_template(self, tokenizer: Any = None) -> str:
        """Ollama's Go template: ``.System`` opens the first user message (index 0, or 1 after a system message)."""
        eot = end_of_turn(self, tokenizer)
        u, a = self.user, self.assistant
        return (
            self.ollama_bos(tokenizer) + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            '{{ if eq .Role "user" }}' + u.prefix
            + "{{ if and $.System (or (eq $i 0) (eq $i 1)) }}{{ $.System }}" + self.system_separator + "{{ end }}"
            + "{{ .Content }}" + u.suffix + "{{ if $last }}" + a.prefix + "{{ end }}"
            '{{ else if eq .Role "assistant" }}' + a.prefix + "{{ .Content }}"
            + "{{ if not $last }}" + eot + a.suffix + "{{ end }}"
            "{{ end }}{{ end }}"
        )
