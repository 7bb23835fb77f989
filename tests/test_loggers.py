"""Loggers, metrics.jsonl, loss.png and `sft report`, checked on one real tiny training run.

The run is ``sft run``'s own ``run_training`` on the random tiny Llama and the embedded
dataset: a few steps, evaluation on, the ``lora`` export, and the loggers all at once:
``console`` (plain, as in CI), ``wandb`` (offline), ``tensorboard`` (when installed) and
``broken`` (a test plugin that raises on its second ``log``). Every test below reads what that
run left behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sft.core import hookimpl
from sft.core.interfaces import Logger, RunInfo
from sft.engine.metrics import (
    EVAL_COLOR,
    TRAIN_COLOR,
    MetricsHub,
    loss_series,
    plot_loss,
    read_metrics,
    write_loss_plot,
)

MAX_STEPS = 6
EVAL_STEPS = 2
#: A fake key in W&B's format: it must not show up in any file or any output of the run.
FAKE_API_KEY = "0123456789abcdef0123456789abcdef0badc0de"
ESCAPE = re.compile(r"\x1b|\r|\x07")
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
#: The loggers of the shared run, all at once (tensorboard is an optional extra).
LOGGERS = ["console", "wandb", *(["tensorboard"] if HAS_TENSORBOARD else []), "broken"]


class BrokenLogger(Logger):
    """Raises on its second ``log`` call, like a logger whose backend went away mid-run."""

    name = "broken"
    description = "test logger that fails"

    def __init__(self) -> None:
        self.calls = 0

    def start(self, run: RunInfo, options: Any = None) -> None:
        self.calls = 0

    def log(self, step: int, metrics: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("backend went away")

    def finish(self, summary: Any) -> None:
        self.calls += 1


class BrokenPlugin:
    logger = BrokenLogger()

    @hookimpl
    def register_loggers(self, register) -> None:
        register(self.logger)


@dataclass
class LoggedRun:
    run_dir: Path
    stdout: str
    stderr: str
    broken: BrokenLogger


def _config(run_dir: Path, model_dir: Path, pm: Any):
    from sft.engine.configuration import load_config

    return load_config(overrides=[
        f"model.name={model_dir}",
        "model.method=lora",
        f"training.output_dir={run_dir}",
        f"training.max_steps={MAX_STEPS}",
        "training.logging_steps=1",
        f"training.eval_steps={EVAL_STEPS}",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.warmup_steps=0",
        "training.learning_rate=1e-3",
        "data.test_size=4.0",
        "export.enabled=[lora]",
        f"loggers.enabled=[{','.join(LOGGERS)}]",
        "loggers.console.style=plain",
        "loggers.wandb.mode=offline",
        "loggers.wandb.tags=[test]",
        "loggers.wandb.watch=gradients",
        "loggers.wandb.watch_log_freq=2",
    ], pm=pm)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> LoggedRun:
    from sft.core import plugins
    from sft.testing import make_plugin_manager
    from sft.engine.run import run_training

    run_dir = tmp_path_factory.mktemp("logged") / "run"
    broken = BrokenPlugin()
    pm = make_plugin_manager((broken, "broken-logger"))
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plugins, "_manager", pm)
        mp.setenv("WANDB_API_KEY", FAKE_API_KEY)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_DIR", raising=False)
        cfg = _config(run_dir, tiny_model_dir, pm)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_training(cfg, pm=pm)
    return LoggedRun(run_dir, out.getvalue(), err.getvalue(), broken.logger)


# -- metrics.jsonl ------------------------------------------------------------------------
def test_metrics_jsonl_has_every_step_and_the_evals(logged_run: LoggedRun) -> None:
    records = read_metrics(logged_run.run_dir)
    train = [r["step"] for r in records if "loss" in r]
    evals = [r["step"] for r in records if "eval_loss" in r]
    assert train == list(range(1, MAX_STEPS + 1))
    assert evals == list(range(EVAL_STEPS, MAX_STEPS + 1, EVAL_STEPS))
    assert all("learning_rate" in r for r in records if "loss" in r)


# -- console --------------------------------------------------------------------------
def test_console_plain_output_has_no_escape_codes_and_one_line_per_logging_step(logged_run: LoggedRun) -> None:
    out = logged_run.stdout
    assert not ESCAPE.search(out), repr(out[:500])
    records = read_metrics(logged_run.run_dir)
    train_lines = [line for line in out.splitlines() if line.startswith("step ")]
    eval_lines = [line for line in out.splitlines() if line.startswith("eval step ")]
    assert len(train_lines) == sum("loss" in r for r in records) == MAX_STEPS
    assert len(eval_lines) == sum("eval_loss" in r for r in records)
    # Each line shows the step of the total, the loss as logged and the learning rate.
    for line, record in zip(train_lines, [r for r in records if "loss" in r]):
        assert line.startswith(f"step {record['step']}/{MAX_STEPS}  loss {record['loss']:.4f}  lr "), line
    assert "run summary" in out and "train_loss" in out


def test_console_rich_mode_draws_a_progress_bar() -> None:
    from sft.plugins.loggers.console import ConsoleLogger, ConsoleOptions

    out = io.StringIO()
    logger = ConsoleLogger()
    with contextlib.redirect_stdout(out):
        logger.start(RunInfo("bar", "/tmp/bar", {}, total_steps=4), ConsoleOptions(style="rich"))
        for step in range(1, 5):
            logger.log(step, {"loss": 1.0 / step, "learning_rate": 1e-4, "tokens_per_second": 5000.0})
        logger.finish({"status": "ok", "steps": 4})
    text = out.getvalue()
    assert "\x1b[" in text  # a terminal gets colour and cursor control ...
    assert "4/4" in text and "tok/s" in text and "loss 0.2500" in text and "lr 1.00e-04" in text  # ... and the bar


def test_console_auto_mode_is_plain_when_not_a_terminal() -> None:
    from sft.plugins.loggers.console import ConsoleLogger

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        logger = ConsoleLogger()
        logger.start(RunInfo("pipe", "/tmp/pipe", {}, total_steps=2))
        logger.log(1, {"loss": 2.0, "learning_rate": 2e-4, "grad_norm": 0.5, "epoch": 0.5})
        logger.log(2, {"loss": float("nan"), "tokens": 4096})
        logger.finish({"generation": {"text": "[/bold] Hi![INST]"}})  # data, not rich markup
    assert "generation.text   [/bold] Hi![INST]" in out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("step 1/2  loss 2.0000  lr 2.00e-04  grad_norm 0.5000  epoch 0.50")
    assert lines[2].startswith("step 2/2  loss nan  tok/s ")  # rate from the cumulative token count
    assert not ESCAPE.search(out.getvalue())


# -- loss.png -------------------------------------------------------------------------
def test_loss_plot_shows_train_and_eval_curves_from_metrics(logged_run: LoggedRun) -> None:
    records = [json.loads(line) for line in (logged_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    series = loss_series(logged_run.run_dir)
    assert series.train_steps == [r["step"] for r in records if "loss" in r]
    assert series.train_loss == [r["loss"] for r in records if "loss" in r]
    assert series.eval_steps == [r["step"] for r in records if "eval_loss" in r]
    assert series.eval_loss == [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(series.eval_steps) >= 2

    # The figure plots exactly those two series.
    lines = plot_loss(series).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["train loss", "eval loss"]
    assert list(lines[0].get_xdata()) == series.train_steps and list(lines[0].get_ydata()) == series.train_loss
    assert list(lines[1].get_xdata()) == series.eval_steps and list(lines[1].get_ydata()) == series.eval_loss

    # The PNG on disk is a real PNG in which both curves' colours cover many pixels.
    png = logged_run.run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _pixels_of(png, TRAIN_COLOR) > 300
    assert _pixels_of(png, EVAL_COLOR) > 150


def _pixels_of(png: Path, color: str) -> int:
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    pixels = imread(png)[..., :3]
    return int((np.abs(pixels - np.array(to_rgb(color))).max(axis=-1) < 0.04).sum())


def test_loss_plot_without_eval_has_one_curve(tmp_path: Path) -> None:
    hub = MetricsHub(tmp_path)
    hub.start(RunInfo("no-eval", str(tmp_path), {}))
    for step, loss in [(1, 3.0), (2, 2.5), (3, float("nan"))]:
        hub.log(step, {"loss": loss})
    write_loss_plot(tmp_path)
    series = loss_series(tmp_path)
    assert series.train_steps == [1, 2, 3] and series.eval_steps == []
    assert series.train_loss[:2] == [3.0, 2.5] and series.train_loss[2] != series.train_loss[2]  # nan kept
    assert _pixels_of(tmp_path / "loss.png", TRAIN_COLOR) > 100
    assert _pixels_of(tmp_path / "loss.png", EVAL_COLOR) == 0


def test_sft_report_regenerates_the_plot_and_prints_the_summary(logged_run: LoggedRun) -> None:
    from click.testing import CliRunner

    from sft.cli import cli

    png = logged_run.run_dir / "loss.png"
    png.unlink()
    result = CliRunner().invoke(cli, ["report", str(logged_run.run_dir)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((logged_run.run_dir / "summary.json").read_text())
    assert "steps" in result.output and str(summary["steps"]) in result.output
    assert "train loss: " in result.output and f"at step {MAX_STEPS}" in result.output
    assert str(png) in result.output


def test_sft_report_on_a_folder_without_metrics_says_so(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sft.cli import cli

    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "metrics.jsonl: no metrics file" in result.output


# -- a logger that raises -----------------------------------------------------------------
def test_a_logger_that_raises_is_reported_once_and_disabled_and_the_run_finishes(logged_run: LoggedRun) -> None:
    assert logged_run.broken.calls == 2  # never called again after it raised: not even finish()
    assert logged_run.stderr.count("logger 'broken' failed") == 1
    assert "RuntimeError: backend went away" in logged_run.stderr
    assert "drop it from loggers.enabled" in logged_run.stderr
    # The run carried on: every step reached metrics.jsonl and the other loggers, and the run ended.
    assert [r["step"] for r in read_metrics(logged_run.run_dir) if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert sum(line.startswith("step ") for line in logged_run.stdout.splitlines()) == MAX_STEPS
    assert json.loads((logged_run.run_dir / "summary.json").read_text())["steps"] == MAX_STEPS
    assert (logged_run.run_dir / "loss.png").exists()


def test_misconfigured_wandb_is_disabled_with_how_to_fix_it(tmp_path: Path) -> None:
    """Online mode with no API key anywhere: wandb is reported once, disabled, and logging goes on.

    In a fresh process: wandb caches the credentials of an earlier run in the process (the
    offline run above had a key), and with those it would try the network instead of failing.
    """
    import os
    import subprocess
    import sys

    script = (
        "from sft.core.interfaces import RunInfo\n"
        "from sft.engine.metrics import MetricsHub\n"
        "from sft.plugins.loggers.wandb import WandbLogger, WandbOptions\n"
        "import sys\n"
        "hub = MetricsHub(sys.argv[1], [(WandbLogger(), WandbOptions(mode='online'))])\n"
        "hub.start(RunInfo('online', sys.argv[1], {}))\n"
        "hub.log(1, {'loss': 1.0})\n"
        "hub.log(2, {'loss': 0.5})\n"
        "hub.finish({'status': 'ok'})\n"
        "print(sorted(hub.disabled))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no ~/.config/wandb
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", script, str(run)], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['wandb']"
    assert result.stderr.count("logger 'wandb' failed in start()") == 1
    assert "wandb login" in result.stderr and "WANDB_API_KEY" in result.stderr
    assert "loggers.wandb.mode=offline" in result.stderr
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


# -- wandb ----------------------------------------------------------------------------
def read_wandb_records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` transaction log, as wandb's own protobuf ``Record`` messages.

    wandb 0.31 ships no Python reader for this file (its writer and reader live in the Go
    ``wandb-core``), so this is the documented LevelDB log format: a 7-byte ``:W&B`` header,
    32 KiB blocks, each chunk ``crc32 | length | type`` with FULL/FIRST/MIDDLE/LAST chunks. The
    checksums are verified, so a misread fails loudly.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a .wandb file"
    seeds = [zlib.crc32(bytes([kind])) for kind in range(5)]
    records, pending, i = [], b"", 7
    while i + 7 <= len(data):
        left = 32768 - i % 32768
        if left < 7:  # block trailer padding
            i += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[i:i + 7])
        chunk = data[i + 7:i + 7 + length]
        i += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, seeds[kind]) & 0xFFFFFFFF == checksum, f"bad checksum at byte {i}"
        pending += chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(run_dir: Path) -> tuple[list[dict], dict, dict, dict]:
    """(history rows, config, final summary, run record fields) of the run's offline W&B run."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history, config, summary, run = [], {}, {}, {}
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            run = {"name": record.run.display_name, "project": record.run.project, "tags": list(record.run.tags)}
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return history, config, summary, run


