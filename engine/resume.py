"""Which run ``sft run --resume`` continues, whether it may, and the lock that keeps one run per directory.

A resume never damages the run it continues, so everything here is decided *before* the
run writes anything:

- :func:`find_resumable`: with neither ``--output`` nor ``training.run_name``, the one
  unfinished run under ``runs/`` whose config matches; none or several is an error that lists
  them (the most recent one is not a guess worth a finished run).
- :func:`check_resume`: a finished run (``summary.json`` status ``ok``) is never continued,
  and a config that differs from the run's ``config.yaml`` in a key that changes the
  optimisation or the data is refused, naming the keys. Keys that only change what is
  logged, saved or exported (:data:`RESUMABLE_CHANGES`) may differ and are named.
- :func:`run_lock`: an exclusive ``flock`` on ``<run>/.lock`` for as long as the run lives;
  a second ``sft run`` on the same directory is refused with the holder's pid. The lock is
  released by the kernel when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sft.core.errors import SftError
from sft.core.rundir import RunDir

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["RunLockedError", "ResumeError", "RESUMABLE_CHANGES", "run_lock", "changed_keys", "refused_changes",
           "check_resume", "find_resumable", "is_finished", "run_name_of"]

#: Keys (or sections, ending in ".") that may differ between a run and its resume: they change
#: what is logged, checkpointed, evaluated or exported, or how many processes share the work,
#: never a weight update or a training row.
RESUMABLE_CHANGES = (
    "loggers.", "export.",
    # The number of processes may change; sft.engine.distributed.check_resume refuses what would
    # change the optimisation (another global batch, a re-sharded FSDP2 run).
    "distributed.",
    "training.output_dir", "training.run_name", "training.logging_steps", "training.save_steps",
    "training.save_total_limit", "training.eval_steps", "training.eval_strategy", "training.eval_on_start",
    "training.per_device_eval_batch_size", "training.generation_prompt", "training.generation_max_new_tokens",
    "training.stop_grace_seconds", "data.cache_dir",
)

LOCK_FILE = ".lock"


class RunLockedError(SftError):
    """Another process is running in this run directory."""


class ResumeError(SftError):
    """``--resume`` cannot continue this run (finished, incompatible config, nothing to resume)."""


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``root`` (created if needed) for the block."""
    import fcntl

    root = Path(root)
    RunDir(root).refuse_links()  # before anything is written: the lock itself truncates its file
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise SftError(f"cannot create the run directory {root}: {exc.strerror or exc} "
                       f"(choose another with --output or training.output_dir)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"{root} is in use by another sft run (pid {holder}); wait for it to finish, or choose "
                f"another directory (--output or training.run_name)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# -- comparing configs ----------------------------------------------------------------------
def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain config containers."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def refused_changes(changed: list[str]) -> list[str]:
    """The keys of ``changed`` that a resume may not change (they are not in :data:`RESUMABLE_CHANGES`)."""
    def allowed(key: str) -> bool:
        return any(key.startswith(a) if a.endswith(".") else key == a for a in RESUMABLE_CHANGES)

    return [k for k in changed if not allowed(k)]


def _run_config(run: RunDir) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    if not run.config.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(run.config), resolve=False)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - an unreadable config.yaml matches nothing
        return None


def run_name_of(run: RunDir) -> str | None:
    """``training.run_name`` in the run's ``config.yaml`` (None when unset or unreadable)."""
    name = ((_run_config(run) or {}).get("training") or {}).get("run_name")
    return str(name) if name else None


def is_finished(run: RunDir) -> bool:
    """True when the run's ``summary.json`` says it finished training (status ``ok``)."""
    try:
        return run.read_summary().get("status") == "ok"
    except (OSError, ValueError):
        return False


def check_resume(run: RunDir, cfg: "DictConfig") -> list[str]:
    """Refuse to resume ``run`` with ``cfg`` when it finished or the change is unsafe; return the changed keys.

    Raises :class:`ResumeError` before anything is written.
    """
    from sft.core.config import shareable_container

    if is_finished(run):
        steps = run.read_summary().get("steps")
        raise ResumeError(
            f"--resume: {run.root} finished (status ok, {steps} steps); a finished run is never continued, so "
            f"its adapter and summary stay as they are. To train longer, start a new run in another directory "
            f"(--output or training.run_name) with the steps you want")
    old = _run_config(run)
    if old is None:
        return []
    changed = changed_keys(old, shareable_container(cfg))
    refused = refused_changes(changed)
    if refused:
        raise ResumeError(
            f"--resume: the config differs from {run.config} in {', '.join(refused)}; these change the "
            f"optimisation or the data, so the checkpoint cannot continue with them. Resume with the run's own "
            f"config (sft run {run.config} --resume), or start a new run in another directory")
    return changed


def find_resumable(root: Path, cfg: "DictConfig") -> RunDir:
    """The one unfinished run under ``root`` with a complete checkpoint whose config ``cfg`` may resume."""
    from . import checkpoints
    from sft.core.config import shareable_container

    new = shareable_container(cfg)
    matching, others = [], []
    for ckpts in sorted(p for p in Path(root).glob("*/checkpoints") if p.is_dir()):
        run = RunDir.of(ckpts.parent)
        if is_finished(run) or checkpoints.last_complete(run.checkpoints) is None:
            continue
        old = _run_config(run)
        if old is not None and not refused_changes(changed_keys(old, new)):
            matching.append(run)
        else:
            others.append(run)
    if len(matching) == 1:
        return matching[0]
    if matching:
        names = ", ".join(str(r.root) for r in matching)
        raise ResumeError(f"--resume: {len(matching)} unfinished runs match this config ({names}); "
                          f"name one with --output or training.run_name")
    hint = (f" (unfinished runs with another config: {', '.join(str(r.root) for r in others)})" if others else "")
    raise ResumeError(f"--resume: no unfinished run under {root}/ with a complete checkpoint matches this config{hint}; "
                      f"name the run with --output or training.run_name, or run without --resume")

