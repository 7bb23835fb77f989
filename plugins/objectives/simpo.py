"""The ``simpo`` objective: SimPO, length-normalised rewards with a target margin and no reference
model (TRL's ``CPOTrainer`` with ``loss_type="simpo"`` and ``cpo_alpha=0``, as TRL documents SimPO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.interfaces import Objective, TrainerSetup

from .common import PAIR_METRICS, preference_arguments, pretokenized_cpo

__all__ = ["SimPO", "SimPOOptions", "register_objectives"]


@dataclass
class SimPOOptions:
    beta: float = opt(2.0, "Scale of the length-normalised reward (the paper uses 2.0-2.5).", gt=0)
    gamma: float = opt(0.5, "Target reward margin between chosen and rejected (TRL's simpo_gamma).", ge=0)
    cpo_alpha: float = opt(0.0, "Weight of an added supervised loss on chosen (0: pure SimPO; >0: CPO-SimPO).", ge=0)


class SimPO(Objective):
    name = "simpo"
    description = "SimPO: length-normalised preference loss with a margin, no reference (TRL's CPOTrainer)"
    options = SimPOOptions
    row_kind = "pair"
    metrics = PAIR_METRICS

    def build_trainer(self, setup: TrainerSetup, options: Any = None) -> Any:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        o: SimPOOptions = options or SimPOOptions()
        args = preference_arguments(setup, CPOConfig, loss_type="simpo", beta=o.beta, simpo_gamma=o.gamma,
                                    cpo_alpha=o.cpo_alpha)
        return pretokenized_cpo(setup.trainer_class(CPOTrainer))(
            model=setup.model, args=args, train_dataset=setup.data.train, eval_dataset=setup.data.eval,
            processing_class=setup.tokenizer, callbacks=setup.callbacks)


@hookimpl
def register_objectives(register):
    register(SimPO())
