"""``sft eval``: lm-evaluation-harness on the run's 16-bit model and its GGUF quants, parity, bad input.

The acceptance tests share the embedded default run (``embedded_default_run`` in conftest.py, trained
once per session with test_embedded_default.py) and work on a copy of it; the others use the
tiny random model, whose scores mean nothing but whose plumbing is the real one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sft.testing import run_sft, tiny_overrides

IDENTITY, KNOWLEDGE = "sft_identity", "sft_knowledge"


def _eval_json(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())


def _acc(record: dict, model: str, task: str) -> float:
    return record["models"][model]["results"][task]["acc"]


def corrupt_gguf(source: Path, target: Path, seed: int = 0) -> Path:
    """Copy ``source`` (a q8_0 GGUF) to ``target`` with the int8 weights of every Q8_0 tensor replaced
    by random ones. The f16 block scales stay, so the file loads and its logits stay finite: a
    broken quant that only its scores can give away."""
    import gguf
    import numpy as np

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(str(target), "r+")
    corrupted = 0
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        blocks = np.asarray(tensor.data).reshape(-1).view(np.uint8).reshape(-1, 34)  # f16 scale + 32 int8
        blocks[:, 2:] = rng.integers(0, 256, size=blocks[:, 2:].shape, dtype=np.uint8)
        corrupted += 1
    reader.data.flush()
    assert corrupted, f"{source} has no Q8_0 tensor to corrupt"
    return target


# -- acceptance: the embedded default --------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(embedded_default_run: Path, tmp_path_factory) -> tuple[Path, object]:
    """A copy of the embedded default run with a q8_0 GGUF, evaluated with ``sft eval --base``."""
    run = tmp_path_factory.mktemp("eval") / embedded_default_run.name
    shutil.copytree(embedded_default_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    run_sft("export", run, "--exporter", "gguf", "export.gguf.quants=[q8_0]")
    result = run_sft("eval", run, "--base", check=False)
    return run, result


@pytest.mark.slow
def test_the_trained_model_learned_its_identity_and_kept_its_knowledge(evaluated):
    run, result = evaluated
    assert result.exit_code == 0, result.output
    record = _eval_json(run)
    assert record["tasks"] == [IDENTITY, KNOWLEDGE] and record["ok"] is True
    trained, base = _acc(record, "run", IDENTITY), _acc(record, "base", IDENTITY)
    assert trained > base and trained >= 0.75, (trained, base)
    kept, known = _acc(record, "run", KNOWLEDGE), _acc(record, "base", KNOWLEDGE)
    # At most one of the twelve answers lost (measured: the base knows 10, the trained model 9).
    assert round(known * 12) >= 9 and round(kept * 12) >= round(known * 12) - 1, (kept, known)
    assert record["models"]["run"]["results"][IDENTITY]["samples"] == 12


@pytest.mark.slow
def test_the_q8_0_gguf_scores_within_the_threshold_of_the_16_bit_model(evaluated):
    run, result = evaluated
    record = _eval_json(run)
    rows = [r for r in record["parity"] if r["model"] == "gguf:q8_0"]
    assert {(r["task"], r["metric"]) for r in rows} == {(t, m) for t in (IDENTITY, KNOWLEDGE) for m in ("acc", "acc_norm")}
    assert all(r["ok"] and -r["diff"] <= record["max_drop"] for r in rows), rows
    assert record["max_drop"] == 0.05  # the stated default
    assert "Δ gguf:q8_0" in result.output and "gguf:q8_0" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["ok"] is True and summary["eval"]["path"].endswith("eval.json")


@pytest.mark.slow
def test_sft_report_shows_the_evaluation(evaluated):
    run, _ = evaluated
    output = run_sft("report", run).output
    assert "eval (ok; max drop 0.05)" in output and IDENTITY in output and "gguf:q8_0" in output


@pytest.mark.slow
def test_a_broken_quant_is_caught(evaluated, tmp_path: Path):
    source, _ = evaluated
    run = tmp_path / source.name
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("eval.json", "*.gguf"))
    [q8] = (source / "exports" / "gguf").glob("*-Q8_0.gguf")
    corrupt_gguf(q8, run / "exports" / "gguf" / q8.name)  # in place of the good one
    result = run_sft("eval", run, "--exporter", "gguf", "--tasks", IDENTITY, check=False)
    assert result.exit_code == 1, result.output
    record = _eval_json(run)
    assert set(record["models"]) == {"run", "gguf:q8_0"}  # the reference is always scored
    assert record["ok"] is False
    failed = [r for r in record["parity"] if not r["ok"]]
    assert failed and all(r["model"] == "gguf:q8_0" for r in failed)
    assert any(f.startswith("gguf:q8_0") for f in record["failures"]), record["failures"]
    assert "FAILED: gguf:q8_0" in result.output


# -- the tiny model: tasks, bad input, after training ----------------------------------------------
def test_a_yaml_task_pointing_at_local_files(tiny_run: Path, tmp_path: Path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # outside any git repository: lm-eval's git query must not reach stderr
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps({"q": q, "options": o, "gold": g}) + "\n" for q, o, g in [
        ("Capital of Italy?", ["Rome", "Oslo"], 0), ("Capital of Norway?", ["Rome", "Oslo"], 1),
        ("Capital of Peru?", ["Lima", "Cairo"], 0)]))
    task = tmp_path / "capitals.yaml"
    task.write_text(f"""task: capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{options}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
