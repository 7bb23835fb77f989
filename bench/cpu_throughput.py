"""CPU training throughput: a plain PyTorch loop vs TRL's SFTTrainer vs `sft`'s trainer.

All three train SmolLM2-135M-Instruct + LoRA r=16 (all linear layers) in float32 on the
embedded identity dataset rendered with chatml, with the same rows, batch size and
optimizer (AdamW). Tokens are non-padding input tokens; the first step of each is a warmup
and is not timed.

    python bench/cpu_throughput.py [--steps 8] [--batch 8] [--skip-trl]

Run it on a quiet machine: other processes competing for the cores (OpenMP threads spin)
can slow any row down by 10x or more.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

TARGET = 90.0  # tokens/s that sft's CPU path must reach (issue 8)


def _config(batch: int, steps: int, out: Path, model: str | None) -> Any:
    from sft.engine.configuration import load_config

    return load_config(overrides=[*([f"model.name={model}"] if model else []),
        "model.method=lora", "model.dtype=float32", "lora.r=16", "lora.lora_alpha=16",
        f"training.per_device_train_batch_size={batch}", "training.gradient_accumulation_steps=1",
        f"training.max_steps={steps + 1}", "training.warmup_steps=0", "training.logging_steps=1",
        "training.save_steps=100000", "training.learning_rate=2e-4",
        f"training.output_dir={out}", "loggers.enabled=[]", "export.enabled=[]",
    ])


def _model(cfg: Any) -> Any:
    from sft.engine.backends import select_backend
    from sft.core.env import current_environment
    from sft.core.plugins import get_plugin_manager

    backend = select_backend(cfg, get_plugin_manager(), current_environment())
    model, _ = backend.load(cfg)
    return backend, backend.prepare_for_training(model, cfg)


def plain_loop(cfg: Any, data: Any, tokenizer: Any, steps: int) -> list[tuple[int, float]]:
    """The textbook loop: pad each batch, model(labels=...), backward, AdamW step."""
    import torch

    _backend, model = _model(cfg)
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    batch = int(cfg.training.per_device_train_batch_size)
    rows = data.train.shuffle(seed=0)
    pad = tokenizer.pad_token_id
    timed: list[tuple[int, float]] = []
    for step in range(steps + 1):
        started = time.perf_counter()
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
        labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]
                               + [-100] * (width - len(r["input_ids"])) for r in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad()
        if step > 0:  # step 0 warms up
            timed.append((int(mask.sum()), time.perf_counter() - started))
    return timed


def trainer_run(cfg: Any, data: Any, tokenizer: Any, trained_positions_loss: bool, out: Path) -> list[tuple[int, float]]:
    """`sft`'s trainer (``trained_positions_loss=True``) or TRL's own loss on the same trainer."""
    from transformers import TrainerCallback

    from sft.core.env import current_environment
    from sft.engine.trainer import build_trainer

    class Clock(TrainerCallback):
        timed: list[tuple[int, float]] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 1:  # step 1 warms up
                self.timed.append((state.num_input_tokens_seen - self.tok0, time.perf_counter() - self.t0))

    _backend, model = _model(cfg)
    clock = Clock()
    trainer = build_trainer(cfg, model, tokenizer, data, current_environment(), out,
                            trained_positions_loss=trained_positions_loss, callbacks=[clock])
    trainer.train()
    return clock.timed


def _rates(timed: list[tuple[int, float]]) -> tuple[float, float]:
    """(overall tokens/s, median of the per-step tokens/s): the median shrugs off steps slowed by other processes."""
    import statistics

    overall = sum(t for t, _ in timed) / sum(s for _, s in timed)
    return overall, statistics.median(t / s for t, s in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per row (after 1 warmup step)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--skip-trl", action="store_true", help="skip the TRL-loss row")
    parser.add_argument("--model", help="another model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    import tempfile

    import torch

    from sft.engine.data import build_datasets
    from sft.core.templating import prepare_tokenizer, resolve_template
    from sft.engine.models import load_tokenizer
    from sft.core.plugins import get_plugin_manager

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args.batch, args.steps, Path(tmp) / "run", args.model)
        pm = get_plugin_manager()
        tokenizer = load_tokenizer(cfg.model)
        prepare_tokenizer(tokenizer, resolve_template(cfg, pm), cfg)
        data = build_datasets(cfg, pm, tokenizer, quiet=True)
        rows = [("plain PyTorch loop (padded, full logits)", lambda: plain_loop(cfg, data, tokenizer, args.steps))]
        if not args.skip_trl:
            rows.append(("TRL SFTTrainer loss, fp32, no checkpointing",
                         lambda: trainer_run(cfg, data, tokenizer, False, Path(tmp) / "trl")))
        rows.append(("sft (trained-positions loss)", lambda: trainer_run(cfg, data, tokenizer, True, Path(tmp) / "sft")))
        print(f"{args.model or 'SmolLM2-135M-Instruct'} + LoRA r=16, fp32, {torch.get_num_threads()} torch threads, "
              f"batch {args.batch}, {args.steps} timed steps, sft:identity (chatml)")
        results = []
        for name, fn in rows:
            overall, median = _rates(fn())
            results.append((name, overall, median))
            print(f"  measured {name}: {overall:.1f} tokens/s (median step {median:.1f})", flush=True)
    width = max(len(n) for n, *_ in results)
    print(f"\n| {'path'.ljust(width)} | tokens/s | median step |\n|{'-' * (width + 2)}|---------:|------------:|")
    for name, overall, median in results:
        print(f"| {name.ljust(width)} | {overall:8.1f} | {median:11.1f} |")
    sft_rate = results[-1][1]
    verdict = "OK" if sft_rate >= TARGET else "BELOW TARGET"
    print(f"\nsft: {sft_rate:.1f} tokens/s (target >= {TARGET:.0f}): {verdict}")


if __name__ == "__main__":
    main()
