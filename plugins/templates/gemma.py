"""The ``gemma`` chat template: Gemma 2 / Gemma 3 ``<start_of_turn>role`` ... ``<end_of_turn>`` turns.

::

    <bos><start_of_turn>user
    {system}

    {user}<end_of_turn>
    <start_of_turn>model
    {assistant}<end_of_turn>

The assistant's role is ``model``. Gemma has **no system role**: a system turn joins the first
user turn, followed by a blank line, as Gemma's own chat template does it
(:mod:`.first_user_system`). ``<end_of_turn>`` ends a turn and is trained after every answer,
so the model learns to stop (axolotl#3754: when it is not trained the loss looks fine and the
model never stops); ``<eos>`` also stops generation.
"""

from __future__ import annotations

from sft.core import hookimpl
from sft.core.templating import Turn

from .first_user_system import FirstUserSystemTemplate

__all__ = ["Gemma", "register_chat_templates"]


class Gemma(FirstUserSystemTemplate):
    name = "gemma"
    version = "1"
    description = "Gemma 2/3: <start_of_turn>user|model ... <end_of_turn>; a system turn joins the first user turn"

    bos = "<bos>"
    user = Turn("<start_of_turn>user\n", "<end_of_turn>\n")
    assistant = Turn("<start_of_turn>model\n", "\n")
    eot = "<end_of_turn>"
    extra_stops = ("<eos>",)


@hookimpl
def register_chat_templates(register):
    register(Gemma())
