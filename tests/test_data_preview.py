"""``sft preview`` / ``sft run --dry-run`` / ``sft validate``: tokenizer only, fast, machine-readable."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

import pytest

from sft.testing import run_sft, write_jsonl

from datakit import FIXTURES, REAL_SHAREGPT


def _args(model_dir, dataset, tmp_path):
    return [f"model.name={model_dir}", f"data.dataset={dataset}", f"data.cache_dir={tmp_path / 'cache'}"]


def test_preview_json_has_samples_with_their_trained_text_counts_and_histogram(smollm2_dir, tmp_path):
    result = run_sft("preview", "--json", "-n", "2", *_args(smollm2_dir, FIXTURES / "sharegpt.json", tmp_path))
    data = json.loads(result.stdout)
    assert [s["trained_text"] for s in data["samples"]] == [
        ["A flash pattern tells sailors which lighthouse they are looking at, and it makes the light easier to spot "
         "against the lights of a town.<|im_end|>",
         "No. Each one has its own pattern, printed on nautical charts, such as two flashes every ten seconds.<|im_end|>"],
        ["Usually the dough did not rise enough: the yeast was old, the room was cold, or it was not kneaded long "
         "enough.\n\nTry letting it rise until it has doubled in size.<|im_end|>"],
    ]
    sample = data["samples"][0]
    assert "".join(s["text"] for s in sample["segments"]) == sample["text"]
    assert sample["text"].startswith("<|im_start|>user\nWhy do lighthouses flash")
    stats = data["stats"]
    assert {k: stats[k] for k in ("rows", "truncated", "fully_masked", "train_rows")} == {
        "rows": 3, "truncated": 0, "fully_masked": 0, "train_rows": 3}
    assert stats["skipped"]["count"] == 0 and 0 < stats["trained_tokens"] < stats["train_tokens"]
    assert sum(b["count"] for b in data["lengths"]["histogram"]) == 3
    assert data["config"]["template"] == "chatml" and data["config"]["format"] == "sharegpt"


def test_preview_text_marks_trained_tokens_and_shows_counts_and_lengths(smollm2_dir, tmp_path):
    result = run_sft("preview", "-n", "1", *_args(smollm2_dir, FIXTURES / "alpaca.jsonl", tmp_path), "--template", "alpaca")
    out = result.stdout
    # Not a terminal, so trained text is bracketed rather than coloured.
    assert "### Response:\n«Red, green and violet.<|im_end|>»" in out
    assert "token lengths" in out and "fully_masked" in out and "truncated" in out
    assert "3 rows (alpaca, template alpaca) → 3 train / 0 eval" in out


def test_run_dry_run_previews_and_trains_nothing(smollm2_dir, tmp_path):
    result = run_sft("run", "--dry-run", *_args(smollm2_dir, FIXTURES / "messages.jsonl", tmp_path),
                     f"training.output_dir={tmp_path / 'run'}")
    assert "«100 degrees Celsius, or 212 degrees Fahrenheit.<|im_end|>»" in result.stdout
    assert not (tmp_path / "run").exists()


def test_validate_reports_the_data_in_one_line(smollm2_dir, tmp_path):
    result = run_sft("validate", *_args(smollm2_dir, FIXTURES / "messages.jsonl", tmp_path), "data.test_size=1.0")
    assert re.fullmatch(r"config OK; data OK: 3 rows \(messages, template chatml\) → 2 train / 1 eval; skipped 0, "
                        r"truncated 0, fully masked 0; \d+ train tokens, \d+ trained; exports OK: lora",
                        result.stdout.strip())  # the exports' preflight runs in validate as in run


def test_validate_fails_with_the_located_error_and_exit_2(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Hi", "output": ""}])
    result = run_sft("validate", *_args(smollm2_dir, path, tmp_path), check=False)
    assert result.exit_code == 2
    assert f"Error: {path}:1, row 0, field 'output': empty text" in result.output


def test_validate_and_preview_never_load_model_weights(smollm2_dir, tmp_path):
    args = _args(smollm2_dir, FIXTURES / "sharegpt.json", tmp_path)
    code = (
        "import sys, transformers\n"
        "def refuse(*a, **k): raise AssertionError('model weights loaded')\n"
        "transformers.AutoModelForCausalLM.from_pretrained = refuse\n"
        "transformers.AutoModel.from_pretrained = refuse\n"
        "from sft.cli import cli\n"
        "for command in ('validate', 'preview'):\n"
        "    cli.main([command, *sys.argv[1:]], standalone_mode=False)\n"
        "print('torch' in sys.modules and any(m.startswith('transformers.models.llama.modeling') for m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False")  # no modeling code was even imported


@pytest.mark.skipif(not REAL_SHAREGPT.is_file(), reason=f"{REAL_SHAREGPT} is absent (clean checkout)")
def test_preview_of_the_500_conversation_file_takes_under_10_seconds(smollm2_dir, tmp_path):
    # A fresh process and an empty data cache: imports, tokenizer, parsing, rendering, tokenizing.
    # CPU time, not wall time: CI and dev machines run other jobs beside this one.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sft.cli", "preview", "--json",
                           *_args(smollm2_dir, REAL_SHAREGPT, tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "SFT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["rows"] == 500
    assert cpu < 10, f"sft preview used {cpu:.1f}s of CPU ({wall:.1f}s wall)"
