"""The ``vicuna`` chat template (Vicuna v1.1, as FastChat writes it)::

    {system} USER: {user} ASSISTANT: {assistant}{eos}USER: {user} ASSISTANT:

The end of an assistant turn is the tokenizer's own ``eos_token`` (``</s>`` on Llama 2, for
example), as in Vicuna's training; the template trains it after every assistant turn, so a
fine-tuned model stops. A conversation without a system turn gets Vicuna's default system prompt.

The trained text of an assistant turn is ``" " + content + eos``: the space that separates
``ASSISTANT:`` from the answer belongs to the answer's first token in BPE vocabularies, and
the generation prompt therefore ends in ``ASSISTANT:`` with no space (as FastChat's does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from sft.core import ChatTemplate, Message, Segment, SftError, hookimpl
from sft.core.config import opt
from sft.core.templating import as_messages, segments_text

__all__ = ["VicunaTemplate", "VicunaOptions", "DEFAULT_SYSTEM", "register_chat_templates"]

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: The end of turn when the tokenizer has no ``eos_token`` (or no tokenizer is given).
FALLBACK_EOS = "</s>"


@dataclass
class VicunaOptions:
    system_prompt: str = opt(DEFAULT_SYSTEM, "The system prompt used when a conversation has no system turn.")


def _eos(tokenizer: Any) -> str:
    return getattr(tokenizer, "eos_token", None) or FALLBACK_EOS


class VicunaTemplate(ChatTemplate):
    """Vicuna v1.1: ``USER:``/``ASSISTANT:`` turns after a system line, each answer ending in EOS."""

    name = "vicuna"
    version = "1"
    description = "Vicuna v1.1: '<system> USER: ... ASSISTANT: ...</s>'; trains the tokenizer's EOS after each answer."
    options = VicunaOptions

    def __init__(self, options: VicunaOptions | None = None) -> None:
        # One instance is registered and shared; for a run, the core calls configure() with
        # the config's template.vicuna options and uses the copy it returns.
        self.system_prompt = (options or VicunaOptions()).system_prompt

    def configure(self, options: VicunaOptions | None) -> "VicunaTemplate":
        """A copy of this template with ``options`` applied."""
        return VicunaTemplate(options)

    def _split_system(self, messages: Sequence[Message]) -> tuple[str, Sequence[Message]]:
        if messages and messages[0].role == "system":
            return messages[0].content, messages[1:]
        return self.system_prompt, messages

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        system, turns = self._split_system(as_messages(messages))
        eos = _eos(tokenizer)
        segments = [Segment(f"{system} ", False)]
        for message in turns:
            if message.role == "user":
                segments.append(Segment(f"USER: {message.content} ", False))
            elif message.role == "assistant":
                segments.append(Segment("ASSISTANT:", False))
                segments.append(Segment(f" {message.content}{eos}", True))
            else:
                raise SftError(f"chat template 'vicuna': a {message.role} turn can only come first")
        return _merge(segments)

    def generation_prompt(self, messages: Sequence[Message], tokenizer: Any = None) -> str:
        return segments_text(self.render(messages, tokenizer)) + "ASSISTANT:"

    def stop_tokens(self, tokenizer: Any = None) -> list[str]:
        # "USER:" as well: a model that has not learnt EOS yet still stops at the next turn.
        return [_eos(tokenizer), "USER:"]

    def jinja(self, tokenizer: Any = None) -> str:
        # eos_token is a variable of every HF chat-template render; the default system prompt
        # is a Jinja string literal (json.dumps gives a valid double-quoted one).
        return (
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
            "{% else %}{% set system = " + json.dumps(self.system_prompt) + " %}{% set turns = messages %}{% endif %}"
            "{{ system + ' ' }}"
            "{% for message in turns %}"
            "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
            "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        )

    def ollama_template(self, tokenizer: Any = None) -> str:
        # Walks .Messages like the bundled templates: a last user message is followed by the
        # generation prompt; a last assistant message gets no EOS, so a prefilled answer continues.
        eos = _eos(tokenizer)
        return (
            "{{ if .System }}{{ .System }}{{ else }}" + self.system_prompt + "{{ end }} "
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            '{{ if eq .Role "user" }}USER: {{ .Content }} {{ if $last }}ASSISTANT:{{ end }}'
            '{{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}{{ if not $last }}' + eos + "{{ end }}"
            "{{ end }}{{ end }}"
        )


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours with the same ``trained`` flag, so the segments are as few as possible."""
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].trained == segment.trained:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trained)
        else:
            merged.append(segment)
    return merged


@hookimpl
def register_chat_templates(register) -> None:
    register(VicunaTemplate())
