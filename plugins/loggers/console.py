"""The ``console`` logger: a progress bar on a terminal, plain lines everywhere else.

On a terminal (or in Jupyter) it shows a rich progress bar with the step, ETA, tokens/s, loss
and learning rate, prints one line per logging step above the bar, and ends with a summary
table. When the output is not a terminal (CI, ``| tee``, a log file) it prints the same lines
as plain text with no control codes, so logs stay greppable.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, TextIO

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.interfaces import Logger, RunInfo
from sft.engine.metrics import format_duration, format_metric, summary_table

__all__ = ["ConsoleLogger", "ConsoleOptions", "register_loggers"]

#: Metrics shown first on each line, in this order, with their short labels. Anything else
#: numeric follows in name order, so a new metric is shown without a code change.
_FIRST = (
    ("loss", "loss"),
    ("eval_loss", "eval_loss"),
    ("learning_rate", "lr"),
    ("grad_norm", "grad_norm"),
    ("epoch", "epoch"),
    ("tokens_per_second", "tok/s"),
)
#: Shown elsewhere (the step) or too noisy for one line (cumulative counters).
_HIDDEN = {"step", "tokens", "total_flos"}


@dataclass
class ConsoleOptions:
    style: str = opt("auto", "auto: a progress bar on a terminal or in Jupyter, plain lines otherwise. rich forces the bar, plain forces lines.", ["auto", "rich", "plain"])
    stream: str = opt("stdout", "Where the output goes.", ["stdout", "stderr"])
    summary: bool = opt(True, "Print a summary table when the run ends.")


class ConsoleLogger(Logger):
    """Progress bar, a line per logging step and a summary table."""

    name = "console"
    version = "1"
    description = "Progress bar with step, ETA, tokens/s, loss and lr; plain lines when not a terminal."
    options = ConsoleOptions

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._console: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._options = ConsoleOptions()
        self._total: int | None = None
        self._first_step = 0
        self._started = 0.0
        self._last: dict[str, float] = {}
        #: (cumulative tokens, monotonic time) at the previous logging step
        self._token_mark: tuple[float | None, float] = (None, 0.0)

    # -- Logger ----------------------------------------------------------------------------
    def start(self, run: RunInfo, options: ConsoleOptions | None = None) -> None:
        from rich.console import Console

        self._stop_progress()
        self._reset()
        self._options = options or ConsoleOptions()
        self._total = run.total_steps
        self._first_step = run.resumed_from_step
        self._started = time.monotonic()
        self._token_mark = (0.0 if not run.resumed_from_step else None, self._started)
        stream: TextIO = sys.stderr if self._options.stream == "stderr" else sys.stdout
        style = self._options.style
        if style == "auto":
            probe = Console(file=stream)
            style = "rich" if (probe.is_terminal or probe.is_jupyter) and not probe.is_dumb_terminal else "plain"
        if style == "rich":
            self._console = Console(file=stream, force_terminal=True if self._options.style == "rich" else None)
            self._start_progress(run)
        else:
            # No terminal: colour, highlighting and cursor movement all off, so the text is plain.
            self._console = Console(file=stream, force_terminal=False, color_system=None, highlight=False,
                                    emoji=False, soft_wrap=True)
        total = f"{run.total_steps} steps" if run.total_steps else "steps unknown"
        resumed = f", resuming after step {run.resumed_from_step}" if run.resumed_from_step else ""
        self._print(f"[sft] run {run.name}: {total}{resumed}; writing to {run.run_dir}")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        is_eval = any(k.startswith("eval_") for k in metrics)
        if not is_eval:
            metrics = self._with_token_rate(metrics)
            self._last.update({k: v for k, v in metrics.items() if _is_number(v)})
        self._print(self.format_line(step, metrics))
        if self._progress is not None and not is_eval:
            self._progress.update(self._task, completed=step, **self._fields())

    def finish(self, summary: Mapping[str, Any]) -> None:
        self._stop_progress()
        if self._console is None:
            return
        if self._options.summary and summary:
            self._console.print(summary_table(summary, title="run summary", brief=True, width=self._console.width))

    # -- formatting ------------------------------------------------------------------------
    def format_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """One logging step as text: ``step 3/10  loss 2.3456  lr 2.00e-04 ...  eta 12s``."""
        is_eval = any(k.startswith("eval_") for k in metrics)
        total = f"/{self._total}" if self._total else ""
        parts = [f"{'eval ' if is_eval else ''}step {step}{total}"]
        shown = set()
        for key, label in _FIRST:
            if key in metrics and _is_number(metrics[key]):
                parts.append(f"{label} {format_metric(key, metrics[key])}")
                shown.add(key)
        for key in sorted(metrics):
            if key in shown or key in _HIDDEN or not _is_number(metrics[key]):
                continue
            parts.append(f"{key} {format_metric(key, metrics[key])}")
        eta = self.eta(step)
        if eta is not None and not is_eval:
            parts.append(f"eta {format_duration(eta)}")
        return "  ".join(parts)

    def _with_token_rate(self, metrics: Mapping[str, Any]) -> Mapping[str, Any]:
        """Add ``tokens_per_second`` from the cumulative ``tokens`` count when the trainer did not send it."""
        tokens = metrics.get("tokens")
        if "tokens_per_second" in metrics or not _is_number(tokens) or isinstance(tokens, str):
            return metrics
        now = time.monotonic()
        last_tokens, last_time = self._token_mark
        self._token_mark = (float(tokens), now)
        if last_tokens is None or now <= last_time:
            return metrics
        return {**metrics, "tokens_per_second": (float(tokens) - last_tokens) / (now - last_time)}

    def eta(self, step: int) -> float | None:
        """Seconds left, from the mean time per step since :meth:`start` (None when unknown)."""
        done = step - self._first_step
        if not self._total or done <= 0:
            return None
        per_step = (time.monotonic() - self._started) / done
        return max(0.0, per_step * (self._total - step))

    # -- rich progress -----------------------------------------------------------------
    def _start_progress(self, run: RunInfo) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[tok_s]} tok/s  loss {task.fields[loss]}  lr {task.fields[lr]}"),
            console=self._console,
            transient=False,
        )
        self._task = self._progress.add_task(
            run.name, total=run.total_steps, completed=run.resumed_from_step, tok_s="-", loss="-", lr="-")
        self._progress.start()

    def _fields(self) -> dict[str, str]:
        last = self._last
        return {
            "tok_s": format_metric("tokens_per_second", last["tokens_per_second"]) if "tokens_per_second" in last else "-",
            "loss": format_metric("loss", last["loss"]) if "loss" in last else "-",
            "lr": format_metric("learning_rate", last["learning_rate"]) if "learning_rate" in last else "-",
        }

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _print(self, text: str) -> None:
        if self._console is None:
            return
        # markup=False: metric names and run names are data, never rich markup.
        self._console.print(text, markup=False, highlight=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, str) and value in ("nan", "inf", "-inf"))


@hookimpl
def register_loggers(register) -> None:
    register(ConsoleLogger())
