"""The ``tensorboard`` logger: TensorBoard event files in the run directory.

Scalars use the same names as transformers' TensorBoard callback and the ``wandb`` logger
(``train/loss``, ``train/learning_rate``, ``eval/loss`` ...) at the optimizer step. The
config is written as text when the run starts, and the summary and export paths when it
ends. Watch the run with ``tensorboard --logdir runs/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import SftError
from sft.core.interfaces import Logger, RunInfo
from sft.engine.metrics import export_paths, namespaced

__all__ = ["TensorBoardLogger", "TensorBoardOptions", "register_loggers"]

_INSTALL = "pip install 'sft-forge[tensorboard]' (or pip install tensorboard)"


@dataclass
class TensorBoardOptions:
    log_dir: Optional[str] = opt(None, "Where the event files go (default: <run_dir>/tensorboard).")
    flush_secs: int = opt(10, "Seconds between flushes to disk.", ge=1)


class TensorBoardLogger(Logger):
    """Train/eval scalars per logging step, the config and the final summary as text."""

    name = "tensorboard"
    version = "1"
    description = "TensorBoard event files: train/eval scalars, config and summary (<run_dir>/tensorboard)."
    options = TensorBoardOptions

    def __init__(self) -> None:
        self._writer: Any = None

    def unsupported_reason(self, env: Any, options: Any = None) -> str | None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            return f"tensorboard is not installed: {_INSTALL}"
        return None

    def start(self, run: RunInfo, options: TensorBoardOptions | None = None) -> None:
        options = options or TensorBoardOptions()
        self._close()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SftError(f"the tensorboard logger needs the tensorboard package: {_INSTALL}") from None
        log_dir = Path(options.log_dir) if options.log_dir else Path(run.run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(log_dir), flush_secs=options.flush_secs)
        self._writer.add_text("config", _as_markdown(run.config), global_step=run.resumed_from_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in namespaced(metrics).items():
            # Scalars only: a string such as "nan" from a resumed file is not a plottable value.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, float(value), global_step=int(step))

    def finish(self, summary: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        step = summary.get("steps") if isinstance(summary.get("steps"), int) else None
        values = {k: v for k, v in summary.items() if k != "exports"}
        self._writer.add_text("summary", _as_markdown(values), global_step=step)
        exports = export_paths(summary)
        if exports:
            self._writer.add_text("exports", _as_markdown(exports), global_step=step)
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()


def _as_markdown(value: Any) -> str:
    """JSON in a Markdown code block: TensorBoard's text tab renders Markdown."""
    text = json.dumps(value, indent=2, default=str, allow_nan=True)
    return "```\n" + text.replace("```", "'''") + "\n```"


@hookimpl
def register_loggers(register) -> None:
    register(TensorBoardLogger())
