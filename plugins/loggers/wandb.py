"""The ``wandb`` logger: Weights & Biases runs with the config, every logging step and the summary.

Metric names follow the Hugging Face ``WandbCallback`` convention that people's W&B dashboards
already use: ``train/loss``, ``train/learning_rate``, ``eval/loss`` ..., all plotted against
``train/global_step``. The run's files go to ``<run_dir>/wandb/`` so an offline run can be
uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.

The API key is never an option: W&B reads it from ``wandb login`` (``~/.netrc``) or the
``WANDB_API_KEY`` environment variable, so it cannot end up in ``config.yaml``, the logs or the
run directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import SftError
from sft.core.interfaces import Logger, RunInfo
from sft.engine.metrics import export_paths, namespaced
from sft.core.notices import notice

__all__ = ["WandbLogger", "WandbOptions", "wandb_metrics", "redact", "register_loggers"]

_MODES = ["online", "offline", "disabled"]
_WATCH = ["false", "gradients", "parameters", "all"]
#: Config keys whose values are never sent anywhere (belt and braces: sft's config has no such key).
_SECRET = re.compile(r"api[_-]?key|token|secret|password", re.IGNORECASE)


@dataclass
class WandbOptions:
    project: Optional[str] = opt(None, "W&B project (default: WANDB_PROJECT, else 'sft').")
    entity: Optional[str] = opt(None, "W&B entity, a user or team (default: WANDB_ENTITY, else your default entity).")
    name: Optional[str] = opt(None, "W&B run name (default: the sft run name).")
    tags: List[str] = opt([], "Tags on the W&B run.")
    notes: Optional[str] = opt(None, "Notes on the W&B run.")
    watch: Optional[str] = opt(None, "wandb.watch the model: false, gradients, parameters or all (default: WANDB_WATCH, else false).", _WATCH)
    watch_log_freq: Optional[int] = opt(None, "With watch: log histograms every this many backward passes (default: max(100, training.logging_steps), as transformers does; histograms are slow).", ge=1)
    mode: Optional[str] = opt(None, "online, offline (sync later with `wandb sync`) or disabled (default: WANDB_MODE, else online).", _MODES)


class WandbLogger(Logger):
    """Logs the config, train/eval metrics, the final summary and the export paths to W&B."""

    name = "wandb"
    version = "1"
    description = "Weights & Biases: config, train/eval metrics, summary and export paths (online, offline or disabled)."
    options = WandbOptions

    def __init__(self) -> None:
        self._run: Any = None
        self._watched = False

    def unsupported_reason(self, env: Any, options: Any = None) -> str | None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            return "wandb is not installed: pip install 'sft-forge[wandb]' (or pip install wandb)"
        return None

    # -- Logger ----------------------------------------------------------------------------
    def start(self, run: RunInfo, options: WandbOptions | None = None) -> None:
        options = options or WandbOptions()
        self._finish_previous()
        mode = _resolve(options.mode, "WANDB_MODE", "online", _MODES, "mode")
        watch = _resolve(options.watch, "WANDB_WATCH", "false", _WATCH, "watch")
        try:
            import wandb
        except ImportError:
            raise SftError("the wandb logger needs the wandb package: pip install 'sft-forge[wandb]'") from None
        wandb_dir = os.path.join(run.run_dir, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        try:
            self._run = wandb.init(
                project=options.project or os.environ.get("WANDB_PROJECT") or "sft",
                entity=options.entity,
                name=options.name or run.name,
                tags=list(options.tags) or None,
                notes=options.notes,
                config=redact(run.config),
                mode=mode,
                dir=run.run_dir,
                # A logger must never block training on a login prompt; see the error below.
                settings=wandb.Settings(login_timeout=0) if mode == "online" else None,
                # finish_previous also makes this run wandb.run, the global that wandb.watch's
                # hooks log through (with create_new they would crash inside backward()).
                reinit="finish_previous",
            )
        except Exception as exc:  # noqa: BLE001 - turn wandb's many failure types into one actionable message
            raise SftError(
                f"wandb.init failed ({type(exc).__name__}: {exc}). For online mode run `wandb login` or export "
                f"WANDB_API_KEY (never put the key in the config); set loggers.wandb.project/entity to ones you "
                f"can write to; or use loggers.wandb.mode=offline and `wandb sync {wandb_dir}/offline-run-*` later."
            ) from exc
        # Everything is plotted against the optimizer step, like transformers' WandbCallback does,
        # so eval points and a resumed run's points land on the right x.
        self._run.define_metric("train/global_step")
        self._run.define_metric("*", step_metric="train/global_step", step_sync=True)
        if watch != "false":
            if run.model is None:
                notice(f"loggers.wandb.watch={watch} ignored: the trainer did not pass the model to the loggers")
            else:
                logging_steps = int((run.config.get("training") or {}).get("logging_steps") or 1)
                freq = options.watch_log_freq or max(100, logging_steps)
                self._run.watch(run.model, log=watch, log_freq=int(freq))
                self._watched = True

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._run is None:
            return
        self._run.log(wandb_metrics(step, metrics))

    def finish(self, summary: Mapping[str, Any]) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        self._unwatch(run)
        exports = export_paths(summary)
        values = {k: v for k, v in summary.items() if k != "exports"}
        run.summary.update({"sft": values, "exports": exports})
        failed = summary.get("status") not in (None, "ok", "completed", "success", "finished")
        run.finish(exit_code=1 if failed else 0)

    def _finish_previous(self) -> None:
        """A run that crashed before ``finish`` left its W&B run open; close it as failed."""
        if self._run is not None:
            run, self._run = self._run, None
            self._unwatch(run)
            run.finish(exit_code=1)

    def _unwatch(self, run: Any) -> None:
        """Remove wandb.watch's hooks: the model outlives the W&B run (quick generation, exports)."""
        if self._watched:
            self._watched = False
            run.unwatch()


def wandb_metrics(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """sft metric names to W&B names (``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``) plus the step."""
    return {"train/global_step": int(step), **namespaced(metrics)}


def redact(config: Any) -> Any:
    """``config`` with the value of any key that looks like a credential replaced by ``"<redacted>"``."""
    if isinstance(config, Mapping):
        return {k: "<redacted>" if _SECRET.search(str(k)) and v else redact(v) for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def _resolve(value: str | None, env_var: str, default: str, choices: list[str], key: str) -> str:
    """The option if set, else the environment variable (checked: it bypasses config validation), else the default."""
    if value is not None:
        return value
    env = os.environ.get(env_var, "").strip().lower()
    if not env:
        return default
    if env not in choices:
        raise SftError(f"{env_var}={env!r} is not one of {', '.join(choices)}; set loggers.wandb.{key} or fix the variable")
    return env


@hookimpl
def register_loggers(register) -> None:
    register(WandbLogger())
