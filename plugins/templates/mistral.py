"""The ``mistral`` chat template: Mistral / Mixtral Instruct ``[INST]`` turns.

::

    <s>[INST] {system}

    {user} [/INST]{assistant}</s>[INST] {user} [/INST]{assistant}</s>

``</s>`` ends an answer and is trained. The ``[INST]`` formats have no system role: a system
turn joins the first user turn, followed by a blank line (:mod:`.first_user_system`), which is
what Mistral's own v0.1/v0.2 templates expect users to do by hand. The answer follows
``[/INST]`` directly: a SentencePiece vocabulary puts the word boundary (``▁``) on the answer's
first token, so the generation prompt ends exactly where training text continues.
"""

from __future__ import annotations

from sft.core import hookimpl
from sft.core.templating import Turn

from .first_user_system import FirstUserSystemTemplate

__all__ = ["Mistral", "register_chat_templates"]


class Mistral(FirstUserSystemTemplate):
    name = "mistral"
    version = "1"
    description = "Mistral Instruct: [INST] user [/INST]answer</s>; a system turn joins the first user turn"

    bos = "<s>"
    user = Turn("[INST] ", " [/INST]")
    assistant = Turn("")
    eot = "</s>"


@hookimpl
def register_chat_templates(register):
    register(Mistral())
