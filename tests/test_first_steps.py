"""What a newcomer meets in the first half hour (issue 17), one test per fix: model names,
presets, flat keys from other tools, the console logger, ``sft plugins NAME``, sampling,
the example configs, and the smaller stumbles."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sft
from sft.engine.configuration import load_config
from sft.core.errors import ConfigError, SftError
from sft.testing import run_sft, tiny_overrides, train_tiny, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sft-plugin-example"


# -- model names -------------------------------------------------------------------------------
def test_the_embedded_model_has_its_own_name_and_is_the_default(smollm2_dir):
    from sft.core.config import DEFAULT_MODEL
    from sft.engine.models import resolve_model

    assert DEFAULT_MODEL == "sft:smollm2" and load_config().model.name == "sft:smollm2"
    assert resolve_model("sft:smollm2") == str(smollm2_dir)
    with pytest.raises(ConfigError, match=r"model.name: no embedded model 'sft:smolm2' \(did you mean 'sft:smollm2'\?\)"):
        resolve_model("sft:smolm2")  # a config error: exit 2, like any other wrong value


def _offline(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))


def test_an_uncached_hub_id_fails_offline_at_once_and_is_never_the_embedded_copy(monkeypatch, tmp_path):
    from sft.engine.models import load_tokenizer

    _offline(monkeypatch, tmp_path / "empty-cache")
    cfg = load_config(overrides=["model.name=HuggingFaceTB/SmolLM2-135M-Instruct"])
    import huggingface_hub  # noqa: F401 - imported before the clock starts: the check is timed, not the import

    start = time.perf_counter()
    with pytest.raises(SftError, match=r"'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the local Hugging Face cache "
                                       r"and the Hub cannot be reached.*model.name=sft:smollm2"):
        load_tokenizer(cfg.model)
    assert time.perf_counter() - start < 5


def test_a_cached_hub_id_loads_the_hubs_files_offline(monkeypatch, tmp_path, tiny_model_dir):
    """The snapshot layout huggingface_hub writes: refs/main names the commit under snapshots/."""
    from sft.engine.models import load_tokenizer, resolve_model

    repo = tmp_path / "hub" / "models--someorg--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _offline(monkeypatch, tmp_path / "hub")
    assert resolve_model("someorg/tiny") == str(repo / "snapshots" / commit)
    assert len(load_tokenizer(load_config(overrides=["model.name=someorg/tiny"]).model)) > 1000


# -- presets and the one set of defaults -----------------------------------------------------
def test_one_set_of_defaults_and_the_embedded_preset_only_without_config_or_dataset(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    own = sft.config(dataset=str(data))
    assert own.preset is None and own.training.learning_rate == 2e-4
    assert own.training.per_device_train_batch_size == 2 and own.training.num_train_epochs == 1
    embedded = sft.config()
    assert embedded.preset == "embedded" and embedded.training.learning_rate == 1e-3
    assert embedded.training.num_train_epochs == 4 and embedded.training.per_device_train_batch_size == 8
    # The user's own values sit above the preset's.
    assert sft.config(**{"training.learning_rate": 5e-4}).training.learning_rate == 5e-4
    with pytest.raises(ConfigError, match=r"preset: 'embeded' is not one of embedded \(did you mean 'embedded'\?\)"):
        load_config(overrides=["preset=embeded"])


# -- flat keys from other tools --------------------------------------------------------------
def test_flat_keys_from_other_tools_resolve_to_their_dotted_key_with_a_notice(capsys):
    cfg = load_config(overrides=["learning_rate=1e-4", "num_train_epochs=3", "output_dir=out", "lora_r=8",
                                 "load_in_4bit=true"])
    assert (cfg.training.learning_rate, cfg.training.num_train_epochs, cfg.training.output_dir) == (1e-4, 3.0, "out")
    assert cfg.lora.r == 8 and cfg.model.method == "qlora"
    err = capsys.readouterr().err
    assert "learning_rate=0.0001 read as training.learning_rate=0.0001" in err
    assert "lora_r=8 read as lora.r=8" in err and "load_in_4bit=True read as model.method=qlora" in err


def test_an_alias_suggests_its_dotted_key_and_an_ambiguous_flat_key_is_not_guessed():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["lr=1e-4", "name=x"])
    text = str(err.value)
    assert "lr: unknown key (did you mean 'training.learning_rate'?)" in text
    assert re.search(r"- name: unknown key\b", text)  # model.name or template.name: not guessed


# -- the console logger ------------------------------------------------------------------------
def test_logger_flags_add_to_the_console_and_remove_only_when_asked():
    from sft.cli import _logger_list

    assert _logger_list(None, [], ("csv",), False) == ["console", "csv"]
    assert _logger_list(None, [], ("csv", "-console"), False) == ["csv"]
    assert _logger_list(None, [], ("csv",), True) == ["csv"]
    assert _logger_list(None, [], (), False) is None  # no flag: the config decides


def test_a_run_with_another_logger_keeps_the_console_and_says_which_loggers_are_on(
        sft_plugin_manager, tiny_model_dir, tmp_path):
    from sft_plugin_example import csv_logger

    sft_plugin_manager.register(csv_logger, "csv")
    args = [a for a in tiny_overrides(tmp_path / "run", tiny_model_dir) if not a.startswith("loggers.enabled")]
    result = run_sft("run", *args, "--logger", "csv", 'training.generation_prompt="Reply to:\\n    indented line"')
    assert "loggers: console, csv (metrics.jsonl and loss.png are always written)" in result.output
    assert "step 2/2" in result.output and (tmp_path / "run" / "metrics.csv").is_file()
    # A multi-line prompt keeps its indentation under its label; no value of the summary is cut mid-word.
    assert not re.search(r"_anot\s*$", result.output, re.M)
    assert "  prompt: Reply to:\n              indented line\n" in result.output, result.output


# -- sft plugins NAME ------------------------------------------------------------------------
def test_sft_plugins_name_shows_description_version_and_options(sft_plugin_manager):
    text = run_sft("plugins", "gguf").output
    assert text.startswith("gguf  (exporter, version 1; plugin exporters.gguf from sft-forge")
    assert "options (export.gguf.KEY=VALUE" in text
    assert re.search(r"^    quants: List\[str\] = \[q8_0\]  one of: f16, bf16, q8_0, .*q4_k_m", text, re.M)
    [entry] = json.loads(run_sft("plugins", "sharegpt", "--json").output)
    assert entry["kind"] == "dataset_format" and entry["version"] and entry["description"]
    assert {o["key"] for o in entry["options"]} >= {"data.sharegpt.conversations_key"}
    assert all({"type", "default", "choices", "help"} <= set(o) for o in entry["options"])
    unknown = run_sft("plugins", "shargpt", check=False)
    assert unknown.exit_code == 1 and "no plugin named 'shargpt' (did you mean 'sharegpt'?)" in unknown.output


# -- sampling in sft generate / sft chat -----------------------------------------------------
def test_generate_samples_repeatably_with_a_seed_and_takes_a_system_prompt(tiny_run):
    args = ["generate", tiny_run, "Who are you?", "--max-new-tokens", "6", "--temperature", "1.0", "--top-p", "0.9",
            "--seed", "5", "--system", "Answer briefly."]
    first, second = run_sft(*args).stdout, run_sft(*args).stdout
    assert first == second and first.strip()
    bad = run_sft("generate", tiny_run, "x", "--top-p", "0", check=False)
    assert bad.exit_code == 1 and "top_p in (0, 1]" in bad.output


def test_chat_takes_the_sampling_options(tiny_run):
    result = run_sft("chat", tiny_run, "--max-new-tokens", "3", "--system", "Be terse.", "--temperature", "0.7",
                     "--seed", "1", input="hello\n\n")
    assert result.exit_code == 0 and "bot> " in result.stdout


# -- example configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_example_config_validates_with_a_local_tiny_model(path, tiny_model_dir, sft_plugin_manager):
    from sft.engine.configuration import read_yaml

    data = read_yaml(str(path))["data"]
    local = "text.jsonl" if data.get("format") == "text" else "alpaca.jsonl"  # raw text for a pre-training recipe
    swap = [] if data["dataset"].startswith("sft:") else [f"data.dataset={ROOT / 'tests' / 'data' / local}"]
    result = run_sft("validate", str(path), f"model.name={tiny_model_dir}", *swap)
    assert "config OK; data OK" in result.output
    assert path.read_text().startswith("# ")  # each says what it is for and how to run it


# -- smaller stumbles ------------------------------------------------------------------------
def test_a_run_that_fails_before_training_leaves_a_summary(tiny_model_dir, tmp_path):
    from sft.core.errors import DataError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": None}])
    with pytest.raises(DataError):
        train_tiny(tmp_path / "run", tiny_model_dir, dataset=bad)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "field 'output': null value" in summary["error"]


def test_run_files_are_written_with_the_users_umask(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "summary.json"):
        assert stat.S_IMODE((tiny_run / name).stat().st_mode) == 0o666 & ~umask, name


def test_sft_report_never_cuts_a_word_at_80_columns(tiny_run, monkeypatch):
    from sft.engine.metrics import wrap_value

    assert wrap_value("/tmp/pytest-of-root/pytest-35/test_tokens_are_the_real_token0/run", 30).splitlines() == [
        "/tmp/pytest-of-root/pytest-35/", "test_tokens_are_the_real_", "token0/run"]
    assert wrap_value("I'm Forge, an assistant made by the sft-forge project.", 20).splitlines() == [
        "I'm Forge, an", "assistant made by", "the sft-forge", "project."]
    monkeypatch.setenv("COLUMNS", "80")
    lines = run_sft("report", tiny_run).stdout.splitlines()
    assert max(map(len, lines)) <= 80


def test_sft_export_is_as_quiet_as_sft_run(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "sft.cli", "export", str(run), "--exporter", "merged_16bit"],
                         capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    assert "export merged_16bit: ok" in text
    assert "Warning" not in text and "it/s" not in text and "Loading weights" not in text, text


def test_the_example_readmes_command_works_with_the_shipped_dolly_file(sft_plugin_manager, monkeypatch):
    from sft_plugin_example import csv_logger, dolly, folder, vicuna

    for module in (dolly, vicuna, csv_logger, folder):
        sft_plugin_manager.register(module, module.__name__)
    [command] = [line for line in (EXAMPLE / "README.md").read_text().splitlines() if line.startswith("sft run ")]
    monkeypatch.chdir(EXAMPLE)
    result = run_sft("validate", *command.split()[2:])
    assert "config OK; data OK: 12 rows (dolly, template vicuna)" in result.output
