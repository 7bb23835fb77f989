"""How training batches are built from the tokenized rows: packed, or padded in length groups.

Every backend trains on the same batches, so this lives in core:

- :func:`decide_packing` resolves ``training.packing`` (``auto``, ``true``, ``false``) against
  the data: ``auto`` packs when rows are much shorter than ``model.max_seq_length`` and there
  are enough of them that packing still leaves real optimizer steps. TRL then packs whole rows
  into sequences of ``max_seq_length`` tokens (best-fit decreasing) and the collator flattens
  a batch into one row whose ``position_ids`` restart at every document; attention keeps the
  documents apart (transformers' SDPA/eager mask from the position ids, Unsloth's varlen
  kernel), which ``tests/test_packing.py`` checks token by token.
- :func:`length_grouped_sampler`: without packing, each optimizer step's rows are drawn
  from a shuffled pool sorted by length, so a batch pads to a length close to each of its rows
  (transformers' ``LengthGroupedSampler`` grouping, seeded by ``training.seed`` and the epoch,
  so an order is the same on every run and after a resume).
- :func:`real_tokens`: the non-padding tokens of a collated batch, which is what
  ``summary.json``, the console and W&B count.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["PackingDecision", "decide_packing", "length_grouped_sampler", "real_tokens",
           "AUTO_MAX_FILL", "AUTO_MIN_STEPS"]

#: ``auto`` packs when the mean row fills at most this fraction of ``max_seq_length`` (a packed
#: sequence then holds two rows or more on average).
AUTO_MAX_FILL = 0.5
#: ... and when the packed rows still make at least this many optimizer steps an epoch (packing
#: 60 short rows into one sequence would leave a run of 4 epochs with 4 steps).
AUTO_MIN_STEPS = 10


@dataclass(frozen=True)
class PackingDecision:
    pack: bool
    reason: str

    def describe(self) -> str:
        return f"training.packing: {'packing' if self.pack else 'not packing'} ({self.reason})"


def decide_packing(setting: Any, stats: Mapping[str, Any], max_seq_length: int, batch_size: int,
                   accumulation: int) -> PackingDecision:
    """Resolve ``training.packing`` for a dataset with ``stats`` (``train_rows``, ``train_tokens``)."""
    value = str(setting).lower()
    if value in ("true", "false"):
        return PackingDecision(value == "true", f"training.packing={value}")
    rows = int(stats.get("train_rows") or 0)
    tokens = int(stats.get("train_tokens") or 0)
    if rows == 0:
        return PackingDecision(False, "auto: no training rows")
    mean = tokens / rows
    fill = mean / max_seq_length
    shape = f"rows average {mean:.0f} tokens, {fill:.0%} of model.max_seq_length={max_seq_length}"
    if fill > AUTO_MAX_FILL:
        return PackingDecision(False, f"auto: {shape}; padded rows in length groups waste little")
    steps = tokens / max_seq_length / (batch_size * accumulation)
    if steps < AUTO_MIN_STEPS:
        return PackingDecision(False, f"auto: {shape}, but packed they would make only {steps:.1f} optimizer "
                                      f"steps an epoch (fewer than {AUTO_MIN_STEPS}); padded rows in length groups")
    return PackingDecision(True, f"auto: {shape}; about {1 / fill:.1f} rows per packed sequence, "
                                 f"{steps:.0f} optimizer steps an epoch")


@functools.lru_cache(maxsize=1)
def _sampler_class() -> type:
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        """transformers' ``LengthGroupedSampler`` with its permutation seeded by ``seed`` + epoch.

        ``batch_size`` is the rows of one optimizer step (batch x accumulation): each step's rows
        are neighbours in a length-sorted pool of up to 50 steps' rows, and the longest step
        comes first, so an out-of-memory error shows at once.
        """

        def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
            super().__init__(batch_size, lengths=list(lengths))
            self.seed = int(seed)
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:  # accelerate's loader calls it every epoch
            self.epoch = int(epoch)

        def __iter__(self):
            import torch

            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    return SeededLengthGroupedSampler


def length_grouped_sampler(lengths: list[int], batch_size: int, seed: int) -> Any:
    """A seeded length-grouped sampler over rows of ``lengths`` tokens (see the module docstring)."""
    return _sampler_class()(lengths, batch_size, seed)


def real_tokens(inputs: Mapping[str, Any]) -> Any:
    """The non-padding tokens of a collated batch (a tensor on the batch's device, or an int).

    Padded batches carry an ``attention_mask``; padding-free (packed) ones carry the documents'
    lengths (``packed_seq_lengths``, where Unsloth adds them) or hold no padding at all.
    """
    mask = inputs.get("attention_mask")
    count = mask.sum() if mask is not None else None
    if count is None and inputs.get("packed_seq_lengths") is not None:
        count = inputs["packed_seq_lengths"].sum()
    if count is None:
        return inputs["input_ids"].numel()
    # A CUDA count stays on the GPU until the trainer settles its counts; a CPU one is read now.
    return count if count.device.type != "cpu" else int(count)