""")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = run_sft("eval", run, "--tasks", str(task), "--limit", "2")
    record = _eval_json(run)
    assert record["models"]["run"]["results"]["capitals"]["samples"] == 2
    assert 0 <= _acc(record, "run", "capitals") <= 1 and record["ok"]
    assert "scoring the run's model alone" in result.output  # the run has no export to compare
    assert "not a git repository" not in capfd.readouterr().err


def test_bad_input_gets_a_clear_error(tiny_run: Path, tmp_path: Path):
    result = run_sft("eval", tiny_run, "--tasks", "missing.yaml", check=False)
    assert result.exit_code == 2 and "--tasks: task file not found: missing.yaml" in result.output
    result = run_sft("eval", tiny_run, "--exporter", "gguf", check=False)
    assert result.exit_code == 1 and f"sft export {tiny_run} --exporter gguf" in result.output
    result = run_sft("eval", tiny_run, "--exporter", "guff", check=False)
    assert result.exit_code == 2 and "--exporter: unknown exporter 'guff' (did you mean 'gguf'?)" in result.output
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    result = run_sft("eval", empty, check=False)
    assert result.exit_code == 1 and "no config.yaml" in result.output
    result = run_sft("eval", tiny_run, "eval.max_drop=-1", check=False)
    assert result.exit_code == 2 and "eval.max_drop: must be >= 0, got -1.0" in result.output


def test_unknown_and_unreachable_tasks_are_named(monkeypatch):
    from sft.core.errors import SftError
    from sft.engine.evaluate import _load_tasks, _task_manager, resolve_tasks

    tm = _task_manager(["hellaswag"])  # lm-eval's whole index (about 11 s on 2 cores)
    with pytest.raises(SftError, match="unknown task 'sft_identiy' \\(did you mean 'sft_identity'\\?\\)"):
        resolve_tasks(["sft_identiy"], tm)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SftError, match="task 'hellaswag' cannot be loaded.*Hugging Face Hub: it needs the network"):
        _load_tasks(tm, resolve_tasks(["hellaswag"], tm))


def test_without_lm_eval_it_says_what_to_install(tiny_run: Path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    # As on a machine without the eval extra: the package cannot be found.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    result = run_sft("eval", tiny_run, check=False)
    assert result.exit_code == 1
    assert "pip install 'sft-forge[eval]'" in result.output and "lm-evaluation-harness" in result.output


def test_eval_after_export_runs_at_the_end_of_sft_run(tmp_path: Path, tiny_model_dir: Path, sft_plugin_manager):
    out = tmp_path / "run"
    result = run_sft("run", *tiny_overrides(out, tiny_model_dir), "export.enabled=[gguf]", "export.gguf.quants=[q8_0]",
                     f"eval.after_export=[{KNOWLEDGE}]", "eval.limit=3", "loggers.enabled=[tensorboard]")
    record = _eval_json(out)
    assert record["tasks"] == [KNOWLEDGE] and record["limit"] == 3
    assert set(record["models"]) == {"run", "gguf:q8_0"} and record["ok"], record["failures"]
    assert json.loads((out / "summary.json").read_text())["eval"]["ok"] is True
    assert "Δ gguf:q8_0" in result.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert f"eval/gguf:q8_0/{KNOWLEDGE}/acc" in scalars and f"eval/run/{KNOWLEDGE}/acc" in scalars


def test_an_after_export_task_that_cannot_run_stops_the_run_before_training(tmp_path: Path, tiny_model_dir: Path,
                                                                           sft_plugin_manager):
    out = tmp_path / "run"
    result = run_sft("run", *tiny_overrides(out, tiny_model_dir), "eval.after_export=[missing.yaml]", check=False)
    assert result.exit_code == 2 and "--tasks: task file not found: missing.yaml" in result.output
    assert not (out / "adapter").exists()
