"""Distributed training on CPU: two processes on gloo, launched by ``sft run --nproc 2`` itself.

- DDP with two processes equals one process with the same global batch (loss, grad norm,
  LoRA weights), with one metrics.jsonl and one summary.json written by rank 0.
- kill -9 of rank 1 mid-run: the run fails with an error naming rank 1, the last complete
  checkpoint stays, and resuming it (on two processes, and on one) reaches the final loss of
  the uninterrupted run.
- What cannot run is refused before any process starts (FSDP2 on CPU, Unsloth + FSDP2,
  QLoRA + FSDP2 with the default 4-bit storage, a global batch that changes on resume).

FSDP2 does not run on CPU: accelerate shards only on accelerator devices (on gloo it would
train unsharded), so it is refused there; tests/gpu/test_distributed_gpu.py runs it.

The test process is the launcher (``sft.launch.launch``, what ``sft run --nproc 2``
calls); the workers are fresh interpreters and load only the bundled plugins. The tiny model
makes a step take milliseconds: the workers' start-up (importing torch, transformers, TRL)
is most of the time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sft.testing import tiny_overrides

STEPS, SAVE_EVERY, KILL_AFTER = 8, 2, 4
#: One process: batch 2 × accumulation 2; two processes keep that global batch (2 × 1 × 2).
SHARED = ["data.dataset=sft:identity", "data.split=train[:24]", "training.gradient_accumulation_steps=2",
          "distributed.keep_global_batch=true", f"training.save_steps={SAVE_EVERY}", "training.save_total_limit=4",
          "training.learning_rate=0.002", "training.warmup_steps=2"]
#: Rank 1 of a killed run pauses at the start of the step after KILL_AFTER (its checkpoint is
#: then complete) and says so through a file holding its pid; the test sends it SIGKILL there.
PAUSE_HOOK = '''
import os
if os.environ.get("LOCAL_RANK") == "1" and os.environ.get("SFT_TEST_PAUSE_FLAG"):
    import time
    from pathlib import Path
    import sft.engine.trainer as trainer_module

    build = trainer_module.trainer_class

    def trainer_class():
        cls = build()
        step = cls.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == int(os.environ["SFT_TEST_PAUSE_AT"]):
                Path(os.environ["SFT_TEST_PAUSE_FLAG"]).write_text(str(os.getpid()))
                time.sleep(600)
            return step(self, *args, **kwargs)

        cls.training_step = training_step
        return cls

    trainer_module.trainer_class = trainer_class
'''

#: Rank 1's loss becomes NaN at step NAN_AT; rank 0's stays finite.
NAN_HOOK = '''
import os
if os.environ.get("LOCAL_RANK") == "1" and os.environ.get("SFT_TEST_NAN_AT"):
    import sft.engine.trainer as trainer_module

    build = trainer_module.trainer_class

    def trainer_class():
        cls = build()
        loss_of = cls.compute_loss

        def compute_loss(self, *args, **kwargs):
            loss = loss_of(self, *args, **kwargs)
            return loss * float("nan") if self.state.global_step + 1 == int(os.environ["SFT_TEST_NAN_AT"]) else loss

        cls.compute_loss = compute_loss
        return cls

    trainer_module.trainer_class = trainer_class
'''


def _hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, **env: str) -> None:
    """Run ``code`` at the start of every worker (a ``sitecustomize`` module on their PYTHONPATH)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _config(out: Path, model: Path, *extra: str) -> Any:
    from sft.testing import tiny_config

    return tiny_config(out, model, *SHARED, *extra, steps=STEPS)


def _launch(out: Path, model: Path, *extra: str, resume: bool = False) -> Path:
    """``sft run --nproc 2`` as the CLI does it: this process is the launcher, the two workers are fresh ones."""
    from sft.launch import launch

    return launch(_config(out, model, "distributed.num_processes=2", *extra), resume=resume)


