"""Kill -9 a run while it writes a checkpoint, resume it, and get the same model.

Every run happens in a child process (``python -c``) so the three runs are alike and the
killed one can be killed for real. Nothing of sft is replaced in the child: the library
writes of the checkpoint at step ``PAUSE_AT`` (torch.save, safetensors) are only slowed
down, so the parent can send SIGKILL at a random moment of the real staging write and
commit: before any file, mid-file, after the rename but before ``COMPLETE``, or just after.
LoRA dropout and gradient accumulation make the resumed run depend on the restored RNG state
and data position, so "the same model" really checks the resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

STEPS, SAVE_EVERY, PAUSE_AT = 8, 2, 6
SLOW_WRITE = 0.25  # seconds per slowed library write; four of them per checkpoint

CHILD = textwrap.dedent("""
    import sys, time
    import safetensors.torch, torch
    from sft.testing import tiny_config
    from sft.engine.run import run_training

    mode, model, out, pause_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    marker, told = f".staging-{pause_at}", []

    def slowed(write):
        def slow(*args, **kwargs):
            if any(marker in str(a) for a in args):
                if not told:
                    told.append(1)
                    print("STAGING", flush=True)
                time.sleep(%r)
            return write(*args, **kwargs)
        return slow

    torch.save = slowed(torch.save)
    safetensors.torch.save_file = slowed(safetensors.torch.save_file)
    overrides = ["data.split=train[:12]", "training.save_steps=%d", "training.save_total_limit=3",
                 "training.warmup_steps=2", "training.learning_rate=0.001", "lora.lora_dropout=0.1",
                 "training.gradient_accumulation_steps=2"]
    cfg = tiny_config(out, model, *overrides, steps=%d)
    run_training(cfg, resume=(mode == "resume"))
    print("DONE", flush=True)
""" % (SLOW_WRITE, SAVE_EVERY, STEPS))


def _child(mode: str, model: Path, out: Path, pause_at: int = -1) -> subprocess.Popen:
    env = {**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(model), str(out), str(pause_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{out}\n{err}"
    return err


def _lora_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _final_loss(run: Path) -> float:
    from sft.engine.metrics import read_metrics

    return [r for r in read_metrics(run) if "loss" in r][-1]["loss"]


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_child("fresh", tiny_model_dir, straight))

    proc = _child("fresh", tiny_model_dir, killed, pause_at=PAUSE_AT)
    line = ""
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("STAGING"):
            break
    assert line.strip() == "STAGING", f"the child never started the checkpoint at step {PAUSE_AT}:\n" \
                                      f"{proc.stderr.read() if proc.stderr else ''}"
    delay = random.uniform(0, 5 * SLOW_WRITE)  # the four slowed writes, the commit, a little after
    print(f"killing {delay:.2f} s into the staging write of checkpoint-{PAUSE_AT}")
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = killed / "checkpoints"
    assert (ckpts / f"checkpoint-{PAUSE_AT - SAVE_EVERY}" / "COMPLETE").is_file()
    assert not (killed / "adapter").exists()
    from sft.engine import checkpoints

    resumable = checkpoints.last_complete(ckpts, verify=True)
    assert resumable.step in (PAUSE_AT - SAVE_EVERY, PAUSE_AT)  # the kill may land after COMPLETE

    torn = (ckpts / f"checkpoint-{PAUSE_AT}").is_dir() and resumable.step != PAUSE_AT  # renamed, no COMPLETE
    err = _finish(_child("resume", tiny_model_dir, killed))
    if torn:
        assert f"checkpoint-{PAUSE_AT}" in err and "incomplete" in err  # the notice names the torn one
    assert f"from checkpoint-{resumable.step} (step {resumable.step})" in err

    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == STEPS
    assert summary["resumed_from"].endswith(f"checkpoint-{resumable.step}")
    assert summary["tokens"] == json.loads((straight / "summary.json").read_text())["tokens"]

    assert abs(_final_loss(killed) - _final_loss(straight)) <= 1e-5
    a, b = _lora_weights(straight), _lora_weights(killed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name
    # metrics.jsonl has each step once: the resumed run dropped what came after its checkpoint.
    from sft.engine.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(killed) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_resume_without_a_complete_checkpoint_says_so(tiny_model_dir, tmp_path):
    from sft.core.errors import SftError
    from sft.testing import make_plugin_manager, tiny_config
    from sft.engine.run import run_training

    pm = make_plugin_manager()
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(SftError, match="no complete checkpoint"):
        run_training(tiny_config(tmp_path / "run", tiny_model_dir, pm=pm), resume=True, pm=pm)
