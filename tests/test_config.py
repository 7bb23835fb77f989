"""Config: YAML + flags + key=value, every error at once, did-you-mean, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sft.engine.configuration import load_config
from sft.core.errors import ConfigError
from sft.testing import make_plugin_manager


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager()


def _sft(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1"})


def test_misspelled_section_exits_2_with_did_you_mean():
    result = _sft("run", "traning.learning_rate=1")
    assert result.returncode == 2
    assert "did you mean 'training'" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_errors_are_both_reported():
    result = _sft("validate", "training.learning_rate=fast", "lora.rank=8")
    assert result.returncode == 2
    assert "training.learning_rate: expected float, got 'fast'" in result.stderr
    assert "lora.rank: unknown key (did you mean 'r'?)" in result.stderr
    assert "2 config error(s)" in result.stderr


def test_bad_choice_and_unknown_plugin_get_did_you_mean(pm):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["training.lr_scheduler_type=cosin", "template.name=chatmll"], pm=pm)
    text = str(info.value)
    assert "'cosin' is not one of" in text and "did you mean 'cosine'" in text
    assert "unknown chat template 'chatmll' (did you mean 'chatml'?)" in text
    with pytest.raises(ConfigError, match=r"unknown exporter 'GGUF' \(did you mean 'gguf'\?\)"):
        load_config(overrides=["export.enabled=[GGUF]"], pm=pm)


def test_yaml_flags_and_overrides_in_order_of_precedence(tmp_path, pm):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 1.0e-3\n  max_steps: 7\ntemplate:\n  name: chatml\n")
    cfg = load_config(str(path), ["training.max_steps=9"], {"training.learning_rate": 5e-5}, pm=pm)
    assert cfg.training.learning_rate == 5e-5
    assert cfg.training.max_steps == 9
    assert cfg.lora.r == 16  # untouched default


def test_text_keys_keep_the_text_written_on_the_command_line(pm, capsys):
    """YAML 1.1 would read 0123 as 83 (the run folder runs/83) and yes/on as true."""
    cfg = load_config(overrides=["training.run_name=0123", "training.generation_prompt=yes",
                                 "data.sharegpt.user=[on,human]", "training.packing=true", "model.revision=null",
                                 ], pm=pm)
    assert cfg.training.run_name == "0123" and cfg.training.generation_prompt == "yes"
    assert list(cfg.data.sharegpt.user) == ["on", "human"]
    assert cfg.training.packing == "true" and cfg.model.revision is None
    with pytest.raises(ConfigError, match="training.packing: 'on' is not one of"):
        load_config(overrides=["training.packing=on"], pm=pm)
    assert "Implicit conversion" not in capsys.readouterr().err


def test_options_of_a_plugin_the_run_does_not_use_get_a_notice(tmp_path, pm, capsys):
    load_config(overrides=["export.gguf.quants=[q4_k_m,q8_0]"], pm=pm)
    err = capsys.readouterr().err
    assert "export.gguf.quants set, but exporter 'gguf' is not in export.enabled (lora): it does nothing" in err
    load_config(overrides=["export.gguf.quants=[q4_k_m,q8_0]", "export.enabled=[lora,gguf]"], pm=pm)
    load_config(overrides=["preset=embedded"], pm=pm)  # a preset's own options are not the user's
    assert "does nothing" not in capsys.readouterr().err


def test_errors_say_whether_they_are_in_the_file_or_on_the_command_line(tmp_path, pm):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  max_stpes: 3\n")
    for overrides, where in ((["lora.r=4"], f"in {path}:"), (["lora.rr=4"], f"in {path} and the command line:")):
        with pytest.raises(ConfigError) as info:
            load_config(str(path), overrides, pm=pm)
        assert str(info.value).splitlines()[0].endswith(where)
    path.write_text("training:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["training.max_stpes=3"], {"lora.rr": 4}, pm=pm)
    assert str(info.value).splitlines()[0] == "2 config error(s) in the command line:"


def test_yaml_syntax_error_names_file_and_line(tmp_path, pm):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 3\n  learning_rate: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), pm=pm)
    assert f"{path}:" in str(info.value)


def test_repeatable_flags_map_to_lists(tmp_path):
    result = _sft("validate", "--exporter", "lora", "--exporter", "nope", "--logger", "consol")
    assert result.returncode == 2
    assert "export.enabled: unknown exporter 'nope'" in result.stderr
    assert "did you mean 'console'" in result.stderr


def test_cross_field_problems_are_reported(pm):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["training.max_steps=0", "training.eval_strategy=steps"], pm=pm)
    text = str(info.value)
    assert "training.max_steps" in text and "training.eval_strategy" in text


def test_nothing_heavy_loads_before_the_config_is_valid():
    code = textwrap.dedent(
        """
        import sys
        from click.testing import CliRunner
        from sft.cli import cli
        result = CliRunner().invoke(cli, ["run", "--dataset", "missing.json", "traning.x=1"])
        assert result.exit_code == 2, result.output
        print("HEAVY", [m for m in ("torch", "transformers", "datasets", "peft", "trl") if m in sys.modules])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_command_line_slips_get_one_line_with_the_fix():
    result = _sft("validate", "--logger", "-consol")
    assert result.returncode == 2 and "'consol' is not among the loggers (console) (did you mean 'console'?)" in result.stderr
    result = _sft("run", "data.jsonl")
    assert result.returncode == 2 and "got 'data.jsonl' (a dataset: --dataset data.jsonl)" in result.stderr
    result = _sft("validate", "--output", "")
    assert result.returncode == 2 and "--output is empty" in result.stderr
    result = _sft("preview", "-n", "-1")
    assert result.returncode == 2 and "Invalid value for '-n' / '--samples': -1 is not in the range x>=1" in result.stderr