def _train(out: Path, model: Path, resume: bool = False) -> Path:
    from sft.engine.run import run_training

    return run_training(_config(out, model), resume=resume)


def _train_steps(run: Path) -> list[dict]:
    from sft.engine.metrics import read_metrics

    return [r for r in read_metrics(run) if "loss" in r]


def _lora(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _lora(a), _lora(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= atol, name


@pytest.fixture(autouse=True, scope="module")
def _bundled_plugins_only():
    """The workers are fresh interpreters: they and this process see only the bundled plugins.

    The process-wide plugin manager is rebuilt under that setting: one made earlier in the
    session has the installed plugins too, whose config sections the workers would refuse.
    """
    from sft.core.plugins import reset_plugin_manager

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFT_DISABLE_PLUGIN_AUTOLOAD", "1")
        reset_plugin_manager()
        yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same recipe on two processes (launched as sft run --nproc 2 does) and on one."""
    root = tmp_path_factory.mktemp("distributed")
    return {"ddp": _launch(root / "ddp", tiny_model_dir), "single": _train(root / "single", tiny_model_dir)}


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(runs):
    ddp, single = runs["ddp"], runs["single"]
    a, b = _train_steps(ddp), _train_steps(single)
    # One metrics.jsonl, one record per step: rank 0 logs the loss gathered over both ranks.
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        # Tolerance: float32 sums of the same terms in another order (two ranks' halves all-reduced).
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["step"]
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4), ra["step"]
        assert ra["tokens"] == rb["tokens"]  # tokens counted over every rank
    _assert_same_weights(ddp, single, atol=1e-5)

    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == STEPS
    assert summary["distributed"] == {"strategy": "ddp", "per_device": 2, "gradient_accumulation_steps": 1,
                                      "world_size": 2, "global_batch": 4}
    assert summary["tokens"] == json.loads((single / "summary.json").read_text())["tokens"]
    # Every rank wrote its part of each checkpoint, and rank 0 committed it whole.
    last = ddp / "checkpoints" / f"checkpoint-{STEPS}"
    manifest = json.loads((last / "COMPLETE").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "distributed.json", "adapter_model.safetensors"} <= set(manifest)
    assert not list(ddp.glob(".launch-config*")) and not list((ddp / "checkpoints").glob(".staging-*"))


def test_a_killed_rank_fails_the_run_and_resume_reaches_the_same_loss(runs, tiny_model_dir, tmp_path, monkeypatch,
                                                                      capfd):
    from sft.launch import DistributedError

    flag, killed = tmp_path / "paused", tmp_path / "killed"
    _hook(tmp_path, monkeypatch, PAUSE_HOOK, SFT_TEST_PAUSE_FLAG=str(flag), SFT_TEST_PAUSE_AT=str(KILL_AFTER))
    complete = killed / "checkpoints" / f"checkpoint-{KILL_AFTER}" / "COMPLETE"

    def kill_rank_1_once_paused() -> None:
        deadline = time.monotonic() + 240
        while not (flag.is_file() and flag.read_text() and complete.is_file()) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(int(flag.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1_once_paused, daemon=True)
    killer.start()
    with pytest.raises(DistributedError) as failure:
        _launch(killed, tiny_model_dir)
    killer.join(timeout=5)
    message = str(failure.value)
    assert "rank 1 (local rank 1) was killed by SIGKILL" in message
    assert f"the last complete checkpoint is kept: {killed / 'checkpoints' / f'checkpoint-{KILL_AFTER}'}" in message
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rank"] == 1
    assert not (killed / "adapter").exists()
    for name in ("PYTHONPATH", "SFT_TEST_PAUSE_FLAG", "SFT_TEST_PAUSE_AT"):
        monkeypatch.delenv(name)

    # Resume on two processes, and a copy on one: another world size, the same global batch (2 × 2 × 1).
    alone = tmp_path / "alone"
    shutil.copytree(killed, alone)
    capfd.readouterr()
    _launch(killed, tiny_model_dir, resume=True)
    err = capfd.readouterr().err
    assert f"from checkpoint-{KILL_AFTER} (step {KILL_AFTER})" in err
    assert "global batch 4 = 2 per device × 1 accumulation × 2 processes" in err  # the run log states it
    _train(alone, tiny_model_dir, resume=True)
    assert "on 2 process(es), continuing on 1 with the same global batch (4)" in capfd.readouterr().err

    uninterrupted = _train_steps(runs["ddp"])
    for run in (killed, alone):
        steps = _train_steps(run)
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # each step once, in one file
        assert steps[-1]["loss"] == pytest.approx(uninterrupted[-1]["loss"], rel=1e-5)
        _assert_same_weights(run, runs["ddp"], atol=1e-5)
        assert json.loads((run / "summary.json").read_text())["status"] == "ok"


def test_sigterm_to_the_launcher_stops_every_rank_and_keeps_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """accelerate 1.16 ends its launcher with sys.exit(128 + N) on a signal (1.0-1.12 raise
    SignalException): either way the run says so in one line, names the checkpoint, and is recorded."""
    import subprocess
    import sys

    from sft.testing import tiny_overrides

    flag, out = tmp_path / "paused", tmp_path / "run"
    _hook(tmp_path, monkeypatch, PAUSE_HOOK, SFT_TEST_PAUSE_FLAG=str(flag), SFT_TEST_PAUSE_AT=str(KILL_AFTER))
    complete = out / "checkpoints" / f"checkpoint-{KILL_AFTER}" / "COMPLETE"
    launcher = subprocess.Popen([sys.executable, "-m", "sft.cli", "run", *tiny_overrides(out, tiny_model_dir, steps=STEPS),
                                 *SHARED, "training.stop_grace_seconds=2", "--nproc", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (flag.is_file() and flag.read_text() and complete.is_file()) and time.monotonic() < deadline:
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert "the launcher got SIGTERM and stopped every rank" in last, err
    assert f"the last complete checkpoint is kept: {out.resolve() / 'checkpoints' / f'checkpoint-{KILL_AFTER}'}" in last
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tiny_model_dir, tmp_path, monkeypatch, capfd):
    from sft.launch import DistributedError

    nan_at = 3
    _hook(tmp_path, monkeypatch, NAN_HOOK, SFT_TEST_NAN_AT=str(nan_at))
    started = time.monotonic()
    with pytest.raises(DistributedError, match="exited with status 1"):
        _launch(tmp_path / "run", tiny_model_dir)
    err = capfd.readouterr().err
    # Both ranks stop at the same step, at once: none is left waiting in an all-reduce (gloo's
    # timeout would be 30 minutes).
    assert time.monotonic() - started < 240
    assert f"Error (rank 1): training stopped at step {nan_at}: the loss is nan" in err
    assert f"Error (rank 0): training stopped at step {nan_at}: the loss became NaN/inf on another rank" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "nan" and f"step {nan_at}" in summary["error"]
    assert f"checkpoint-{SAVE_EVERY}" in summary["error"]  # the last good checkpoint is named and kept
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{SAVE_EVERY}" / "COMPLETE").is_file()


def test_ranks_started_with_different_configs_refuse_naming_the_key(tiny_model_dir, tmp_path):
    """torchrun starting each rank from its own command line: the ranks compare their configs first."""
    import subprocess
    import sys

    from sft.testing import tiny_overrides

    # What a per-node script does wrong: each rank's own learning rate.
    rank_script = tmp_path / "rank.sh"
    args = " ".join(f"'{a}'" for a in [*tiny_overrides(tmp_path / "run", tiny_model_dir), "data.dataset=sft:identity"])
    rank_script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sft.cli run {args} '
                           f'"training.learning_rate=0.00$((LOCAL_RANK + 1))"\n')
    rank_script.chmod(0o755)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "--no-python", str(rank_script)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    line = ("rank 1's config differs from rank 0's at training.learning_rate: every rank of a job must be started "
            "with the same config file and key=value overrides")
    assert result.stderr.count(line) == 2, result.stderr  # both ranks refuse, before any training
    assert "0.002" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


# -- refused before any process starts ---------------------------------------------------------------
def _refusal(tmp_path: Path, model: Path, *extra: str) -> str:
    from click.testing import CliRunner

    from sft.cli import cli

    result = CliRunner().invoke(cli, ["run", *tiny_overrides(tmp_path / "run", model), "data.dataset=sft:identity",
                                      "--nproc", "2", *extra])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
    return result.output


def test_fsdp2_is_refused_on_cpu_before_any_process_starts(tiny_model_dir, tmp_path, sft_plugin_manager):
    out = _refusal(tmp_path, tiny_model_dir, "distributed.strategy=fsdp2")
    assert "fsdp2 needs CUDA GPUs" in out and "distributed.strategy=ddp" in out


def test_keep_global_batch_that_cannot_split_is_refused(tiny_model_dir, tmp_path, sft_plugin_manager):
    out = _refusal(tmp_path, tiny_model_dir, "training.gradient_accumulation_steps=3",
                   "distributed.keep_global_batch=true")
    assert "gradient_accumulation_steps=3 cannot be split over 2 processes" in out


def test_backends_declare_their_strategies(tiny_model_dir, tmp_path, sft_plugin_manager):
    from sft.testing import tiny_config

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "model.method=qlora", "distributed.strategy=fsdp2",
                      "model.dtype=bfloat16")
    unsloth = sft_plugin_manager.get("backend", "unsloth")
    transformers = sft_plugin_manager.get("backend", "transformers")
    assert unsloth.distributed_strategies == ("ddp",) and "no FSDP path" in unsloth.distributed_reason(cfg, "fsdp2")
    assert unsloth.distributed_reason(cfg, "ddp") is None
    # QLoRA + FSDP2: auto stores the 4-bit weights in the compute dtype; uint8 (bitsandbytes'
    # default) trains with loss 0 and NaN gradients under FSDP2, so it is refused.
    assert transformers.distributed_reason(cfg, "fsdp2") is None
    cfg.model.transformers.bnb_4bit_quant_storage = "uint8"
    assert "accelerate#3983" in transformers.distributed_reason(cfg, "fsdp2")
    cfg.model.transformers.bnb_4bit_quant_storage = "bfloat16"
    assert transformers.distributed_reason(cfg, "fsdp2") is None


def test_resume_with_another_global_batch_is_refused(runs, tiny_model_dir, tmp_path):
    from sft.engine.distributed import check_resume
    from sft.core.errors import SftError
    from sft.testing import make_plugin_manager, tiny_config

    checkpoint = runs["ddp"] / "checkpoints" / f"checkpoint-{STEPS}"
    pm = make_plugin_manager()
    same = tiny_config(tmp_path / "r", tiny_model_dir, *SHARED[1:], pm=pm)
    check_resume(checkpoint, same, 2)  # same world size
    check_resume(checkpoint, same, 1)  # keep_global_batch: 2 × 2 × 1 is still 4
    bigger = tiny_config(tmp_path / "r", tiny_model_dir, *SHARED[1:], "distributed.keep_global_batch=false", pm=pm)
    with pytest.raises(SftError, match="global batch of 4 .* this launch has global batch 8"):
        check_resume(checkpoint, bigger, 2)
    fsdp = tiny_config(tmp_path / "r", tiny_model_dir, *SHARED[1:], "distributed.strategy=fsdp2", pm=pm)
    with pytest.raises(SftError, match="FSDP2 run resumes with fsdp2 on the same number of processes only"):
        check_resume(checkpoint, fsdp, 2)
