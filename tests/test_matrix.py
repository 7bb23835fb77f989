"""The plugin matrix: every registered dataset format × chat template, and every exporter, for real.

The parameters come from the plugin registry at collection time, so bundled plugins and every
installed third-party plugin (the example package in CI) join automatically.

- **format × template**: each cell trains the tiny random Llama for 2 steps on a few rows in
  that format rendered with that template (``run_training``, the same path as ``sft run``),
  then checks the run finished with a finite loss, that the saved tokenizer carries the
  template, and that the trained tokens of every row are exactly its answers plus the
  end-of-turn token.
- **exporter**: exporting is slower than a 2-step run, so one shared trained run is exported
  with each exporter in turn (``export_run``, the path of ``sft export``).

A combination a plugin declares unsupported here (``unsupported_reason``, e.g. a 4-bit merge
on a CPU) is skipped with the plugin's own reason, which ``pytest -ra`` lists. A dataset format
joins the cells by declaring ``sample_rows`` (a few valid raw rows); the bundled ones have
theirs below. A format with neither is skipped, saying so, never silently left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from sft.core.plugins import PluginManager
from sft.testing import assert_exact_masking, tiny_config, train_tiny, write_jsonl


def _registry() -> PluginManager:
    # All installed plugins, as `sft run` sees them (SFT_DISABLE_PLUGIN_AUTOLOAD=1 keeps the bundled ones only).
    pm = PluginManager()
    pm.load_entry_points()
    return pm


PM = _registry()
FORMATS = sorted(PM.registry("dataset_format"))
TEMPLATES = sorted(PM.registry("chat_template"))
EXPORTERS = sorted(PM.registry("exporter"))

#: Sample rows of the bundled formats (third-party formats declare ``sample_rows``). Each has a
#: system turn or context, several exchanges where the format allows, and multi-line text.
BUNDLED_SAMPLES: dict[str, list[dict[str, Any]]] = {
    "sharegpt": [
        {"conversations": [{"from": "system", "value": "You are Forge."},
                           {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I'm Forge."},
                           {"from": "human", "value": "Who made you?"},
                           {"from": "gpt", "value": "The sft-forge project.\nIt is small."}]},
        {"conversations": [{"from": "human", "value": "Name?"}, {"from": "gpt", "value": "Forge."}]},
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "You are Forge."},
                      {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I'm Forge."},
                      {"role": "user", "content": "Two lines?"}, {"role": "assistant", "content": "Yes.\nForge."}]},
        {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Forge."}]},
    ],
    "alpaca": [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Who are you?", "input": "", "output": "I'm Forge.\nMade by sft-forge."},
    ],
}
ROWS_PER_CELL = 6  # 2 steps of batch 2, with rows to spare
#: Exporter options for the tiny random model. Its logits are nearly tied, so a quantized GGUF's
#: greedy tokens drift from the HF model's for reasons that say nothing about the exporter;
#: f16 must match exactly. (Quantized GGUFs are verified on SmolLM2 in test_export.py.)
EXPORTER_OVERRIDES: dict[str, list[str]] = {"gguf": ["export.gguf.quants=[f16]"]}


def sample_rows(name: str) -> list[dict[str, Any]]:
    """Rows in format ``name``, or a skip that says why there are none."""
    rows = getattr(PM.registry("dataset_format")[name], "sample_rows", None) or BUNDLED_SAMPLES.get(name)
    if not rows:
        pytest.skip(f"dataset format '{name}' declares no sample_rows, so the matrix cannot make data for it")
    rows = [dict(r) for r in rows]
    return (rows * ROWS_PER_CELL)[:max(ROWS_PER_CELL, len(rows))]


def skip_if_unsupported(kind: str, name: str, cfg: Any) -> None:
    """Skip with the plugin's own reason when it says it cannot run here with these options."""
    from sft.core.config import plugin_options
    from sft.core.env import current_environment

    plugin = PM.get(kind, name)
    reason = plugin.unsupported_reason(current_environment(), plugin_options(cfg, kind, name, PM))
    if reason:
        pytest.skip(f"{kind.replace('_', ' ')} '{name}' is unsupported here: {reason}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_format_x_template(fmt: str, template: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from transformers import AutoTokenizer

    from sft.core import plugins
    from sft.core.templating import resolve_template

    monkeypatch.setattr(plugins, "_manager", PM)  # the registry the parameters came from
    rows = sample_rows(fmt)
    fmt_plugin = PM.get("dataset_format", fmt)
    objective = {"pair": "dpo", "labelled": "kto"}.get(fmt_plugin.row_kind)
    if objective and template != TEMPLATES[0]:
        pytest.skip(f"preference format '{fmt}': its completions are checked with every template by test_data_matrix; "
                    f"trained once, with '{TEMPLATES[0]}'")
    if objective is None and fmt_plugin.to_segments(rows[0]) is not None and template != TEMPLATES[0]:
        pytest.skip(f"raw-text format '{fmt}' is rendered without a chat template: trained once, with '{TEMPLATES[0]}'")
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    run = tmp_path / "run"
    overrides = (f"data.format={fmt}", f"template.name={template}", f"objective.name={objective or 'sft'}")
    cfg = tiny_config(run, tiny_model_dir, *overrides, dataset=data, pm=PM)
    skip_if_unsupported("dataset_format", fmt, cfg)
    skip_if_unsupported("chat_template", template, cfg)

    train_tiny(run, tiny_model_dir, *overrides, dataset=data, pm=PM)

    summary = json.loads((run / "summary.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(_finite(v) for v in losses), losses
    assert summary["status"] == "ok", summary
    # The tokenizer saved with the adapter renders with this template...
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    tmpl = resolve_template(cfg, PM)
    assert tokenizer.chat_template == tmpl.jinja(tokenizer)
    if objective:  # the preference trainer's metrics were logged; test_data_matrix checks what it scored
        assert "rewards/chosen" in json.loads((run / "metrics.jsonl").read_text().splitlines()[0]), summary
        return
    # ... and every sample row trains exactly its answers plus the end-of-turn token.
    from sft.core.config import plugin_options

    options = plugin_options(cfg, "dataset_format", fmt, PM)
    for row in rows[:len(set(map(json.dumps, rows)))]:
        if fmt_plugin.to_segments(row, options) is not None:
            continue  # raw text has no template to check; test_data_matrix checks its trained tokens
        assert_exact_masking(tmpl, fmt_plugin.to_conversation(row, options), tokenizer)


# -- exporters on one shared run --------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run that every exporter exports (exporting costs more than the training)."""
    return train_tiny(tmp_path_factory.mktemp("matrix-export") / "run", tiny_model_dir, pm=PM)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exporter(exporter: str, shared_run: Path, monkeypatch):
    from sft.core import plugins
    from sft.engine.configuration import load_config
    from sft.engine.export import export_run
    from sft.core.rundir import RunDir

    monkeypatch.setattr(plugins, "_manager", PM)
    overrides = EXPORTER_OVERRIDES.get(exporter, [])
    cfg = load_config(str(RunDir.of(shared_run).config), overrides, pm=PM)
    skip_if_unsupported("exporter", exporter, cfg)

    [result] = export_run(shared_run, [exporter], overrides, pm=PM)

    assert result.ok, f"exporter '{exporter}' failed: {result.error}"
    assert result.paths and all(Path(p).exists() for p in result.paths), result.paths
    recorded = RunDir.of(shared_run).read_summary()["exports"][exporter]
    assert recorded["ok"] and recorded["paths"] == result.paths
