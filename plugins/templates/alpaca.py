"""The ``alpaca`` chat template: the Stanford Alpaca prompt, as in the TinyLlama fine-tuning article.

::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {user}

    ### Response:
    {assistant}</s>

The end of an answer is the tokenizer's own eos token (``</s>`` for Llama/TinyLlama,
``<|im_end|>`` for SmolLM2). A system message replaces the preamble. Later turns repeat the
Instruction/Response pair, so multi-turn conversations render too.
"""

from __future__ import annotations

from sft.core import hookimpl
from sft.core.templating import Turn, TurnTemplate

__all__ = ["AlpacaTemplate", "PREAMBLE", "register_chat_templates"]

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


class AlpacaTemplate(TurnTemplate):
    name = "alpaca"
    version = "1"
    description = "Alpaca: ### Instruction: / ### Response:, ended by the tokenizer's eos"

    system = Turn("", "\n\n")
    user = Turn("### Instruction:\n", "\n\n")
    assistant = Turn("### Response:\n", "\n\n")
    default_system = PREAMBLE
    eot = None  # the tokenizer's eos token


@hookimpl
def register_chat_templates(register):
    register(AlpacaTemplate())
