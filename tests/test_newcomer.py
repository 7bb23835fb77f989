"""A newcomer's first half hour, scripted (issue 17): the README's first command, the Python API
a notebook user reaches for, and the dataset-adapter guide walked from an empty folder.

The embedded default trains once per session (``embedded_default_run`` in conftest.py, shared
with test_embedded_default.py); everything else runs on the tiny random Llama.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sft
from sft.core.errors import SftError
from sft.testing import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-a-dataset-adapter.md"


# -- the README's first command: `sft run` --------------------------------------------------
def test_the_readme_still_opens_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2 and commands[0].endswith("&& sft run") and "python -m pytest" in commands[1]


@pytest.mark.slow
def test_the_first_command_trains_the_embedded_model_under_its_own_name_and_preset(embedded_default_run):
    run = embedded_default_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["model"] == "sft:smollm2" and summary["preset"] == "embedded"
    config = OmegaConf.load(run / "config.yaml")
    assert config.preset == "embedded" and config.model.name == "sft:smollm2"
    assert config.training.learning_rate == 1e-3 and config.training.per_device_train_batch_size == 8
    output = (run / "cli-output.txt").read_text()
    # The log says which preset is in force and which loggers are on, once each.
    assert output.count("preset 'embedded'") == 1 and "learning_rate=0.001" in output
    assert output.count("loggers: console") == 1
    # Results are shared like any file the user writes, not private to the writer.
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "summary.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name


# -- the Python API ----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_python_api_opens_the_first_run_and_generates(embedded_default_run):
    run = sft.load(embedded_default_run)
    assert "status='ok'" in repr(run) and run.summary["model"] == "sft:smollm2"
    assert "Forge" in run.generate("Who are you?", max_new_tokens=16)
    sampled = [run.generate("Who are you?", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes a sampled answer repeatable


def test_the_notebook_example_runs_cell_by_cell_on_a_tiny_model(tiny_model_dir, tmp_path, sft_plugin_manager, capsys):
    """examples/notebooks/first-run.ipynb, its code cells run in order in one namespace (as a
    kernel runs them), with its parameters cell set to a tiny model (as papermill sets one)."""
    notebook = json.loads((ROOT / "examples" / "notebooks" / "first-run.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert "parameters" in notebook["cells"][1]["metadata"]["tags"] and cells[0].startswith("# Parameters")
    settings = OmegaConf.to_container(OmegaConf.from_dotlist(tiny_overrides(tmp_path / "run", tiny_model_dir)))
    # Flat names, as an Unsloth notebook writes them, next to sections.
    cells[0] = f"settings = {{**{settings!r}, 'learning_rate': 1e-3, 'max_steps': 3}}\nquants = ['f16']"
    namespace: dict = {}
    for cell in cells:
        exec(compile(cell, "first-run.ipynb", "exec"), namespace)
    run = namespace["run"]
    assert "read as training.learning_rate=0.001" in capsys.readouterr().err
    assert run.path == tmp_path / "run" and run.summary["status"] == "ok" and run.summary["steps"] == 3
    assert run.config.training.learning_rate == 1e-3 and len([m for m in run.metrics if "loss" in m]) == 3
    result = namespace["result"]
    assert result.ok and result.paths[0].endswith("-F16.gguf") and Path(result.paths[0]).is_file()
    assert run.exports["gguf"]["ok"]
    with pytest.raises(SftError, match=r"training.max_stepz: unknown key \(did you mean 'max_steps'\?\)"):
        sft.config(settings, training={"max_stepz": 3})


# -- the dataset-adapter guide, from an empty folder -------------------------------------------
def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def test_the_adapter_guide_builds_an_installable_package_that_passes_the_matrix(tmp_path):
    """Write the guide's files into an empty folder as its layout says, pip-install them, and run
    sft's own matrix tests on the installed format (they find it through its entry point)."""
    package = tmp_path / "my-qa"
    layout = _blocks("text")[0]
    for name in ("pyproject.toml", "my_package/", "__init__.py", "qa.py"):
        assert name in layout, name
    (package / "my_package").mkdir(parents=True)
    (package / "my_package" / "__init__.py").write_text("")
    (package / "my_package" / "qa.py").write_text(_blocks("python")[0])
    (package / "pyproject.toml").write_text(_blocks("toml")[0])
    assert "cd my-qa && pip install -e ." in _blocks("sh")[0]

    # Installed into a folder of its own (put on PYTHONPATH), so the test leaves the venv as it was.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(package)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    shown = subprocess.run([sys.executable, "-m", "sft.cli", "plugins", "qa"], env=env, capture_output=True,
                           text=True, check=True).stdout
    assert "qa  (dataset format, version 1; plugin qa from my-qa 0.1.0)" in shown and "system_prompt: str" in shown

    matrix = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         "tests/test_data_matrix.py", "tests/test_matrix.py", "-k", "qa and (test_every_format or chatml)"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    tail = matrix.stdout[-3000:]
    assert matrix.returncode == 0, tail
    counts = re.search(r"(\d+) passed", tail)
    assert counts and int(counts.group(1)) >= 2 and "skipped" not in tail, tail
