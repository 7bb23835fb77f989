"""The trainer `sft` runs: TRL's SFTTrainer with atomic checkpoints, a NaN guard and a lean loss.

:func:`trainer_class` builds (once, lazily: it imports TRL) a subclass of ``trl.SFTTrainer``:

- **Loss at trained positions only** (backends with ``trained_positions_loss``, the CPU
  path): the model's output head runs only on the hidden states whose next token is
  trained (``logits_to_keep`` as a boolean mask), and the cross-entropy is normalised by
  the number of trained tokens in the accumulated batch, like the Trainer's own loss. On
  SmolLM2-135M the 49k-word head is a fifth of the model; skipping it at prompt and padding
  positions, and skipping TRL's per-step entropy/accuracy metrics, is what lifts CPU
  throughput above a plain PyTorch loop (``bench/cpu_throughput.py``).
- **NaN/inf guard**: a non-finite loss stops the run with :class:`NonFiniteLossError`
  naming the step; a checkpoint is never written from non-finite weights, so the last one
  on disk is the last good one. On CUDA the check (and the token count) runs at the next
  log or save instead of every step, so the GPU is never left waiting on the host.
- **Atomic checkpoints** through :mod:`sft.engine.checkpoints`: the Trainer writes into a
  staging folder, which is renamed into place and marked ``COMPLETE``; rotation never
  deletes the newest complete checkpoint.
- **Token counting**: ``state.num_input_tokens_seen`` counts the non-padding tokens of
  every training micro-batch (:func:`sft.engine.packing.real_tokens`); it is saved with each
  checkpoint, so it survives a resume.
- **Length-grouped batches** when rows are not packed (and for preference pairs): a sampler
  seeded by ``args.seed`` and the epoch (:func:`sft.engine.packing.length_grouped_sampler`).
- **Merged micro-batches** (``merge_budget``, unpacked rows, one process): the micro-batches
  of an optimizer step run as one pass while together they hold at most ``merge_budget``
  padded tokens (:func:`sft.engine.packing.merge_micro_batches`). Only where the loss is
  normalised by the step's token count (``num_items_in_batch``), so the gradients are the
  unmerged ones: a loss averaged per micro-batch would weigh merged rows differently.

:func:`training_arguments` turns ``cfg.training`` into TRL's ``SFTConfig`` and :func:`build_trainer`
puts the two together on the prepared rows (what ``sft run`` and ``bench/`` train with).

:func:`metrics_callback` sends every logging step to the :class:`~sft.engine.metrics.MetricsHub`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sft.core.errors import SftError
from sft.core.notices import notice

from . import distributed
from .backends import EIGHT_BIT_OPTIMIZERS

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.env import Environment

    from .metrics import MetricsHub

__all__ = ["NonFiniteLossError", "trainer_class", "guarded_trainer_class", "training_arguments", "common_arguments",
           "build_trainer", "RunTrainerSetup", "objective_trainer", "metrics_callback",
           "TRAIN_METRICS"]

#: The keys of a training log record (besides ``step``), in order.
TRAIN_METRICS = ("loss", "learning_rate", "grad_norm", "epoch", "tokens", "tokens_per_second")


class NonFiniteLossError(SftError):
    """The loss (or the weights about to be checkpointed) became NaN or infinite."""

    def __init__(self, step: int, what: str, last_checkpoint: str | None = None):
        self.step = step
        keep = (f"the last good checkpoint is kept: {last_checkpoint}" if last_checkpoint
                else "no checkpoint had been written yet")
        super().__init__(
            f"training stopped at step {step}: {what}. This usually means the learning rate is too high "
            f"(training.learning_rate) or fp16 overflowed (try bf16 or float32); {keep}.")


@functools.lru_cache(maxsize=None)
def guarded_trainer_class(base: type) -> type:
    """``base`` (a ``transformers.Trainer`` subclass: TRL's SFT, DPO, KTO, CPO, ORPO trainers)
    with the guards every objective trains under: the NaN/inf guard, counted tokens and atomic
    checkpoints (see the module docs). Built once per base."""
    import torch
    from transformers import Trainer

    from . import checkpoints
    from .packing import real_tokens

    class Guarded(base):  # type: ignore[misc, valid-type]
        #: the run config: its learning rates per parameter group (:mod:`sft.engine.optimizer`);
        #: set by whoever builds the trainer (:func:`objective_trainer`, :func:`build_trainer`)
        sft_config: Any = None

        def __init__(self, *args: Any, **kwargs: Any):
            self._staging: Path | None = None
            #: (step, tokens, loss) of micro-batches not yet counted and checked (see _settle)
            self._pending: list[tuple[int, Any, Any]] = []
            super().__init__(*args, **kwargs)

        def training_step(self, model, inputs, num_items_in_batch=None):
            seen = real_tokens(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._pending.append((self.state.global_step + 1, seen, loss.detach()))
            # Reading a CUDA value waits for the GPU; once per step that stalls it while the
            # optimizer step is being queued (1.6% of an 8B QLoRA step on an H100, see
            # docs/benchmarks.md). On CUDA the count and the NaN check wait for the next
            # log/save, where the Trainer waits for the GPU anyway.
            if loss.device.type != "cuda" or len(self._pending) >= 64:
                self._settle()
            return loss

        def _settle(self) -> None:
            """Add the pending micro-batches' tokens to the state; stop at the first non-finite loss."""
            pending, self._pending = self._pending, []
            if not pending:
                return
            counts = [seen for _, seen, _ in pending]
            tensors = [c.reshape(()) for c in counts if isinstance(c, torch.Tensor)]
            seen = sum(int(c) for c in counts if not isinstance(c, torch.Tensor))
            finite = torch.stack([torch.isfinite(loss).all() for _, _, loss in pending]).tolist()
            seen += int(torch.stack(tensors).sum()) if tensors else 0
            # Every rank settles at the same micro-batches: the count is the job's, and a NaN
            # on one rank stops all of them at once instead of leaving them in a collective.
            seen, bad_ranks = distributed.sum_across_ranks([seen, float(not all(finite))])
            self.state.num_input_tokens_seen += int(seen)
            if not bad_ranks:
                return
            # Every rank knows now that some rank saw one: all stop at the job's first bad step.
            mine = next(((step, loss) for (step, _, loss), ok in zip(pending, finite) if not ok), None)
            first = int(distributed.min_across_ranks(mine[0] if mine else pending[-1][0]))
            if mine is not None and mine[0] == first:
                value = mine[1].item() if mine[1].numel() == 1 else "not finite"
                raise NonFiniteLossError(first, f"the loss is {value}", self._last_checkpoint())
            raise NonFiniteLossError(first, "the loss became NaN/inf on another rank", self._last_checkpoint())

        # -- optimizer groups (training.embedding_learning_rate, training.loraplus_lr_ratio) --------------------------------------------------------------------
        def create_optimizer(self, *args, **kwargs):
            if self.optimizer is None and self.sft_config is not None:
                from .optimizer import create_optimizer

                self.optimizer = create_optimizer(self, self.sft_config)  # None: no rate of its own
            return super().create_optimizer(*args, **kwargs)

        def log(self, logs, *args, **kwargs):
            if "learning_rate" in logs:  # the rates of the groups that have their own (embeddings, LoRA+'s B)
                from .optimizer import group_rates

                logs = {**logs, **group_rates(self.optimizer, logs["learning_rate"])}
            return super().log(logs, *args, **kwargs)

        def _maybe_log_save_evaluate(self, *args, **kwargs):
            c = self.control
            if c.should_log or c.should_save or c.should_evaluate or c.should_training_stop or c.should_epoch_stop:
                self._settle()  # before the log reads the token count and before any checkpoint
            return super()._maybe_log_save_evaluate(*args, **kwargs)

        def train(self, *args, **kwargs):
            try:
                result = super().train(*args, **kwargs)
            finally:
                _forget_bitsandbytes_overrides(self.model)
            self._settle()
            return result

        # -- batches ----------------------------------------------------------------------
        def _get_train_sampler(self, train_dataset=None):
            """``group_by_length`` (unpacked rows, preference pairs):
            :func:`sft.engine.packing.length_grouped_sampler`, seeded by ``args.seed`` and the epoch
            instead of the global RNG's state.

            Distributed, every rank draws the same order and accelerate deals its batches out
            round-robin; grouping by the global batch of a step keeps each step's rows those of
            a single process with the same global batch."""
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            per_step = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                        * self.args.world_size)
            sampler = self._length_grouped(dataset, per_step)
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

        def _get_eval_sampler(self, eval_dataset):
            # transformers groups eval rows by the length of their "input_ids" too, which pairs lack.
            sampler = self._length_grouped(eval_dataset, self.args.eval_batch_size)
            return sampler if sampler is not None else super()._get_eval_sampler(eval_dataset)

        def _length_grouped(self, dataset: Any, batch_size: int) -> Any:
            from .packing import length_grouped_sampler, row_lengths

            lengths = row_lengths(dataset) if self.args.train_sampling_strategy == "group_by_length" else None
            return None if lengths is None else length_grouped_sampler(lengths, batch_size, self.args.seed)

        # -- checkpoints -----------------------------------------------------------------
        def _last_checkpoint(self) -> str | None:
            last = checkpoints.last_complete(self.args.output_dir, verify=True)  # "last good" must be good
            return str(last.path) if last else None

        def _get_output_dir(self, trial):
            if self._staging is not None:
                return str(self._staging)
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            step = self.state.global_step
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(_local(p)).all()]
            if distributed.sum_across_ranks([len(bad)])[0]:
                what = (f"{len(bad)} trained weight tensor(s) became NaN/inf (e.g. {bad[0]})" if bad
                        else "trained weights became NaN/inf on another rank")
                raise NonFiniteLossError(step, what, self._last_checkpoint())
            root = Path(self.args.output_dir)
            world = distributed.current_world()
            # Rank 0 makes the staging folder; every rank writes its part of the checkpoint into
            # it (its RNG state; its shards under FSDP); rank 0 commits once all have written.
            self._staging = distributed.broadcast(checkpoints.staging_dir(root, step) if world.is_main else None)
            written = self._staging / f"checkpoint-{step}"
            try:
                with checkpoints.writing(root, step, clean=world.is_main):
                    # transformers.Trainer's, not TRL's: TRL also writes a model card into output_dir.
                    Trainer._save_checkpoint(self, model, trial)
            finally:
                self._staging = None
            distributed.barrier()
            if world.is_main:
                strategy = "fsdp2" if self.is_fsdp_enabled else ("ddp" if world.distributed else "single")
                with checkpoints.writing(root, step):
                    distributed.write_layout(written, strategy, distributed.BatchPlan(
                        self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps,
                        self.args.world_size))
                    checkpoints.commit_checkpoint(written, root, step)
                checkpoints.rotate(root, self.args.save_total_limit)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


