"""Metrics: the fan-out to loggers, ``metrics.jsonl``, the loss plot and ``sft report``.

Every logged step goes to ``metrics.jsonl`` and to each enabled logger plugin
(:class:`MetricsHub`). ``metrics.jsonl`` is always written, whatever loggers are chosen. A
logger that raises is reported once, with the error and how to fix it, and disabled;
training continues.

At the end of a run :func:`write_loss_plot` draws ``loss.png`` from ``metrics.jsonl``
(:func:`loss_series` returns the exact data it plots). ``sft report RUN_DIR`` is
:func:`report_run`. The formatting helpers here are shared by the console logger and the report.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from sft.core.errors import SftError
from sft.core.interfaces import Logger, RunInfo
from sft.core.notices import notice
from sft.core.rundir import append_text, atomic_write_bytes, atomic_write_text

__all__ = [
    "MetricsHub",
    "read_metrics",
    "LossSeries",
    "loss_series",
    "plot_loss",
    "write_loss_plot",
    "report_run",
    "namespaced",
    "export_paths",
    "format_metric",
    "format_duration",
    "flatten_summary",
    "summary_table",
    "eval_number",
    "eval_table",
    "print_eval",
]


class MetricsHub:
    """Sends run events to ``metrics.jsonl`` and to the enabled loggers.

    Args:
        run_dir: the run directory; ``metrics.jsonl`` goes there (appended, so a resumed
            run continues the file).
        loggers: ``(logger, options)`` pairs.
    """

    def __init__(self, run_dir: str | Path, loggers: Sequence[tuple[Logger, Any]] = ()):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.loggers = list(loggers)
        self.disabled: dict[str, str] = {}

    @classmethod
    def for_config(cls, run_dir: str | Path, cfg: Any, pm: Any) -> "MetricsHub":
        """A hub for the loggers ``cfg.loggers.enabled`` names, each with its options."""
        from sft.core.config import plugin_options

        return cls(run_dir, [(pm.get("logger", name, "loggers.enabled"), plugin_options(cfg, "logger", name, pm))
                             for name in cfg.loggers.enabled])

    def _call(self, logger: Logger, method: str, *args: Any) -> None:
        if logger.name in self.disabled:
            return
        try:
            getattr(logger, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a broken logger must not stop training
            self.disabled[logger.name] = f"{type(exc).__name__}: {exc}"
            # An SftError already says how to fix it; anything else gets the generic advice.
            fix = "" if isinstance(exc, SftError) else (
                f" Fix its options under loggers.{logger.name} or drop it from loggers.enabled.")
            notice(f"logger '{logger.name}' failed in {method}() and is now disabled; training continues. "
                   f"{type(exc).__name__}: {exc}{fix}")

    def start(self, run: RunInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run.resumed_from_step:
            self._truncate_after(run.resumed_from_step)
        for logger, options in self.loggers:
            self._call(logger, "start", run, options)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        append_text(self.path, json.dumps(record) + "\n")
        for logger, _options in self.loggers:
            self._call(logger, "log", int(step), dict(metrics))

    def finish(self, summary: Mapping[str, Any]) -> None:
        for logger, _options in self.loggers:
            self._call(logger, "finish", summary)

    def _truncate_after(self, step: int) -> None:
        """Drop records past ``step`` so a resumed run does not log those steps twice."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def _jsonable(value: Any) -> Any:
    # .item() first: a 0-d tensor holding nan must become the string "nan" too (JSON has no nan).
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# -- the loss plot ------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSeries:
    """The data :func:`plot_loss` draws: train loss and eval loss against the optimizer step.

    Non-finite losses (logged as the strings ``"nan"``/``"inf"``) are kept as float nan/inf so
    a diverged run shows its gap instead of silently losing the points.
    """

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.train_steps and not self.eval_steps


def loss_series(records_or_run_dir: str | Path | Sequence[Mapping[str, Any]]) -> LossSeries:
    """Train and eval loss per step from ``metrics.jsonl`` records (or a run directory / file).

    A record counts as train loss when it has ``loss`` and as eval loss when it has
    ``eval_loss``; the trainer's end-of-run aggregate (``train_loss``) is not a step value and
    is left out.
    """
    if isinstance(records_or_run_dir, (str, Path)):
        records = read_metrics(records_or_run_dir)
    else:
        records = list(records_or_run_dir)
    series = LossSeries()
    for record in records:
        if "loss" in record:
            series.train_steps.append(int(record["step"]))
            series.train_loss.append(float(record["loss"]))
        if "eval_loss" in record:
            series.eval_steps.append(int(record["step"]))
            series.eval_loss.append(float(record["eval_loss"]))
    return series


