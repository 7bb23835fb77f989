"""What the preference objectives share: TRL's trainers fed the rows ``sft`` already tokenized.

TRL's preference trainers tokenize text themselves (``apply_chat_template`` on the prompt, then
on prompt + completion). ``sft`` has done that with the run's template plugin and exact spans
(:mod:`sft.engine.data.preference`), so each trainer here takes those rows as they are:
DPO and KTO skip their ``_prepare_dataset``; the CPO/ORPO trainers' ``tokenize_row`` builds
their columns from the same token ids. The losses, the reference handling and the metrics are
TRL's own.
"""

from __future__ import annotations

import functools
from typing import Any

from sft.core.errors import SftError

__all__ = ["PAIR_METRICS", "pretokenized_dpo", "pretokenized_kto", "pretokenized_cpo", "preference_arguments"]

#: What TRL's pair trainers log each step: mean rewards of the chosen and rejected completions,
#: how often the chosen one wins (accuracy), the mean margin, and the policy's log-probabilities.
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def preference_arguments(setup: Any, config_class: type, **values: Any) -> Any:
    """``config_class`` for ``setup`` with what every preference trainer needs here: rows
    already cut to ``model.max_seq_length`` (the collator cuts a too-long completion's end),
    dropout off as TRL recommends, none of the trainer's own preprocessing processes, and
    batches drawn in length groups as unpacked SFT rows are (``sft``'s seeded sampler): a
    batch of pairs pads every row to its longest, and on chat data of every length a random
    batch is mostly padding. ``values`` may say otherwise (KTO's KL estimate needs its order)."""
    return setup.arguments(config_class, **{
        "max_length": int(setup.config.model.max_seq_length), "remove_unused_columns": False,
        "dataset_num_proc": None, "train_sampling_strategy": "group_by_length", **values})


def _check_columns(dataset: Any, needed: tuple[str, ...], trainer: str) -> None:
    missing = [c for c in needed if c not in (dataset.column_names or ())]
    if missing:
        raise SftError(f"{trainer} needs the columns {', '.join(needed)} that sft's preference data has; "
                       f"this dataset lacks {', '.join(missing)}")


@functools.lru_cache(maxsize=None)
def pretokenized_dpo(guarded: type) -> type:
    """``guarded`` (a guarded ``trl.DPOTrainer``) taking ``prompt_ids``/``chosen_ids``/``rejected_ids`` as they are."""

    class PretokenizedDPO(guarded):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            _check_columns(dataset, ("prompt_ids", "chosen_ids", "rejected_ids"), "DPO")
            return dataset

    return PretokenizedDPO


@functools.lru_cache(maxsize=None)
def pretokenized_kto(guarded: type) -> type:
    """``guarded`` (a guarded ``trl.KTOTrainer``) taking ``prompt_ids``/``completion_ids``/``label`` as they are."""

    class PretokenizedKTO(guarded):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            _check_columns(dataset, ("prompt_ids", "completion_ids", "label"), "KTO")
            if not self.calculate_KL:
                return dataset
            batch = args.per_device_train_batch_size

            # TRL's own KL estimate (kto_trainer._prepare_dataset): each batch's completions rotated by
            # one, so every prompt is paired with another row's completion of the same batch.
            def rotated(examples):
                examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
                return examples

            return dataset.map(rotated, batched=True, batch_size=batch)

    return PretokenizedKTO


@functools.lru_cache(maxsize=None)
def pretokenized_cpo(guarded: type) -> type:
    """``guarded`` (a guarded CPO or ORPO trainer of ``trl.experimental``) whose ``tokenize_row`` builds
    its columns from ``prompt_ids``/``chosen_ids``/``rejected_ids``: each completion after the prompt,
    labels only on the completion, a too-long completion cut at its end as TRL does."""

    class PretokenizedCPO(guarded):  # type: ignore[misc, valid-type]
        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_ids"])
            row: dict[str, Any] = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            room = max(self.max_length - len(prompt), 0)
            for side in ("chosen", "rejected"):
                completion = list(feature[f"{side}_ids"])[:room]
                row[f"{side}_input_ids"] = prompt + completion
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
                row[f"{side}_labels"] = [-100] * len(prompt) + completion
            return row

    return PretokenizedCPO
