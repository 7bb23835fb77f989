"""The Mistral chat templates: ``mistral`` (v0.1/v0.2 ``[INST]`` turns), ``mistral-v3`` and ``mistral-nemo``.

``mistral`` is the v0.1/v0.2 and Mixtral format::

    <s>[INST] {system}

    {user} [/INST]{assistant}</s>[INST] {user} [/INST]{assistant}</s>

``</s>`` ends an answer and is trained. The ``[INST]`` formats have no system role: a system
turn joins the first user turn, followed by a blank line (:mod:`.first_user_system`), which is
what Mistral's own v0.1/v0.2 templates expect users to do by hand. The answer follows
``[/INST]`` directly: a SentencePiece vocabulary puts the word boundary (``▁``) on the answer's
first token, so the generation prompt ends exactly where training text continues.

``mistral-v3`` (Mistral-7B-Instruct-v0.3, Mixtral v0.3 checkpoints) and ``mistral-nemo``
(Mistral-Nemo-Instruct-2407) are those models' own ``chat_template`` (``assets/``), rendered by
transformers, so their text is what ``apply_chat_template`` writes and ``--check-template``
agrees: v0.3 writes ``[INST] Hi[/INST] Hello</s>`` (the answer's leading space is the model's),
Nemo ``[INST]Hi[/INST]Hello</s>``, and both put the system prompt (and the tool list) before the
*last* user turn only. Their Jinja writes the system prompt only when that turn ends the
conversation (the generation prompt) and drops it from a row that ends with an answer; here a
training row gets it before its last user turn, as Mistral's own tokenizer (mistral-common) does
for every V2/V3/Tekken conversation, so the model trains on the prompt it is served. Only those
rows differ from the model's Jinja (``--check-template`` shows them). Tool calls are
``[TOOL_CALLS]`` JSON, results ``[TOOL_RESULTS]``; the templates require call ids of 9 letters or digits (Mistral's tokenizer does), and refuse rows
whose roles do not alternate. Mistral Small 3.x and Devstral (``[SYSTEM_PROMPT]`` turns, a long
default system prompt) train with ``tokenizer`` on the model's own template.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.interfaces import Message, Segment, tools_of
from sft.core.templating import Turn, adds_bos, as_messages

from .common import JinjaTemplate
from .first_user_system import FirstUserSystemTemplate

__all__ = ["Mistral", "MistralV3", "MistralNemo", "register_chat_templates"]


class Mistral(FirstUserSystemTemplate):
    name = "mistral"
    version = "1"
    description = "Mistral Instruct: [INST] user [/INST]answer</s>; a system turn joins the first user turn"

    bos = "<s>"
    user = Turn("[INST] ", " [/INST]")
    assistant = Turn("")
    eot = "</s>"


class _MistralJinja(JinjaTemplate):
    """A Mistral model's own template; the Ollama TEMPLATE writes the same text for conversations without tools."""

    eot = "</s>"
    bos = "<s>"
    #: What opens a user turn and what comes before an answer (v0.3: "[INST] ", " ").
    inst: str
    answer_space: str

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        return super().render(system_in_last_question(as_messages(messages)), tokenizer)

    def ollama_template(self, tokenizer: Any = None) -> str:
        # The Jinja writes the tokenizer's bos_token as text; llama.cpp adds it only when the GGUF says
        # add_bos_token, else the TEMPLATE writes it, as training did.
        bos = "" if tokenizer is None or adds_bos(tokenizer) else (getattr(tokenizer, "bos_token", None) or "")
        # The system prompt goes before the last user turn (the one Ollama's prompt ends with).
        return (bos + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                '{{ if eq .Role "user" }}' + self.inst + "{{ if and $.System $last }}{{ $.System }}\n\n{{ end }}"
                "{{ .Content }}[/INST]"
                '{{ else if eq .Role "assistant" }}' + self.answer_space + "{{ .Content }}{{ if not $last }}</s>{{ end }}"
                "{{ end }}{{ end }}")


def system_in_last_question(messages: Sequence[Message]) -> Sequence[Message]:
    """A leading system prompt joined to the last user turn, as the Jinja joins it to a final one.

    The model's Jinja tests ``loop.last``, so a row that ends with an answer would train without
    its system prompt; mistral-common prepends it to the last user message whatever follows.
    """
    questions = [i for i, m in enumerate(messages) if m.role == "user"]
    if not messages or messages[0].role != "system" or not questions or questions[-1] == len(messages) - 1:
        return messages
    last = questions[-1]
    joined = replace(messages[last], content=messages[0].content + "\n\n" + messages[last].content)
    return as_messages([*messages[1:last], joined, *messages[last + 1:]], tools_of(messages))


class MistralV3(_MistralJinja):
    name = "mistral-v3"
    version = "2"
    description = "Mistral-7B-Instruct-v0.3's own template: [INST] Hi[/INST] Hello</s>, system before the last user turn"
    asset = "mistral-v0.3.jinja"
    inst = "[INST] "
    answer_space = " "


class MistralNemo(_MistralJinja):
    name = "mistral-nemo"
    version = "2"
    description = "Mistral-Nemo-Instruct-2407's own template: [INST]Hi[/INST]Hello</s>, system before the last user turn"
    asset = "mistral-nemo.jinja"
    inst = "[INST]"
    answer_space = ""


@hookimpl
def register_chat_templates(register):
    register(Mistral())
    register(MistralV3())
    register(MistralNemo())