#: Line colours of the plot; tests look for them in the PNG's pixels.
TRAIN_COLOR = "#1f77b4"
EVAL_COLOR = "#d62728"


def plot_loss(series: LossSeries, title: str = "") -> Any:
    """A matplotlib ``Figure`` with the train loss line and the eval loss line (markers).

    Uses ``Figure`` + the Agg canvas directly, not ``pyplot``: no global backend switch, no
    display needed, and nothing leaks between runs in one process.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if series.train_steps:
        ax.plot(series.train_steps, series.train_loss, color=TRAIN_COLOR, linewidth=1.8, label="train loss")
    if series.eval_steps:
        ax.plot(series.eval_steps, series.eval_loss, color=EVAL_COLOR, linewidth=1.8, marker="o", label="eval loss")
    if series.empty:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def write_loss_plot(run_dir: str | Path) -> Path:
    """Draw ``loss.png`` in ``run_dir`` from its ``metrics.jsonl``; return the path.

    Called at the end of every run and by ``sft report``. The file is written through a
    temporary file and a rename, so a reader never sees half a PNG. A run directory with a link
    among its entries is refused first.
    """
    import io

    from sft.core.rundir import RunDir

    rd = RunDir.of(run_dir)
    rd.refuse_links()
    if not rd.metrics.exists():
        raise SftError(f"{rd.metrics}: no metrics file; is {rd.root} a run directory (sft run --output ...)?")
    fig = plot_loss(loss_series(rd.metrics), title=rd.root.name)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(rd.loss_plot, png.getvalue())
    return rd.loss_plot


def namespaced(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metric names for dashboards (W&B, TensorBoard): ``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``.

    The same names as transformers' own W&B and TensorBoard callbacks, so dashboards people
    already have keep working.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key.startswith("eval_"):
            out[f"eval/{key[len('eval_'):]}"] = value
        else:
            out[f"train/{key}"] = value
    return out


def export_paths(summary: Mapping[str, Any]) -> dict[str, list[str]]:
    """Exporter name -> the paths it wrote, from ``summary["exports"]`` (``{name: {"paths": [...]}}``)."""
    out: dict[str, list[str]] = {}
    for name, result in (summary.get("exports") or {}).items():
        if isinstance(result, Mapping):
            paths = result.get("paths") or []
        elif isinstance(result, (list, tuple)):
            paths = result
        else:
            paths = [result]
        out[str(name)] = [str(p) for p in paths]
    return out


# -- formatting shared by the console logger and `sft report` -----------------------------
def format_metric(key: str, value: Any) -> str:
    """A metric value for humans: lr in scientific notation, counters as integers, losses to 4 places."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if "learning_rate" in key or key == "lr":
        return f"{value:.2e}"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 100:
        return f"{int(value):,}"
    if "per_second" in key or key.endswith("_per_s"):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"
    if key == "epoch":
        return f"{value:.2f}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def flatten_summary(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``summary.json`` as ``(dotted key, text)`` rows; lists are joined, nested mappings flattened."""
    rows: list[tuple[str, str]] = []
    for key, value in summary.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += flatten_summary(value, dotted + ".") if value else [(dotted, "-")]
        elif isinstance(value, (list, tuple)):
            rows.append((dotted, ", ".join(str(v) for v in value) if value else "-"))
        elif _is_duration(dotted) and isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((dotted, f"{value:.1f} ({format_duration(value)})"))
        else:
            rows.append((dotted, format_metric(key, value)))
    return rows


def _is_duration(dotted_key: str) -> bool:
    """``train_seconds``, ``durations.train``: values in seconds (but not ``tokens_per_second``)."""
    return dotted_key.endswith("seconds") or dotted_key.startswith("durations.") or ".durations." in dotted_key


#: Rows left out of the end-of-run table (``sft report`` shows everything): the export lines
#: printed just before already say each export's paths and verification, and the rest is for tools.
BRIEF_SKIP = ("exports.*.details.*", "exports.*.paths", "dataset.cache_key", "dataset.skipped.examples")


def wrap_value(text: str, width: int) -> str:
    """``text`` wrapped to ``width`` at spaces, and inside a word too long for a line only after
    a ``/``, ``_`` or ``-`` (a path breaks between its parts, never inside a name)."""
    import re

    width = max(width, 16)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            pieces = re.findall(r"[^/_-]*[/_-]?", word)[:-1] if len(word) > width else [word]
            for i, piece in enumerate(pieces):
                sep = " " if (i == 0 and line) else ""
                if line and len(line) + len(sep) + len(piece) > width:
                    lines.append(line)
                    line, sep = "", ""
                line += sep + piece
        lines.append(line)
    return "\n".join(lines)


