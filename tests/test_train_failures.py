"""How ``sft run`` fails: a bad config before anything heavy loads, a NaN loss with the last good checkpoint kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sft.testing import run_sft, tiny_overrides


def test_bad_config_exits_2_before_torch_is_imported(tmp_path):
    """``-X importtime`` lists every module the process imported: torch must not be among them."""
    env = {**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sft.cli", "run", "traning.x=1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "traning: unknown key (did you mean 'training'?)" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "sft.core.config" in imported  # the probe works
    heavy = {name for name in imported if name.split(".")[0] in ("torch", "transformers", "trl", "peft", "datasets")}
    assert not heavy, f"imported before validation: {sorted(heavy)[:10]}"
    assert not (tmp_path / "runs").exists()  # no run directory either


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, sft_plugin_manager):
    """An absurd learning rate blows the LoRA weights up after step 1; step 2's loss is NaN."""
    out = tmp_path / "run"
    overrides = tiny_overrides(out, tiny_model_dir, steps=6)
    result = run_sft("run", *overrides, "training.learning_rate=1e30", "training.save_steps=1", check=False)
    assert result.exit_code == 1
    assert "training stopped at step 2: the loss is nan" in result.output
    assert "checkpoint-1" in result.output
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1"] and (out / "checkpoints" / "checkpoint-1" / "COMPLETE").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "nan" and summary["steps"] == 1 and "step 2" in summary["error"]
    assert not (out / "adapter").exists()  # nothing trained on NaN is saved as the result
