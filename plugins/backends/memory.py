"""``training.memory=auto``: spend free GPU memory on speed instead of leaving it idle.

Gradient checkpointing trades memory for time: a checkpointed decoder layer stores only its
input and runs its forward again during backward (about 1.4x the step time for an 8B
model). The default (``training.memory=default``) checkpoints every layer, which keeps an 8B
QLoRA run under 9 GiB. On a large card most of that memory is idle, so ``auto`` measures
what one layer's activations cost and lets as many layers as fit keep them:

1. probe: one forward+backward of the real batch shape (``per_device_train_batch_size`` x
   ``max_seq_length`` random tokens) with every layer checkpointed gives the base peak; a
   second with a few layers un-checkpointed gives the bytes per un-checkpointed layer;
2. choose: ``skip = (budget - base peak) / per layer`` layers, clamped to ``[0, layers]``,
   where the budget is the memory this process can use, less a reserve for the optimizer
   state and allocator slack (:func:`choose_skip`);
3. check: a third probe at the chosen count; if it overshoots the budget, step back.

The policy is backend-agnostic: a backend passes ``set_skip(k)``, which makes ``k`` evenly
spaced decoder layers keep their activations (Unsloth's ``checkpoint_skip_layers``). The
probe leaves no trace: gradients are cleared and the RNG states restored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

__all__ = ["CheckpointPlan", "choose_skip", "usable_cuda_bytes", "probe_step_peak", "plan_checkpointing"]

GIB = 1024**3


@dataclass
class CheckpointPlan:
    """What ``training.memory=auto`` decided, for the console and ``summary.json``."""

    layers: int
    #: decoder layers that keep their activations (not recomputed in backward)
    skip: int
    budget_bytes: int
    base_peak_bytes: int
    per_layer_bytes: int
    #: measured peak of one step at the chosen ``skip`` (None when not re-probed)
    planned_peak_bytes: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the console."""
        gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
        peak = f", step peak {gib(self.planned_peak_bytes)}" if self.planned_peak_bytes else ""
        return (f"memory=auto: {self.layers - self.skip} of {self.layers} layers checkpointed "
                f"(budget {gib(self.budget_bytes)}, base {gib(self.base_peak_bytes)}, "
                f"{gib(self.per_layer_bytes)}/layer{peak}){'; ' + self.reason if self.reason else ''}")


def choose_skip(layers: int, base_peak: int, per_layer: int, budget: int) -> int:
    """How many layers may keep their activations: the most whose peak stays within ``budget``.

    ``base_peak`` is the step peak with every layer checkpointed and ``per_layer`` what each
    un-checkpointed layer adds (both in bytes). Never negative, never more than ``layers``.
    """
    if layers <= 0 or budget <= base_peak:
        return 0
    if per_layer <= 0:
        return layers
    return max(0, min(layers, math.floor((budget - base_peak) / per_layer)))


def usable_cuda_bytes(device: Any = None) -> int:
    """Bytes this process could still allocate: free card memory plus what torch's cache holds unused."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def probe_step_peak(model: Any, batch_size: int, seq_len: int, vocab_size: int | None = None) -> int:
    """Peak allocated bytes of one training forward+backward on random tokens of this shape.

    Runs in training mode (checkpointing is only active there), clears the gradients it made
    and restores the CPU and CUDA RNG states, so training starts as if no probe had run.
    """
    import torch

    vocab = vocab_size or model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        device = torch.device("cuda")
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    was_training = model.training
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device, generator=generator)
    model.train()
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    finally:
        del ids
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng, device)


def _trainable_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan_checkpointing(
    model: Any,
    layers: int,
    batch_size: int,
    seq_len: int,
    set_skip: Callable[[int], None],
    *,
    slack_fraction: float = 0.05,
    slack_bytes: int = 2 * GIB,
    probe_layers: int | None = None,
) -> CheckpointPlan:
    """Probe, choose and apply how many decoder layers skip gradient checkpointing.

    Args:
        model: the model as it will train (LoRA attached, checkpointing armed), on CUDA.
        layers: its number of decoder layers.
        batch_size, seq_len: the largest training batch (rows x tokens).
        set_skip: makes ``k`` evenly spaced layers keep their activations (``0``: all checkpointed).
        slack_fraction, slack_bytes: memory left unplanned for allocator fragmentation, the
            evaluation batch and other processes.
        probe_layers: layers un-checkpointed by the second probe (default ``layers // 8``, at least 1).

    Returns the plan; ``set_skip(plan.skip)`` has been applied. An out-of-memory error during
    a probe is not fatal: the plan falls back to checkpointing more layers.
    """
    import torch

    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        device = torch.device("cuda")
    # What this process may hold at most: what it holds now plus what it can still get.
    capacity = torch.cuda.memory_allocated(device) + usable_cuda_bytes(device)
    # Optimizer state is made at the first step, after the probes: reserve 8 bytes a trainable
    # parameter (two fp32 Adam moments; 8-bit optimizers need a quarter of that).
    reserve = _trainable_params(model) * 8 + slack_bytes + int(capacity * slack_fraction)
    budget = capacity - reserve

    def probe(k: int) -> int | None:
        set_skip(k)
        try:
            return probe_step_peak(model, batch_size, seq_len)
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return None

    base = probe(0)
    if base is None or base >= budget:
        set_skip(0)
        return CheckpointPlan(layers, 0, budget, base or 0, 0, base,
                              "the fully checkpointed step already fills the budget")
    m = max(1, min(layers, probe_layers or layers // 8))
    second = probe(m)
    if second is None:
        set_skip(0)
        return CheckpointPlan(layers, 0, budget, base, 0, base, f"out of memory with {m} layers un-checkpointed")
    per_layer = max(1, (second - base) // m)
    skip = choose_skip(layers, base, per_layer, budget)
    # The peak is close to linear in the skipped layers, but check the choice and step back
    # when it overshoots (recomputation buffers, fragmentation); two tries at most.
    peak: int | None = second if skip == m else None
    for _ in range(2):
        if skip == 0 or peak is not None and peak <= budget:
            break
        peak = probe(skip)
        if peak is not None and peak <= budget:
            break
        over = (peak - budget) if peak is not None else per_layer * max(1, skip // 4)
        skip = max(0, skip - max(1, math.ceil(over / per_layer)))
        peak = None
    set_skip(skip)
    return CheckpointPlan(layers, skip, budget, base, per_layer, peak if skip else base)
