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
for every V2/V3/Tekken conversation, so the model trains on the prompt it is served; the Jinja
here (trained and saved) says so in one test, the generation prompt is unchanged, and only rows
with a system prompt differ from the model's own Jinja (``--check-template`` shows them). Tool calls are
``[TOOL_CALLS]`` JSON, results ``[TOOL_RESULTS]``; the templates require call ids of 9 letters or digits (Mistral's tokenizer does), and refuse rows
whose roles do not alternate. Mistral Small 3.x and Devstral (``[SYSTEM_PROMPT]`` turns, a long
default system prompt) train with ``tokenizer`` on the model's own template.
"""

from __future__ import annotations

from typing import Any

from sft.core import hookimpl
from sft.core.templating import Turn, adds_bos

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

    def source(self, tokenizer: Any = None) -> str:
        # The model's Jinja writes the system prompt when `loop.last` (the generation prompt) and drops it
        # from a row that ends with an answer; mistral-common prepends it to the last user message whatever
        # follows. Here the Jinja does what mistral-common does: the same generation prompt, and a training
        # row (and the saved tokenizer) keep the system prompt before their last question.
        text = super().source(tokenizer)
        last = ('{%- set ns_last = namespace(user=-1) %}{%- for m in loop_messages %}{%- if m["role"] == "user" %}'
                '{%- set ns_last.user = loop.index0 %}{%- endif %}{%- endfor %}\n')
        anchor = '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
        test = "{%- if loop.last and system_message is defined %}"
        assert anchor in text and text.count(test) == 1, f"{self.asset} changed"
        return text.replace(anchor, anchor + last).replace(
            test, "{%- if loop.index0 == ns_last.user and system_message is defined %}")

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
