"""A run folder someone sent you is data (issue 31): its links lead nowhere, its records stay its own.

Symbolic links in a run directory (``.lock``, ``metrics.jsonl``, ``exports/``, ``checkpoints/``
...) pointing outside it are refused by name before anything is written, and nothing outside
the run is truncated, appended to or deleted. A fresh run over a failed one keeps that run's
records apart; a stop by SIGTERM in any phase is recorded ``interrupted``; a full disk at a
checkpoint names the file and the checkpoint to resume from; and the minor messages of the
issue say what happened in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.core.errors import SftError
from sft.engine import checkpoints
from sft.testing import run_sft, tiny_overrides

SECRET = "the user's own file, not sft's\n"


def _outside(tmp_path: Path, kind: str) -> Path:
    """Something of the user's outside the run: a file, or a folder holding what sft would delete
    there (``.tmp/`` of an export run, a checkpoint staging folder)."""
    outside = tmp_path / "outside" / kind
    if kind == "file":
        outside.parent.mkdir(parents=True)
        outside.write_text(SECRET)
    else:
        for name in (".tmp", ".staging-1", "checkpoint-1", "lora"):
            (outside / name).mkdir(parents=True)
            (outside / name / "keep.txt").write_text(SECRET)
    return outside


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() if p.is_file() else "/" for p in sorted(root.rglob("*"))}


#: (entry of the run, what it points at): every kind of link the issue found followed.
LINKS = [(".lock", "file"), ("metrics.jsonl", "file"), ("config.yaml", "file"), ("summary.json", "file"),
         ("checkpoints", "folder"), ("exports", "folder"), ("adapter", "folder"), ("checkpoints/.staging-1", "folder")]


def _linked_run(tmp_path: Path, entry: str, kind: str, source: Path | None = None) -> tuple[Path, Path]:
    run = tmp_path / "run"
    if source is not None:
        shutil.copytree(source, run)
    run.mkdir(exist_ok=True)
    outside = _outside(tmp_path, kind)
    link = run / entry
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / ".staging-1" if entry.endswith(".staging-1") else outside)
    return run, outside


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
@pytest.mark.parametrize("entry,kind", LINKS, ids=[e for e, _ in LINKS])
def test_sft_run_refuses_a_linked_entry_and_leaves_its_target_alone(tiny_model_dir, tmp_path, entry, kind, resume):
    run, outside = _linked_run(tmp_path, entry, kind)
    before = _snapshot(tmp_path / "outside")
    result = run_sft("run", *(["--resume"] if resume else []), *tiny_overrides(run, tiny_model_dir), check=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{run / entry} is a symbolic link" in result.output, result.output
    assert _snapshot(tmp_path / "outside") == before


@pytest.mark.parametrize("entry,kind", [("exports", "folder"), ("exports/lora", "folder"), ("summary.json", "file"),
                                        ("metrics.jsonl", "file")])
def test_sft_export_refuses_a_linked_entry_and_deletes_nothing_outside(tiny_run, tmp_path, entry, kind):
    run, outside = _linked_run(tmp_path, entry, kind, source=tiny_run)
    before = _snapshot(tmp_path / "outside")
    result = run_sft("export", run, "--exporter", "lora", check=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{run / entry} is a symbolic link" in result.output, result.output
    assert _snapshot(tmp_path / "outside") == before


def test_a_delete_reached_through_a_link_is_refused(tmp_path):
    """The one delete inside a run (``remove_inside``) resolves the path first: rotating the
    checkpoints of a run whose ``checkpoints/`` leads elsewhere deletes nothing there."""
    run = tmp_path / "run"
    run.mkdir()
    outside = _outside(tmp_path, "folder")
    (run / "checkpoints").symlink_to(outside)
    (outside / "checkpoint-2").mkdir()  # complete, so rotation deletes the older, incomplete checkpoint-1
    (outside / "checkpoint-2" / checkpoints.COMPLETE).write_text(json.dumps({"step": 2, "files": {}}))
    before = _snapshot(outside)
    with pytest.raises(SftError, match=r"\.staging-1: not deleted, its real path .* is outside the run directory"):
        checkpoints.staging_dir(run / "checkpoints", 1)
    with pytest.raises(SftError, match="outside the run directory"):
        checkpoints.rotate(run / "checkpoints", 1)
    assert _snapshot(outside) == before


# -- a fresh run over one that did not finish ----------------------------------------------------
def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]


def test_a_fresh_run_over_a_killed_one_starts_its_own_records(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run_sft("run", *tiny_overrides(run, tiny_model_dir))
    # Killed while saving its one checkpoint: nothing to resume, and its records stay.
    shutil.rmtree(run / "adapter")
    for marker in (run / "checkpoints").glob(f"*/{checkpoints.COMPLETE}"):
        marker.unlink()
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    earlier = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "config.yaml")}

    result = run_sft("run", *tiny_overrides(run, tiny_model_dir, steps=3))
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]  # not 1, 2, 1, 2, 3
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    previous = run / "previous" / "1"
    assert {name: (previous / name).read_bytes() for name in earlier} == earlier
    assert f"moved to {previous}" in result.output and "status interrupted" in result.output


# -- SIGTERM in every phase ------------------------------------------------------------------
def test_sigterm_before_training_is_recorded_interrupted(tiny_model_dir, tmp_path):
    """Stopped while it loads (config.yaml written, training not begun): ``interrupted``, not
    ``failed`` with the error of whichever library was importing when the signal came."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sft.cli", "run", *tiny_overrides(out, tiny_model_dir, steps=500)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (out / "config.yaml").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert not (out / "metrics.jsonl").exists(), "the signal came too late: training had begun"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert summary["status"] == "interrupted" and summary["error"] == "stopped by SIGTERM", summary
    assert "Traceback" not in err and "Error: stopped by SIGTERM" in err


