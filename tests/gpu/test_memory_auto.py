"""``training.memory`` on Unsloth: auto's probe picks a plan, applies it, and leaves no trace;
long tiles every MLP; both train what the default trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft.testing import write_jsonl

from .support import learnable_rows, sft_run

pytestmark = pytest.mark.gpu


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _train(model_dir: Path, work: Path, memory: str, batch: int = 4) -> tuple[Path, str]:
    data = work / "codes.jsonl"
    if not data.exists():
        write_jsonl(data, learnable_rows(64))
    out = work / f"{memory}-{batch}"
    proc = sft_run(
        f"model.name={model_dir}", "model.backend=unsloth", "model.method=qlora", "model.max_seq_length=128",
        f"data.dataset={data}", "template.name=chatml", f"training.output_dir={out}",
        "training.max_steps=4", f"training.per_device_train_batch_size={batch}", "training.gradient_accumulation_steps=1",
        "training.warmup_steps=0", "training.learning_rate=1e-3", "training.logging_steps=1",
        "training.save_steps=1000", "training.generation_max_new_tokens=2", f"training.memory={memory}",
        "loggers.enabled=[]", "export.enabled=[]", log=work / f"{memory}-{batch}.log")
    return out, proc.stdout + proc.stderr


def test_memory_auto_plans_and_matches_default(small_llama_dir: Path, tmp_path: Path) -> None:
    default, err_default = _train(small_llama_dir, tmp_path, "default")
    assert "memory=auto" not in err_default
    auto, err = _train(small_llama_dir, tmp_path, "auto")
    plan = re.search(r"memory=auto: (\d+) of (\d+) layers checkpointed", err)
    assert plan, err[-2000:]
    # A 4-layer model with a batch of 4 x 128 tokens fits any GPU many times over.
    assert plan.groups() == ("0", "4")
    # The backend drops what the probe left in Unsloth's compile cache itself (no warning
    # about a "poisoned" cache the user did not cause).
    assert "manual forward/backward" not in err
    # The probe cleared its gradients and restored the RNG: the first step's loss (before any
    # update) is the default run's, and the runs stay together after it.
    a, d = _losses(auto), _losses(default)
    assert len(a) == len(d) == 4
    assert a[0] == pytest.approx(d[0], rel=1e-3)
    assert a == pytest.approx(d, rel=3e-2)


def test_memory_long_tiles_every_mlp_and_matches_default(small_llama_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Unsloth prints each tiled MLP forward's chunk size with these on.
    monkeypatch.setenv("UNSLOTH_ENABLE_LOGGING", "1")
    monkeypatch.setenv("UNSLOTH_ENABLE_TILED_LOGGING", "1")
    default, err_default = _train(small_llama_dir, tmp_path, "default", batch=16)
    assert "TiledMLP" not in err_default and "tiled MLP" not in err_default
    long, err = _train(small_llama_dir, tmp_path, "long", batch=16)
    assert "training.memory=long: Unsloth's tiled MLP on 4 of 4 decoder layers" in err, err[-2000:]
    # Chunks of hidden-size (256) tokens, and every step holds more than that: each MLP ran in
    # at least two chunks, recomputed in backward.
    assert "Enabling TiledMLP to reduce VRAM usage! chunk size: 256" in err, err[-2000:]
    seen = [r["tokens"] for r in map(json.loads, (long / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    per_step = [b - a for a, b in zip([0, *seen], seen)]  # `tokens` counts from the start of the run
    assert min(per_step) > 256, seen
    # The same products in chunks: the same losses.
    a, d = _losses(long), _losses(default)
    assert len(a) == len(d) == 4
    assert a[0] == pytest.approx(d[0], rel=1e-3)
    assert a == pytest.approx(d, rel=3e-2)
