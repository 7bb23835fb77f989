"""The ``orpo`` objective: Odds Ratio Preference Optimization (TRL's ``ORPOTrainer``): the chosen
answer's likelihood plus an odds-ratio penalty on the rejected one, no reference model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.interfaces import Objective, TrainerSetup

from .common import PAIR_METRICS, preference_arguments, pretokenized_cpo

__all__ = ["ORPO", "ORPOOptions", "register_objectives"]


@dataclass
class ORPOOptions:
    beta: float = opt(0.1, "Weight of the odds-ratio term against the chosen answer's likelihood (the paper's lambda).", gt=0)


class ORPO(Objective):
    name = "orpo"
    description = "ORPO: supervised loss on chosen + odds-ratio penalty on rejected, no reference (TRL's ORPOTrainer)"
    options = ORPOOptions
    row_kind = "pair"
    metrics = PAIR_METRICS + ("nll_loss", "log_odds_ratio")

    def build_trainer(self, setup: TrainerSetup, options: Any = None) -> Any:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        o: ORPOOptions = options or ORPOOptions()
        args = preference_arguments(setup, ORPOConfig, beta=o.beta)
        return pretokenized_cpo(setup.trainer_class(ORPOTrainer))(
            model=setup.model, args=args, train_dataset=setup.data.train, eval_dataset=setup.data.eval,
            processing_class=setup.tokenizer, callbacks=setup.callbacks)


@hookimpl
def register_objectives(register):
    register(ORPO())
