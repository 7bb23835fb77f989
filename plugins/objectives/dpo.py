"""The ``dpo`` objective: Direct Preference Optimization on pairs, with TRL's ``DPOTrainer``.

The reference model is the model training starts from, held without a second copy of the base:
continuing a run (``model.from_run``), TRL copies that run's adapter into a frozen ``ref``
adapter on the same base; from a base model, the reference is the base (adapters disabled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.interfaces import Objective, TrainerSetup

from .common import PAIR_METRICS, preference_arguments, pretokenized_dpo

__all__ = ["DPO", "DPOOptions", "register_objectives"]

#: TRL 1.14's DPO losses (DPOConfig.loss_type).
DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@dataclass
class DPOOptions:
    beta: float = opt(0.1, "How far the policy may move from the reference (TRL's beta; higher: closer).", gt=0)
    loss_type: str = opt("sigmoid", "TRL's DPO loss: sigmoid (the paper's), ipo, hinge, robust, apo_zero, ...", DPO_LOSSES)
    label_smoothing: float = opt(0.0, "Assumed fraction of flipped preference labels (cDPO, robust).", ge=0, lt=0.5)
    precompute_ref_log_probs: bool = opt(False, "Score the reference once before training instead of at every step (faster; the reference's log-probs are then fixed).")


class DPO(Objective):
    name = "dpo"
    description = "Direct Preference Optimization on chosen/rejected pairs (TRL's DPOTrainer)"
    options = DPOOptions
    row_kind = "pair"
    uses_reference = True
    metrics = PAIR_METRICS

    def build_trainer(self, setup: TrainerSetup, options: Any = None) -> Any:
        from trl import DPOConfig, DPOTrainer

        o: DPOOptions = options or DPOOptions()
        args = preference_arguments(setup, DPOConfig, beta=o.beta, loss_type=[o.loss_type],
                                    label_smoothing=o.label_smoothing,
                                    precompute_ref_log_probs=o.precompute_ref_log_probs)
        return pretokenized_dpo(setup.trainer_class(DPOTrainer))(
            model=setup.model, args=args, train_dataset=setup.data.train, eval_dataset=setup.data.eval,
            processing_class=setup.tokenizer, callbacks=setup.callbacks)


@hookimpl
def register_objectives(register):
    register(DPO())
