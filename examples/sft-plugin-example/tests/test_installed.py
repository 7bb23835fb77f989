"""Installed through its entry points, the package shows in `sft plugins` and `sft run` uses it end to end.

These run `sft` as a separate process, so they see exactly what `pip install` registered
(run `pip install -e examples/sft-plugin-example` first).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from sft.testing import tiny_overrides, write_jsonl

from sft_plugin_example.modelcard import read_front_matter

DIST, VERSION = "sft-plugin-example", "0.1.0"
PROVIDES = {
    "sft_plugin_example.dolly": {"dataset_format": ["dolly"]},
    "sft_plugin_example.vicuna": {"chat_template": ["vicuna"]},
    "sft_plugin_example.csv_logger": {"logger": ["csv"]},
    "sft_plugin_example.folder": {"publisher": ["folder"]},
}
ROWS = [
    {"instruction": f"What is {a} plus {b}?", "context": "" if a % 2 else "Answer with a number.",
     "response": str(a + b), "category": "open_qa"}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 4)]
]


def sft(*args: str) -> subprocess.CompletedProcess:
    # The installed console script's module, in a clean process; autoload on whatever the caller set.
    env = {k: v for k, v in os.environ.items() if k != "SFT_DISABLE_PLUGIN_AUTOLOAD"}
    return subprocess.run([sys.executable, "-m", "sft.cli", *args], capture_output=True, text=True, env=env)


def test_sft_plugins_lists_each_plugin_with_the_distribution_and_version():
    result = sft("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = {p["name"]: p for p in json.loads(result.stdout)}
    missing = set(PROVIDES) - set(listing)
    assert not missing, f"not installed? pip install -e examples/sft-plugin-example (missing {missing})"
    for name, provides in PROVIDES.items():
        assert listing[name]["distribution"] == DIST and listing[name]["version"] == VERSION
        assert listing[name]["status"] == "ok" and listing[name]["provides"] == provides
    table = sft("plugins")
    assert table.returncode == 0 and DIST in table.stdout and "vicuna" in table.stdout


def test_sft_run_uses_the_installed_format_template_logger_and_publisher(tiny_model_dir, tmp_path: Path):
    data = write_jsonl(tmp_path / "dolly.jsonl", ROWS)
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run, tiny_model_dir) if not o.startswith(("loggers.", "export."))]
    published = tmp_path / "published"
    result = sft("run", "--dataset", str(data), "--format", "dolly", "--template", "vicuna",
                 "--logger", "csv", "--exporter", "lora", f"publish.folder.path={published}", *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # dolly + vicuna: the saved tokenizer renders the training text, context included.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("USER: Hi ASSISTANT:")
    # csv: one row per logged step.
    logged = (run / "metrics.jsonl").read_text().splitlines()
    assert len((run / "metrics.csv").read_text().splitlines()) == len(logged) + 1
    # folder: the lora export published as it was written, with its card, and recorded in summary.json.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["publish"]["folder"]["exports"]["lora"]["ok"], summary["publish"]
    target = published / "run"
    weights = "adapter_model.safetensors"
    assert (target / "lora" / weights).read_bytes() == (run / "exports" / "lora" / weights).read_bytes()
    assert weights in (target / "manifest.json").read_text()
    card = read_front_matter((target / "README.md").read_text())
    assert card["base_model"] == str(tiny_model_dir) and "vicuna" in card["tags"]

    # sft publish sends a finished run again, to a new place, through the same installed plugin.
    again = sft("publish", str(run), "--to", "folder", f"publish.folder.path={tmp_path / 'elsewhere'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "elsewhere" / "run" / "lora" / weights).is_file()
