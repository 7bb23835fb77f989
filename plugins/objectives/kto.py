"""The ``kto`` objective: Kahneman-Tversky Optimization on completions labelled desirable or not (TRL's ``KTOTrainer``).

The reference is as for ``dpo``: a continued run's model (a frozen copy of its adapter), else the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.interfaces import Objective, TrainerSetup

from .common import preference_arguments, pretokenized_kto

__all__ = ["KTO", "KTOOptions", "register_objectives"]


@dataclass
class KTOOptions:
    beta: float = opt(0.1, "How far the policy may move from the reference (TRL's beta).", gt=0)
    loss_type: str = opt("kto", "TRL's KTO loss: kto, or apo_zero_unpaired.", ["kto", "apo_zero_unpaired"])
    desirable_weight: float = opt(1.0, "Weight of the desirable rows' loss (raise it when they are fewer).", gt=0)
    undesirable_weight: float = opt(1.0, "Weight of the undesirable rows' loss.", gt=0)


class KTO(Objective):
    name = "kto"
    description = "Kahneman-Tversky Optimization on completions labelled desirable or not (TRL's KTOTrainer)"
    options = KTOOptions
    row_kind = "labelled"
    uses_reference = True
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")

    def build_trainer(self, setup: TrainerSetup, options: Any = None) -> Any:
        from trl import KTOConfig, KTOTrainer

        o: KTOOptions = options or KTOOptions()
        # The KL estimate pairs each prompt with another completion of its batch, in order.
        args = preference_arguments(setup, KTOConfig, beta=o.beta, loss_type=o.loss_type,
                                    desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight,
                                    train_sampling_strategy="sequential" if o.loss_type == "kto" else "random")
        return pretokenized_kto(setup.trainer_class(KTOTrainer))(
            model=setup.model, args=args, train_dataset=setup.data.train, eval_dataset=setup.data.eval,
            processing_class=setup.tokenizer, callbacks=setup.callbacks)


@hookimpl
def register_objectives(register):
    register(KTO())
