"""The ``csv`` logger: every logged step as a row of ``metrics.csv`` in the run directory.

Spreadsheets and pandas read it directly. Columns are ``step`` and then every metric name in
the order first seen; when a new metric appears (``eval_loss`` at the first evaluation, say)
the file is rewritten with the wider header, so every row always has every column. A resumed
run keeps the rows up to the step it resumes from and continues the file.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sft.core import Logger, RunInfo, hookimpl
from sft.core.config import opt

__all__ = ["CsvLogger", "CsvOptions", "register_loggers"]


@dataclass
class CsvOptions:
    filename: str = opt("metrics.csv", "File name inside the run directory.")


class CsvLogger(Logger):
    """Writes ``metrics.csv``: one row per logging step and per evaluation."""

    name = "csv"
    version = "1"
    description = "Writes every logged step to metrics.csv in the run directory."
    options = CsvOptions

    def __init__(self) -> None:
        self.path: Path | None = None
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []

    def start(self, run: RunInfo, options: CsvOptions | None = None) -> None:
        options = options or CsvOptions()
        self.path = Path(run.run_dir) / options.filename
        self.columns, self.rows = ["step"], []
        if run.resumed_from_step and self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if int(r["step"]) <= run.resumed_from_step]
        self._rewrite()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.path is None:
            raise RuntimeError("csv logger: log() before start()")
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Nothing to do: every row is on disk as soon as it is logged."""

    def _rewrite(self) -> None:
        # Through a temporary file and a rename: a reader never sees half a header.
        assert self.path is not None
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(buffer.getvalue())
        os.replace(tmp, self.path)


@hookimpl
def register_loggers(register) -> None:
    register(CsvLogger())