def test_with_the_wandb_logger_off_nothing_of_wandb_shows_under_wandb_mode_offline(
        tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> None:
    """WANDB_MODE=offline set in the shell (for other projects): a run without the wandb logger neither
    imports wandb nor prints transformers' "Running in WANDB offline mode"."""
    import os
    import subprocess
    import sys

    from sft.testing import tiny_overrides

    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('wandb imported:', 'wandb' in sys.modules, file=sys.stderr))\n"
              "from sft.cli import main\nmain()\n")
    out = tmp_path_factory.mktemp("quiet") / "run"  # a path without the word in it: the output is searched
    overrides = [o for o in tiny_overrides(out, tiny_model_dir) if not o.startswith("loggers.")]
    env = {**os.environ, "WANDB_MODE": "offline", "SFT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([sys.executable, "-c", script, "run", *overrides, "loggers.enabled=[console]"], env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wandb imported: False" in result.stderr
    output = (result.stdout + result.stderr).lower()
    assert "wandb" not in output.replace("wandb imported: false", "")


def test_wandb_offline_run_has_the_same_loss_series_as_metrics_jsonl(logged_run: LoggedRun) -> None:
    history, config, summary, run = _wandb_run(logged_run.run_dir)
    records = read_metrics(logged_run.run_dir)
    assert [(h["train/global_step"], h["train/loss"]) for h in history if "train/loss" in h] == \
        [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(h["train/global_step"], h["eval/loss"]) for h in history if "eval/loss" in h] == \
        [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [h["train/learning_rate"] for h in history if "train/loss" in h] == \
        [r["learning_rate"] for r in records if "loss" in r]

    # watch=gradients: wandb.watch's histograms of the gradients arrived too.
    assert any(key.startswith("gradients/") for h in history for key in h), sorted(history[-1])
    assert run == {"name": "run", "project": "sft", "tags": ["test"]}
    assert config["training"]["max_steps"] == MAX_STEPS and config["loggers"]["wandb"]["mode"] == "offline"
    assert summary["sft"]["steps"] == MAX_STEPS and summary["sft"]["status"] == "ok"


def test_wandb_summary_has_the_export_paths(logged_run: LoggedRun) -> None:
    """The loggers finish after the exports, so the W&B run lists the paths of what was exported."""
    _history, _config, summary, _run = _wandb_run(logged_run.run_dir)
    exported = json.loads((logged_run.run_dir / "summary.json").read_text())["exports"]
    assert exported["lora"]["paths"]
    assert summary.get("exports") == {"lora": exported["lora"]["paths"]}


def test_wandb_api_key_is_never_written(logged_run: LoggedRun) -> None:
    assert FAKE_API_KEY not in logged_run.stdout + logged_run.stderr
    for path in logged_run.run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_API_KEY.encode() not in path.read_bytes(), path


def test_wandb_logs_export_paths_and_redacts_secrets() -> None:
    from sft.engine.metrics import export_paths
    from sft.plugins.loggers.wandb import redact, wandb_metrics

    summary = {"exports": {"lora": {"ok": True, "paths": ["runs/x/exports/lora"]},
                           "gguf": {"ok": True, "paths": ["a.gguf", Path("Modelfile")]}}}
    assert export_paths(summary) == {"lora": ["runs/x/exports/lora"], "gguf": ["a.gguf", "Modelfile"]}
    assert wandb_metrics(3, {"loss": 1.0, "eval_loss": 2.0}) == {
        "train/global_step": 3, "train/loss": 1.0, "eval/loss": 2.0}
    assert redact({"a": {"hf_token": "x", "api_key": "y", "n": 1}, "l": [{"password": "p"}]}) == {
        "a": {"hf_token": "<redacted>", "api_key": "<redacted>", "n": 1}, "l": [{"password": "<redacted>"}]}


# -- tensorboard ------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'sft-forge[tensorboard]')")
def test_tensorboard_event_files_have_the_same_loss_series_as_metrics_jsonl(logged_run: LoggedRun) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run.run_dir / "tensorboard")).Reload()
    records = read_metrics(logged_run.run_dir)
    # TensorBoard stores scalars as float32.
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/learning_rate", "learning_rate")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in logged] == [s for s, _ in expected], tag
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert '"max_steps": %d' % MAX_STEPS in texts["config/text_summary"]
    assert '"status": "ok"' in texts["summary/text_summary"]