@functools.lru_cache(maxsize=1)
def trainer_class() -> type:
    """The ``SFTTrainer`` subclass (built on first use: importing TRL is slow)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    from .packing import MergedAway, merge_micro_batches

    class SftTrainer(guarded_trainer_class(SFTTrainer)):  # type: ignore[misc]
        """SFTTrainer + trained-positions loss, merged micro-batches and the guards (see module docs)."""

        def __init__(self, *args: Any, trained_positions_loss: bool = False,
                     merge_budget: int | None = None, sft_config: Any = None, **kwargs: Any):
            self.trained_positions_loss = trained_positions_loss
            self.sft_config = sft_config
            self.merge_budget = merge_budget
            #: micro-batches drawn and passes run while merging; None: nothing could be merged
            self._merged: list[int] | None = None
            super().__init__(*args, **kwargs)

        # -- loss ----------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.trained_positions_loss:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            inputs = dict(inputs)
            inputs.pop("_prediction_loss_only", None)
            labels = inputs.pop("labels")
            # Position i predicts token i+1; the collator already masks sequence starts.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            keep = targets != -100
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = outputs.logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[keep], reduction="sum")
            if num_items_in_batch is None:
                loss = loss / keep.sum().clamp(min=1)
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    # num_items_in_batch counts every rank's tokens and DDP averages the
                    # gradients over ranks: scale back up, as Trainer.compute_loss does.
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        # -- batches ----------------------------------------------------------------------
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self.merge_budget and num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                batches = merge_micro_batches(batches, self.merge_budget, self.processing_class.pad_token_id)
                drawn, passes = self._merged or (0, 0)
                self._merged = [drawn + len(batches),
                                passes + sum(not isinstance(b, MergedAway) for b in batches)]
            return batches, num_items_in_batch

        def training_step(self, model, inputs, num_items_in_batch=None):
            if isinstance(inputs, MergedAway):  # its rows run in the step's next micro-batch
                return torch.zeros((), device=self.args.device)
            return super().training_step(model, inputs, num_items_in_batch)

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            if self.merge_budget:
                notice(f"training.merge_micro_batches: {self._merged[0]} micro-batches ran as {self._merged[1]} passes"
                       if self._merged else "training.merge_micro_batches: nothing merged (the loss is not "
                       "normalised by each step's token count here, so merged rows would weigh differently)")
            return result

    return SftTrainer


def _forget_bitsandbytes_overrides(model: Any) -> None:
    """Drop ``model``'s modules from bitsandbytes' process-wide ``GlobalOptimManager``.

    For an 8-bit optimizer transformers' Trainer registers every ``nn.Embedding`` of the model
    there (embeddings keep 32-bit optimizer state), and the manager holds those modules, with
    their weights, for the life of the process: a notebook that trains twice kept each earlier
    run's embedding on the GPU (1 GiB a run for the Llama-3.1-8B shape; docs/benchmarks.md).
    The optimizer has read the overrides at its first step, so training is done with them.
    """
    import sys

    bitsandbytes = sys.modules.get("bitsandbytes")
    if bitsandbytes is None:  # never imported: nothing was registered
        return
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    mine = {id(module) for module in model.modules()}
    manager.module_weight_config_triple = [entry for entry in manager.module_weight_config_triple
                                           if id(entry[0]) not in mine]


def _local(tensor: Any) -> Any:
    """This rank's shard of a sharded (FSDP2 DTensor) parameter; the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def metrics_callback(hub: "MetricsHub", objective_metrics: tuple[str, ...] = ()) -> Any:
    """A ``TrainerCallback`` that sends every train log and every evaluation to ``hub``.

    Train records carry :data:`TRAIN_METRICS`, then the objective's own keys
    (``objective_metrics``: DPO's ``rewards/chosen`` ...); ``tokens`` is the cumulative count of
    non-padding training tokens (``state.num_input_tokens_seen``) and ``tokens_per_second``
    the rate since the previous record. Eval records carry ``eval_loss`` (and the other
    ``eval_*`` values the Trainer reports).
    """
    from transformers import TrainerCallback

    class _Metrics(TrainerCallback):
        def __init__(self) -> None:
            self.last_time = time.perf_counter()
            self.last_tokens = 0
            self.final: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()
            self.last_tokens = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            step = state.global_step
            if "train_runtime" in logs:  # the Trainer's end-of-training summary
                self.final = logs
                return
            if any(k.startswith("eval_") for k in logs):
                record = {k: v for k, v in logs.items() if k.startswith("eval_") and _number(v)}
                record["epoch"] = logs.get("epoch", state.epoch)
                hub.log(step, record)
                return
            if "loss" not in logs:
                return
            now = time.perf_counter()
            tokens = int(state.num_input_tokens_seen)
            elapsed = max(now - self.last_time, 1e-9)
            record = {
                "loss": logs.get("loss"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "epoch": logs.get("epoch", state.epoch),
                "tokens": tokens,
                "tokens_per_second": (tokens - self.last_tokens) / elapsed,
                **{k: logs[k] for k in objective_metrics if _number(logs.get(k))},
            }
            record.update({k: v for k, v in logs.items() if k.startswith("learning_rate_")})  # per optimizer group
            self.last_time, self.last_tokens = now, tokens
            hub.log(step, {k: v for k, v in record.items() if v is not None})

    return _Metrics()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- hyperparameters --------------------------------------------------------------------------
def training_arguments(cfg: "DictConfig", env: "Environment", output_dir: str | Path, has_eval: bool,
                       packing: bool | None = None) -> Any:
    """The ``trl.SFTConfig`` for ``cfg.training`` (:func:`common_arguments`, plus packing).

    ``packing`` is the resolved ``training.packing`` (:func:`sft.engine.packing.decide_packing`;
    None: only an explicit ``true`` packs). Unpacked rows are padded per batch and drawn in
    length groups (``group_by_length``, seeded by the trainer).
    """
    from trl import SFTConfig

    if packing is None:
        packing = str(cfg.training.packing).lower() == "true"
    return SFTConfig(
        **common_arguments(cfg, env, output_dir, has_eval, SFTConfig),
        packing=packing,
        # Rows are already truncated to model.max_seq_length by the data pipeline; packing
        # needs the length to fill its bins.
        max_length=int(cfg.model.max_seq_length) if packing else None,
        # Unpacked: padded batches of similar lengths. padding_free is stated, not left unset:
        # Unsloth turns an unset one on, and flattened rows are what packing is for.
        padding_free=packing,
        train_sampling_strategy="random" if packing else "group_by_length",
    )


def common_arguments(cfg: "DictConfig", env: "Environment", output_dir: str | Path, has_eval: bool,
                     config_class: type) -> dict[str, Any]:
    """The ``TrainingArguments`` values every objective trains with, from ``cfg.training``
    (HF TrainingArguments names map one to one), for ``config_class`` (TRL's SFT, DPO, ... config).

    CPU: float32, no gradient checkpointing and no bf16 autocast (TRL turns both on by default;
    together they are ~23x slower on a small CPU); optim ``auto`` is ``adamw_torch`` there
    (8-bit Adam needs bitsandbytes on CUDA) and ``adamw_8bit`` on CUDA.
    """
    import torch

    from .backends import resolve_dtype

    t = cfg.training
    optim = t.optim
    if optim == "auto":
        from .backends import bitsandbytes_installed

        optim = "adamw_8bit" if env.cuda and bitsandbytes_installed() else "adamw_torch"
        if not env.cuda:
            notice("training.optim=auto: adamw_torch on CPU (8-bit AdamW needs CUDA)")
        elif optim == "adamw_torch":
            notice("training.optim=auto: adamw_torch (8-bit AdamW needs bitsandbytes: pip install 'sft-forge[gpu]')")
    elif optim in EIGHT_BIT_OPTIMIZERS and not env.cuda:
        notice(f"training.optim={optim} needs CUDA (bitsandbytes); using adamw_torch on CPU")
        optim = "adamw_torch"
    dtype = resolve_dtype(cfg, env)
    bf16 = t.bf16 if t.bf16 is not None else (env.cuda and dtype == torch.bfloat16)
    fp16 = t.fp16 if t.fp16 is not None else (env.cuda and dtype == torch.float16)
    eval_strategy = t.eval_strategy
    if eval_strategy == "auto":
        eval_strategy = "steps" if has_eval else "no"
    if not has_eval:
        eval_strategy = "no"
    warmup: float = t.warmup_steps if t.warmup_steps > 0 else float(t.warmup_ratio)
    return dict(
        output_dir=str(output_dir),
        learning_rate=float(t.learning_rate),
        lr_scheduler_type=t.lr_scheduler_type,
        per_device_train_batch_size=int(t.per_device_train_batch_size),
        per_device_eval_batch_size=int(t.per_device_eval_batch_size),
        gradient_accumulation_steps=distributed.batch_plan(cfg).gradient_accumulation_steps,
        num_train_epochs=float(t.num_train_epochs),
        max_steps=int(t.max_steps),
        optim=optim,
        weight_decay=float(t.weight_decay),
        # transformers 5: warmup_steps < 1 is a fraction of all steps (warmup_ratio is gone).
        warmup_steps=warmup,
        max_grad_norm=float(t.max_grad_norm),
        seed=int(t.seed),
        logging_steps=int(t.logging_steps),
        logging_first_step=True,
        # Never hide a NaN/inf loss from the logs (the trainer stops on it anyway).
        logging_nan_inf_filter=False,
        eval_strategy=eval_strategy,
        eval_steps=int(t.eval_steps or t.logging_steps * 10),
        eval_on_start=bool(t.eval_on_start) and eval_strategy != "no",
        save_strategy="steps",
        save_steps=int(t.save_steps),
        save_total_limit=int(t.save_total_limit),
        bf16=bool(bf16),
        fp16=bool(fp16),
        # Backends own checkpointing (Unsloth's offloaded one on CUDA, none on CPU); TRL turns it on.
        **{_checkpointing_argument(config_class): False},
        use_cpu=not env.cuda,
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
        **distributed.trainer_arguments(cfg),
    )


def _merge_budget(cfg: "DictConfig", plan: "distributed.BatchPlan", packing: bool) -> int | None:
    """The padded tokens a merged micro-batch may hold (:func:`sft.engine.packing.merge_micro_batches`),
    or None when micro-batches are not merged: packed rows already fill their sequences, and
    several processes would have to agree on every merge (each runs its own forward passes,
    and FSDP's gather weights in each of them)."""
    if packing or not cfg.training.merge_micro_batches or plan.gradient_accumulation_steps < 2:
        return None
    if plan.world_size > 1:
        notice("training.merge_micro_batches: not with several processes; each micro-batch runs as it is")
        return None
    budget = plan.per_device * int(cfg.model.max_seq_length)
    notice(f"training.merge_micro_batches: the {plan.gradient_accumulation_steps} micro-batches of a step run "
           f"as one pass while together they hold at most {budget:,} padded tokens "
           f"({plan.per_device} rows x model.max_seq_length={cfg.model.max_seq_length})")
    return budget


def _checkpointing_argument(config_class: type) -> str:
    """The TrainingArguments field that switches gradient checkpointing: transformers 5.18 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name now warns), and the
    ``gpu`` extra's transformers 5.17 (Unsloth's cap) knows only the old one."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def build_trainer(cfg: "DictConfig", model: Any, tokenizer: Any, data: Any, env: "Environment",
                  output_dir: str | Path, trained_positions_loss: bool, callbacks: list[Any] = ()) -> Any:
    """The SFTTrainer subclass of :mod:`sft.engine.trainer` on the prepared rows (also used by ``bench/``)."""
    import logging

    from .packing import decide_packing
    from .trainer import trainer_class

    t = cfg.training
    plan = distributed.batch_plan(cfg)  # packing's step count is per global batch, over every process
    decision = decide_packing(t.packing, data.stats, int(cfg.model.max_seq_length),
                              plan.per_device, plan.gradient_accumulation_steps * plan.world_size)
    if str(t.packing).lower() == "auto":
        notice(decision.describe())
    args = training_arguments(cfg, env, output_dir, has_eval=data.eval is not None, packing=decision.pack)
    merge_budget = _merge_budget(cfg, plan, decision.pack)
    # TRL warns that padding-free packing wants FlashAttention; transformers >= 5 keeps packed
    # rows apart through position_ids with SDPA too (checked by tests/test_train.py).
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "Flash Attention" not in record.getMessage())
    from transformers import PrinterCallback

    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        trained_positions_loss=trained_positions_loss,
        merge_budget=merge_budget,
        sft_config=cfg,
    )
    # Metrics reach the console through the logger plugins, not the Trainer's raw dicts.
    trainer.remove_callback(PrinterCallback)
    return trainer


@dataclass
class RunTrainerSetup:
    """The :class:`~sft.core.interfaces.TrainerSetup` of one run: what its objective builds a trainer from."""

    config: Any
    model: Any
    tokenizer: Any
    data: Any
    env: "Environment"
    output_dir: Path
    callbacks: list[Any]
    backend: Any

    def arguments(self, config_class: type, **values: Any) -> Any:
        common = common_arguments(self.config, self.env, self.output_dir, self.data.eval is not None, config_class)
        return config_class(**{**common, **values})

    def trainer_class(self, base: type) -> type:
        return guarded_trainer_class(base)


@contextlib.contextmanager
def _trl_without_wandb() -> Iterator[None]:
    """TRL imports wandb with its trainers whenever wandb is installed (1.14's ``base_trainer``).
    sft hands TRL ``report_to="none"``, so TRL never uses it: W&B is the wandb logger's alone,
    and a run without that logger does not load it. ``sys.modules[name] = None`` is how Python
    says "not installed" (``find_spec`` returns None); the entry is put back afterwards."""
    import sys

    before = sys.modules.get("wandb", _ABSENT)
    sys.modules["wandb"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if before is _ABSENT:
            sys.modules.pop("wandb", None)
        else:
            sys.modules["wandb"] = before


_ABSENT = object()


def objective_trainer(objective: Any, setup: RunTrainerSetup, options: Any = None) -> Any:
    """``objective``'s trainer for ``setup``, with metrics reaching the console through the logger
    plugins only (not also as the Trainer's raw dicts)."""
    from transformers import PrinterCallback

    with _trl_without_wandb():
        trainer = objective.build_trainer(setup, options)
    trainer.sft_config = setup.config  # every objective's optimizer gets the run's parameter groups
    trainer.remove_callback(PrinterCallback)
    return trainer
