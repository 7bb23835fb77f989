"""Metrics fan-out: every logged step goes to ``metrics.jsonl`` and to each enabled logger plugin.

``metrics.jsonl`` is always written, whatever loggers are chosen. A logger that raises is
reported once, with the error, and disabled; training continues.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .interfaces import Logger, RunInfo

__all__ = ["MetricsHub", "read_metrics"]


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

    def _call(self, logger: Logger, method: str, *args: Any) -> None:
        if logger.name in self.disabled:
            return
        try:
            getattr(logger, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a broken logger must not stop training
            self.disabled[logger.name] = f"{type(exc).__name__}: {exc}"
            print(
                f"[sft] logger '{logger.name}' failed in {method}() and is now disabled: {exc}. "
                f"Fix its options under loggers.{logger.name} or drop it from loggers.enabled.",
                file=sys.stderr,
            )

    def start(self, run: RunInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run.resumed_from_step:
            self._truncate_after(run.resumed_from_step)
        for logger, options in self.loggers:
            self._call(logger, "start", run, options)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