def test_summary_rows_flatten_nested_keys_and_show_durations() -> None:
    from sft.engine.metrics import flatten_summary

    rows = dict(flatten_summary({
        "steps": 60, "train_loss": 1.23456, "tokens_per_second": 5120.4, "exports": {"lora": {"paths": ["a", "b"]}},
        "durations": {"train": 75.3}, "error": None, "skipped": [],
    }))
    assert rows == {"steps": "60", "train_loss": "1.2346", "tokens_per_second": "5,120",
                    "exports.lora.paths": "a, b", "durations.train": "75.3 (1m15s)", "error": "None", "skipped": "-"}


def test_the_end_of_run_table_leaves_export_details_to_sft_report() -> None:
    from rich.console import Console

    from sft.engine.metrics import summary_table

    summary = {"steps": 60, "exports": {"gguf": {"ok": True, "paths": ["x.gguf"],
                                                 "details": {"verify": {"reference": [1, 2, 3]}}}},
               "dataset": {"rows": 5, "cache_key": "abc123"}}

    def shown(brief: bool) -> str:
        console = Console(width=100, record=True, file=open("/dev/null", "w"))
        console.print(summary_table(summary, brief=brief))
        return console.export_text()

    brief, full = shown(True), shown(False)
    assert "exports.gguf.ok" in brief and "dataset.rows" in brief
    assert "details" not in brief and "abc123" not in brief and "x.gguf" not in brief
    assert "exports.gguf.details.verify.reference" in full and "abc123" in full