# -- a full disk at a checkpoint ---------------------------------------------------------------
def test_a_full_disk_at_a_checkpoint_names_the_file_and_the_checkpoint_to_resume(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    import torch

    from sft.engine.run import run_training
    from sft.testing import tiny_config

    save = torch.save

    def full_disk_at_step_2(obj, f, *args, **kwargs):  # the disk fills while checkpoint-2 is written
        if ".staging-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_step_2)
    out = tmp_path / "run"
    with pytest.raises(SftError) as raised:
        run_training(tiny_config(out, tiny_model_dir, "training.save_steps=1", steps=4))
    message = str(raised.value)
    assert "\n" not in message
    assert str(out / "checkpoints" / "checkpoint-2") in message and "No space left on device" in message
    assert str(out / "checkpoints" / "checkpoint-1") in message and "--resume" in message
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 2 and summary["error"] == message
    assert [c.step for c in checkpoints.scan(out / "checkpoints")] == [1]  # nothing half-written is left
    assert not list((out / "checkpoints").glob(".staging-*"))


def test_a_full_disk_after_training_records_the_steps_trained(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    import peft.peft_model

    from sft.engine.run import run_training
    from sft.testing import tiny_config

    save = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):  # the library's write of adapter/ after the last checkpoint
        if "checkpoints" not in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left on device"):
        run_training(tiny_config(out, tiny_model_dir, steps=3))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 3, summary


# -- minor messages ------------------------------------------------------------------------------
def test_a_truncated_checkpoint_file_is_named_as_truncated(tiny_model_dir, tmp_path):
    from sft.testing import train_tiny

    run = train_tiny(tmp_path / "run", tiny_model_dir, "training.save_steps=1", steps=2)
    shutil.rmtree(run / "adapter")  # killed before its adapter: a run to resume
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    weights = run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # shrunk on disk after it was saved
    result = run_sft("run", "--resume", *tiny_overrides(run, tiny_model_dir, "sft:identity"), "training.save_steps=1")
    assert f"ignoring damaged checkpoint checkpoint-2: {weights} is truncated or corrupt (1000 bytes" in result.output
    assert "COMPLETE marker" not in result.output and "from checkpoint-1 (step 1)" in result.output


def test_sft_export_reports_an_os_error_in_one_line_naming_the_path(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "exports").write_text("a file where sft keeps its exports folder\n")
    result = run_sft("export", run, "--exporter", "lora", check=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    [failed] = [line for line in result.output.splitlines() if "FAILED" in line]
    assert "export lora: FAILED after" in failed and f"{run / 'exports' / 'lora'}: Not a directory" in failed
    assert result.output.count("Not a directory") == 1, result.output


def test_cache_dir_off_is_stored_as_off_and_reads_back(tiny_model_dir, tmp_path):
    from sft.engine.configuration import load_config
    from sft.engine.data.cache import cache_root

    run = tmp_path / "run"
    run_sft("run", *tiny_overrides(run, tiny_model_dir, steps=1), "data.cache_dir=off")
    assert "cache_dir: 'off'" in (run / "config.yaml").read_text()
    assert json.loads((run / "summary.json").read_text())["dataset"]["cache"] == "off"
    again = load_config(str(run / "config.yaml"))
    assert again.data.cache_dir == "off" and cache_root(again) is None
    hand_written = tmp_path / "mine.yaml"
    hand_written.write_text("data:\n  cache_dir: off\n")  # YAML reads a bare off as false
    assert load_config(str(hand_written)).data.cache_dir == "off"


def test_a_resume_keeps_the_runs_name(tiny_model_dir, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    named = [*tiny_overrides("", tiny_model_dir, "sft:identity", steps=2), "training.output_dir=null",
             "training.save_steps=1"]
    run_sft("run", *named, "training.run_name=forge")
    run = tmp_path / "runs" / "forge"
    shutil.rmtree(run / "adapter")  # killed before its adapter: a run to resume
    (run / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    result = run_sft("run", "--resume", *named)  # found by its config, no name given
    assert f"continuing the one unfinished run with this config, {Path('runs') / 'forge'}" in result.output
    assert OmegaConf.load(run / "config.yaml").training.run_name == "forge"
    assert "differs" not in result.output


@pytest.mark.parametrize("entry", ["loss.png", "metrics.jsonl"])
def test_sft_report_refuses_a_linked_entry(tiny_run, tmp_path, entry):
    run, outside = _linked_run(tmp_path, entry, "file", source=tiny_run)
    result = run_sft("report", run, check=False)
    assert result.exit_code != 0 and f"{run / entry} is a symbolic link" in result.output, result.output
    assert outside.read_text() == SECRET
