"""The ``sft`` objective: supervised fine-tuning on conversations (the default)."""

from __future__ import annotations

from typing import Any

from sft.core import hookimpl
from sft.core.interfaces import Objective, TrainerSetup

__all__ = ["Supervised", "register_objectives"]


class Supervised(Objective):
    name = "sft"
    description = "Supervised fine-tuning: the assistant turns of conversations (TRL's SFTTrainer)"
    row_kind = "conversation"

    def build_trainer(self, setup: TrainerSetup, options: Any = None) -> Any:
        from sft.engine.trainer import build_trainer

        return build_trainer(setup.config, setup.model, setup.tokenizer, setup.data, setup.env, setup.output_dir,
                             trained_positions_loss=setup.backend.trained_positions_loss, callbacks=setup.callbacks)


@hookimpl
def register_objectives(register):
    register(Supervised())
