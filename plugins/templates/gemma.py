"""The ``gemma`` chat template: Gemma 2 / Gemma 3 ``<start_of_turn>role`` ... ``<end_of_turn>`` turns.

::

    <bos><start_of_turn>user
    {system}

    {user}<end_of_turn>
    <start_of_turn>model
    {assistant}<end_of_turn>

The assistant's role is ``model``. Gemma has **no system role**: a system turn joins the first
user turn, followed by a blank line, as Gemma's own chat template does it
(:mod:`.first_user_system`); contents are trimmed, as Gemma's template does. Gemma 2's own
template refuses a system turn ("System role not supported"): on a tokenizer carrying it, such
rows are refused too, rather than trained in a shape Gemma 2 never sees. ``<end_of_turn>`` ends a turn and is trained after every answer,
so the model learns to stop (axolotl#3754: when it is not trained the loss looks fine and the
model never stops); ``<eos>`` also stops generation.
"""

from __future__ import annotations

from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.errors import SftError
from sft.core.interfaces import Message, Segment
from sft.core.templating import Turn, as_messages

from .first_user_system import FirstUserSystemTemplate

__all__ = ["Gemma", "register_chat_templates"]


class Gemma(FirstUserSystemTemplate):
    name = "gemma"
    version = "2"
    description = "Gemma 2/3: <start_of_turn>user|model ... <end_of_turn>; a system turn joins the first user turn"

    bos = "<bos>"
    user = Turn("<start_of_turn>user\n", "<end_of_turn>\n")
    assistant = Turn("<start_of_turn>model\n", "\n")
    eot = "<end_of_turn>"
    extra_stops = ("<eos>",)
    trim = True

    def render(self, messages: Sequence[Message], tokenizer: Any = None) -> list[Segment]:
        messages = as_messages(messages)
        if _refuses_system(tokenizer) and any(m.role == "system" for m in messages):
            raise SftError("chat template 'gemma': this model's own template (Gemma 2's) has no system role and "
                           f"refuses a system turn ({_REFUSAL!r}); drop the row's system prompt, or train a Gemma 3 "
                           "model")
        return super().render(messages, tokenizer)

    def jinja(self, tokenizer: Any = None) -> str:
        # The saved tokenizer refuses what training refused (and keeps telling the next render so).
        refuse = ("{% if messages and messages[0]['role'] == 'system' %}{{ raise_exception('" + _REFUSAL
                  + "') }}{% endif %}") if _refuses_system(tokenizer) else ""
        return refuse + super().jinja(tokenizer)


#: What Gemma 2's template raises for a system turn.
_REFUSAL = "System role not supported"


def _refuses_system(tokenizer: Any) -> bool:
    """True when the tokenizer's chat_template is Gemma 2's (or one saved from it), which refuses system turns."""
    own = getattr(tokenizer, "chat_template", None)
    return isinstance(own, str) and _REFUSAL in own


@hookimpl
def register_chat_templates(register):
    register(Gemma())
