"""How training batches are built from the tokenized rows: packed, or padded in length groups.

Every backend trains on the same batches, so this lives in core:

- :func:`decide_packing` resolves ``training.packing`` (``auto``, ``true``, ``false``) against
  the data: ``auto`` packs when rows are much shorter than ``model.max_seq_length`` and there
  are enough of them that packing still leaves real optimizer steps. TRL then packs whole rows
  into sequences of ``max_seq_length`` tokens (best-fit decreasing) and the collator flattens
  a batch into one row whose ``position_ids`` restart at every document; attention keeps the
  documents apart (transformers' SDPA/eager mask from the position ids, Unsloth's varlen
  kernel), which ``tests/test_packing.py`` checks token by token.
- :func:`length_grouped_sampler`: without packing (and for preference pairs, which are never
  packed), each optimizer step's rows are drawn
  from a shuffled pool sorted by length, so a batch pads to a length close to each of its rows
  (transformers' ``LengthGroupedSampler`` grouping, seeded by ``training.seed`` and the epoch,
  so an order is the same on every run and after a resume).
- :func:`merge_micro_batches`: without packing, the micro-batches of one optimizer step
  (gradient accumulation) run as one forward and backward while together they hold at most
  ``per_device_train_batch_size x max_seq_length`` padded tokens. A QLoRA pass has a fixed
  cost (~0.23 s for the 8B shape, most of it kernel launches the GPU waits on), which
  8 short chat rows cannot hide; the same rows in one pass can. The loss is the same
  token-weighted sum, and the memory stays within that of one batch of full-length rows.
- :func:`real_tokens`: the non-padding tokens of a collated batch, which is what
  ``summary.json``, the console and W&B count.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["PackingDecision", "decide_packing", "length_grouped_sampler", "real_tokens",
           "merge_micro_batches", "MergedAway", "MERGE_PADDING", "AUTO_MAX_FILL", "AUTO_MIN_STEPS"]

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
    if stats.get("streaming"):
        return _decide_streamed(stats, max_seq_length)
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


def _decide_streamed(stats: Mapping[str, Any], max_seq_length: int) -> PackingDecision:
    """``auto`` for a stream (data.streaming), whose length is unknown: the first chunk's rows decide, by
    their mean length alone (training.max_steps, required, sets the steps packing would otherwise shorten)."""
    rows, tokens = int(stats.get("sample_rows") or 0), int(stats.get("sample_tokens") or 0)
    fill = tokens / max(1, rows) / max_seq_length
    shape = (f"auto, streaming: the first {rows} rows average {tokens / max(1, rows):.0f} tokens, {fill:.0%} of "
             f"model.max_seq_length={max_seq_length}")
    if fill > AUTO_MAX_FILL:
        return PackingDecision(False, f"{shape}; padded rows waste little")
    return PackingDecision(True, f"{shape}; about {1 / max(fill, 1e-9):.1f} rows per packed sequence")


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


#: How long a row of each tokenized shape is, by the columns that hold its tokens: a row padded
#: alone (SFT), the longer of a pair's two rows (TRL's DPO collator pads chosen and rejected
#: together; the CPO/ORPO trainers' columns hold prompt + completion), or prompt + the longer
#: completion (pairs as ``sft`` tokenizes them).
LENGTH_COLUMNS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("input_ids",), ()),
    (("chosen_input_ids", "rejected_input_ids"), ()),
    (("chosen_ids", "rejected_ids"), ("prompt_ids",)),
)


def row_lengths(dataset: Any) -> list[int] | None:
    """The tokens of each row of a tokenized ``datasets.Dataset`` (see :data:`LENGTH_COLUMNS`), from
    the Arrow offsets of its token columns (and its index, where it selects rows): no row is read,
    whatever the rows. None for a dataset of none of those shapes."""
    import pyarrow.compute as pc

    columns = set(getattr(dataset, "column_names", None) or ())
    for longest_of, plus in LENGTH_COLUMNS:
        if set(longest_of + plus) <= columns:
            break
    else:
        return None
    lengths = pc.max_element_wise(*(pc.list_value_length(dataset.data.column(c)) for c in longest_of))
    for column in plus:
        lengths = pc.add(lengths, pc.list_value_length(dataset.data.column(column)))
    if dataset._indices is not None:
        lengths = lengths.take(dataset._indices.column(0))
    return lengths.to_pylist()


def length_grouped_sampler(lengths: list[int], batch_size: int, seed: int) -> Any:
    """A seeded length-grouped sampler over rows of ``lengths`` tokens (see the module docstring)."""
    return _sampler_class()(lengths, batch_size, seed)


#: The keys of a padded batch of unpacked rows (TRL's collator) and what each is padded with
#: when micro-batches are merged; None: the tokenizer's pad token. A batch with any other key
#: (a padding-free one's ``position_ids``, a plugin's extra column) is never merged.
MERGE_PADDING: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "labels": -100}


class MergedAway(dict):
    """The place of a micro-batch whose rows run in a later micro-batch of the same step.

    The Trainer still iterates over it (its accumulation count, gradient sync and logging stay
    those of ``gradient_accumulation_steps`` micro-batches); ``sft``'s trainer skips its forward
    and backward. It holds empty ``input_ids`` and ``attention_mask``, so the Trainer's own
    per-micro-batch bookkeeping (FLOPs, tokens seen) counts nothing for it.
    """

    @classmethod
    def like(cls, batch: Mapping[str, Any]) -> "MergedAway":
        ids = batch["input_ids"]
        return cls(input_ids=ids.new_zeros((0, 0)), attention_mask=batch["attention_mask"].new_zeros((0, 0)))


def _mergeable(batch: Any) -> bool:
    if not isinstance(batch, Mapping) or isinstance(batch, MergedAway):
        return False
    if not {"input_ids", "attention_mask"} <= set(batch) <= set(MERGE_PADDING):
        return False
    rows = batch["input_ids"].shape[0]
    return all(getattr(t, "ndim", 0) == 2 and t.shape[0] == rows for t in batch.values())


def _padded_tokens(group: list[Mapping[str, Any]]) -> int:
    return sum(b["input_ids"].shape[0] for b in group) * max(b["input_ids"].shape[1] for b in group)


def _concatenate(group: list[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    width = max(b["input_ids"].shape[1] for b in group)
    # Padding on the right is right whatever side the collator padded: the added positions are
    # masked out of attention and loss, and no position id is derived from them.
    return {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]),
                                  value=pad_token_id if pad is None else pad) for b in group])
            for key, pad in MERGE_PADDING.items() if key in group[0]}


def merge_micro_batches(batches: list[Any], budget: int, pad_token_id: int | None) -> list[Any]:
    """One optimizer step's micro-batches, consecutive ones merged while together they hold at
    most ``budget`` padded tokens (rows x the longest row).

    The list keeps its length: a merged batch takes the place of the last of its group (so the
    last micro-batch, the one that syncs gradients, is always a real one) and the others become
    :class:`MergedAway`. Unless every batch is a padded batch of :data:`MERGE_PADDING`'s keys,
    the batches are returned as they are.
    """
    if len(batches) < 2 or not all(_mergeable(b) for b in batches):
        return batches
    # Any id will do where the attention mask is 0; a tokenizer without a pad token gets 0.
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    merged: list[Any] = []
    group: list[Mapping[str, Any]] = []

    def close() -> None:
        merged.extend(MergedAway.like(b) for b in group[:-1])
        merged.append(group[0] if len(group) == 1 else _concatenate(group, pad_token_id))

    for batch in batches:
        if group and _padded_tokens(group + [batch]) > budget:
            close()
            group = []
        group.append(batch)
    close()
    return merged


def real_tokens(inputs: Mapping[str, Any]) -> Any:
    """The non-padding tokens of a collated batch (a tensor on the batch's device, or an int).

    Padded batches carry an ``attention_mask``; padding-free (packed) ones carry the documents'
    lengths (``packed_seq_lengths``, where Unsloth adds them) or hold no padding at all; the
    preference trainers' batches (CPO, ORPO) carry one mask per completion.
    """
    mask = inputs.get("attention_mask")
    count = mask.sum() if mask is not None else None
    if count is None and inputs.get("packed_seq_lengths") is not None:
        count = inputs["packed_seq_lengths"].sum()
    if count is None and "input_ids" not in inputs:
        # A preference batch keyed per completion (``chosen_attention_mask``, ...), each with its prompt.
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and not k.startswith(("prompt_", "KL_"))]
        count = sum(m.sum() for m in masks) if masks else 0
        if not hasattr(count, "device"):
            return int(count)
    if count is None:
        return inputs["input_ids"].numel()
    # A CUDA count stays on the GPU until the trainer settles its counts; a CPU one is read now.
    return count if count.device.type != "cpu" else int(count)
