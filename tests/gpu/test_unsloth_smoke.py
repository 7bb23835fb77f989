"""Smoke test of the training core on CUDA: ``model.backend: auto`` picks Unsloth, trains, checkpoints, resumes.

Runs ``sft run`` in subprocesses (see ``support.sft_run``) on the small random Llama with
QLoRA: 40 steps, a checkpoint every 20, a held-out eval split. Then it resumes a copy of
the run from its step-20 checkpoint (the step-40 one removed) and checks it finishes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sft.core.metrics import read_metrics
from sft.core.testing import write_jsonl

from .support import CODES, QUESTION, learnable_rows, sft_run

pytestmark = pytest.mark.gpu

STEPS = 40


def _overrides(model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"model.name={model}", "model.method=qlora", "model.max_seq_length=128", "lora.r=16", "lora.lora_alpha=32",
        f"data.dataset={data}", "data.test_size=16", f"training.output_dir={out}", f"training.max_steps={STEPS}",
        "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1",
        "training.learning_rate=3e-3", "training.warmup_steps=5", "training.save_steps=20", "training.eval_steps=20",
        "training.generation_max_new_tokens=12", f"training.generation_prompt={QUESTION.format('red')}",
        "loggers.enabled=[]", "export.enabled=[]",
    ]


def test_unsloth_trains_checkpoints_and_resumes(small_llama_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "codes.jsonl", learnable_rows())
    out = tmp_path / "run"
    proc = sft_run(*_overrides(small_llama_dir, data, out), log=tmp_path / "run.log")
    print(proc.stdout[-3000:], proc.stderr[-3000:])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["backend"] == "unsloth", summary
    assert summary["steps"] == STEPS and summary["device"] != "cpu"
    records = read_metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] * 0.5, losses
    assert any("eval_loss" in r for r in records)
    assert all(r["tokens_per_second"] > 0 for r in records if "loss" in r)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-20", "checkpoint-40"]
    assert CODES["red"] in summary["generation"]["text"], summary["generation"]

    # Resume a copy from step 20 (as if killed before the step-40 checkpoint was complete).
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    (resumed / "checkpoints" / "checkpoint-40" / "COMPLETE").unlink()
    proc = sft_run(*_overrides(small_llama_dir, data, resumed), "--resume", log=tmp_path / "resume.log")
    assert "ignoring incomplete checkpoint(s) checkpoint-40" in proc.stderr
    summary2 = json.loads((resumed / "summary.json").read_text())
    assert summary2["status"] == "ok" and summary2["steps"] == STEPS
    assert summary2["resumed_from"].endswith("checkpoint-20")
    # bf16/4-bit kernels are not bit-exact across a resume; the result must still be close.
    assert abs(summary2["train_loss"] - summary["train_loss"]) < 0.1 + 0.1 * summary["train_loss"]
