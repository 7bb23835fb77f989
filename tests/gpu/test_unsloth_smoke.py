"""Smoke test of the training core on CUDA: ``model.backend: auto`` picks Unsloth, trains, checkpoints, resumes.

Runs ``sft run`` in subprocesses (see ``support.sft_run``) on the small random Llama with
QLoRA: 40 steps, a checkpoint every 20, a held-out eval split. Then it resumes a copy of
the run from its step-20 checkpoint (the step-40 one removed) and checks it finishes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sft.engine.metrics import read_metrics
from sft.testing import write_jsonl

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


def test_nan_loss_on_cuda_stops_at_its_step(small_llama_dir: Path, tmp_path: Path) -> None:
    """On CUDA the NaN checks wait for the next log or save (no host sync per step); the run
    must still stop, name the step, and keep every checkpoint of non-finite weights off disk.

    An absurd learning rate blows the LoRA weights up at the first update. On the H100 the
    8-bit AdamW update itself overflows, so the weight check before checkpoint-1 stops the run
    (the loss check fires instead where the loss goes non-finite first). A checkpoint every
    step and a log every 4 steps make the checks run at each save, not each log.
    """
    data = write_jsonl(tmp_path / "codes.jsonl", learnable_rows(64))
    out = tmp_path / "run"
    overrides = [o for o in _overrides(small_llama_dir, data, out)
                 if not o.startswith(("training.learning_rate=", "training.save_steps=", "training.max_steps=",
                                      "training.warmup_steps=", "data.test_size="))]
    proc = sft_run(*overrides, "training.learning_rate=1e30", "training.warmup_steps=0", "training.max_steps=8",
                   "training.save_steps=1", "training.logging_steps=4", log=tmp_path / "nan.log", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    stopped = re.search(r"training stopped at step (\d+): (the loss is (nan|inf|-inf)|\d+ trained weight tensor)",
                        output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step <= 8
    root = out / "checkpoints"
    kept = sorted((p.name for p in root.iterdir()), key=lambda n: int(n.split("-")[1])) if root.exists() else []
    assert kept == [f"checkpoint-{k}" for k in range(max(1, step - 2), step)], kept  # save_total_limit=2
    assert all((root / name / "COMPLETE").is_file() for name in kept)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "nan" and f"step {step}" in summary["error"]
    assert not (out / "adapter").exists()