def summary_table(summary: Mapping[str, Any], title: str = "summary", brief: bool = False,
                  width: int | None = None) -> Any:
    """A rich ``Table`` of :func:`flatten_summary` rows (plain text when printed to a non-terminal).

    ``brief`` leaves out the :data:`BRIEF_SKIP` rows. With ``width`` (the console's), values are
    wrapped by :func:`wrap_value` to fit it, so no word or path component is cut in two.
    """
    from fnmatch import fnmatchcase

    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = [(key, text) for key, text in flatten_summary(summary)
            if not (brief and any(fnmatchcase(key, pattern) for pattern in BRIEF_SKIP))]
    table = Table(title=title, box=box.SIMPLE, show_header=True, header_style="bold")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    # The SIMPLE box: a one-space edge on each side, one space of padding each side of each column, one between.
    value_width = width - max((len(k) for k, _ in rows), default=3) - 7 if width else None
    for key, text in rows:
        # Text, not str: values such as a generated "[INST] ..." are data, never rich markup.
        table.add_row(Text(key), Text(wrap_value(text, value_width) if value_width else text))
    return table


def report_run(run_dir: str | Path, file: TextIO | None = None) -> Path:
    """``sft report RUN_DIR``: regenerate ``loss.png`` and print the summary, the loss curve's ends and
    the ``sft eval`` table (``eval.json``) when there is one.

    Returns the plot's path. Works on an unfinished run (no ``summary.json`` yet) too.
    """
    from rich.console import Console

    from sft.core.rundir import RunDir

    rd = RunDir.of(run_dir)
    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    plot = write_loss_plot(rd.root)
    series = loss_series(rd.metrics)
    summary = rd.read_summary()
    if summary:
        console.print(summary_table(summary, title=f"{rd.root.name}: summary.json", width=console.width))
    else:
        console.print(f"{rd.summary_path}: not written yet (the run is unfinished or crashed)", markup=False)
    for label, steps, losses in (("train loss", series.train_steps, series.train_loss),
                                 ("eval loss", series.eval_steps, series.eval_loss)):
        if steps:
            console.print(f"{label}: {format_metric('loss', losses[0])} at step {steps[0]} -> "
                          f"{format_metric('loss', losses[-1])} at step {steps[-1]} "
                          f"({len(steps)} points)", markup=False)
    console.print(f"loss plot: {plot}", markup=False)
    evaluation = rd.root / "eval.json"
    if evaluation.is_file():
        print_eval(json.loads(evaluation.read_text()), file=console.file)
    return plot


# -- the sft eval table (eval.json), shared by sft eval and sft report ---------------------
def eval_number(value: Any) -> str:
    """A metric of ``eval.json``: four decimals, ``-`` for none."""
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_table(record: Mapping[str, Any]) -> Any:
    """A rich ``Table``: a row per task and metric, a column per model, and each GGUF's difference from the 16-bit model."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    models = record["models"]
    exports = [label for label, m in models.items() if m.get("kind") == "export"]
    verdict = "ok" if record.get("ok") else "FAILED"
    table = Table(title=f"eval ({verdict}; max drop {record.get('max_drop')})", box=box.SIMPLE, header_style="bold")
    table.add_column("task")
    table.add_column("metric")
    for label in models:
        table.add_column(label, justify="right")
    for label in exports:
        table.add_column(f"Δ {label}", justify="right")
    diffs = {(r["model"], r["task"], r["metric"]): r for r in record.get("parity") or []}
    rows = []
    for label in models:
        for task, values in (models[label].get("results") or {}).items():
            for metric in values:
                if metric != "samples" and "_stderr" not in metric and (task, metric) not in rows:
                    rows.append((task, metric))
    for task, metric in rows:
        cells = [Text(task), Text(metric)]
        for label in models:
            model = models[label]
            value = ((model.get("results") or {}).get(task) or {}).get(metric)
            cells.append(Text("error" if "error" in model else eval_number(value)))
        for label in exports:
            row = diffs.get((label, task, metric))
            text = "-" if row is None or row["diff"] is None else f"{row['diff']:+.4f}"
            cells.append(Text(text + ("" if row is None or row["ok"] else " FAIL"),
                              style=None if row is None or row["ok"] else "bold red"))
        table.add_row(*cells)
    return table


def print_eval(record: Mapping[str, Any], file: TextIO | None = None) -> None:
    """The table, each model's source, and every failure."""
    import sys

    from rich.console import Console

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    console.print(eval_table(record))
    for label, model in record["models"].items():
        samples = {t: v.get("samples") for t, v in (model.get("results") or {}).items()}
        console.print(f"  {label}: {model['source']} ({model.get('seconds', 0):.1f}s"
                      + (f"; examples {samples}" if samples else "") + ")", markup=False)
    for failure in record.get("failures") or []:
        console.print(f"FAILED: {failure}", markup=False, style="bold red")
