"""Atomic checkpoints: a checkpoint counts only once it is complete.

Writing a checkpoint (:func:`commit_checkpoint`):

1. the trainer writes everything into ``checkpoints/.staging-<step>/checkpoint-<step>/``;
2. every file is fsynced, then the folder is renamed to ``checkpoints/checkpoint-<step>``
   (a rename within one filesystem is atomic);
3. a ``COMPLETE`` file (JSON: step and the size of every file) is written atomically inside it.

A process killed at any point leaves either no ``checkpoint-<step>`` folder, or one without
``COMPLETE``; :func:`scan` ignores the latter and :func:`last_complete` names them in a
notice. Rotation (:func:`rotate`) deletes the oldest complete checkpoints beyond the limit,
never the newest complete one, and clears incomplete leftovers and stale staging folders.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .rundir import atomic_write_text, swap_in

__all__ = [
    "COMPLETE",
    "Checkpoint",
    "scan",
    "last_complete",
    "staging_dir",
    "commit_checkpoint",
    "rotate",
    "is_complete",
]

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING = ".staging-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    complete: bool


def is_complete(path: str | Path) -> bool:
    """True when ``path`` has a valid ``COMPLETE`` marker and every file it lists has the recorded size."""
    path = Path(path)
    marker = path / COMPLETE
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def scan(root: str | Path) -> list[Checkpoint]:
    """Every ``checkpoint-<step>`` folder under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir():
            found.append(Checkpoint(child, int(m.group(1)), is_complete(child)))
    return sorted(found, key=lambda c: c.step)


def last_complete(root: str | Path, notify=None) -> Checkpoint | None:
    """The complete checkpoint with the highest step, or None.

    Incomplete checkpoints (a run killed while saving) are skipped; ``notify(message)`` is
    called once naming them.
    """
    found = scan(root)
    incomplete = [c for c in found if not c.complete]
    complete = [c for c in found if c.complete]
    if incomplete and notify is not None:
        names = ", ".join(c.path.name for c in incomplete)
        notify(f"ignoring incomplete checkpoint(s) {names} in {Path(root)} (no valid {COMPLETE} marker; "
               f"the run was probably killed while saving)")
    return complete[-1] if complete else None


def staging_dir(root: str | Path, step: int) -> Path:
    """A fresh, empty staging folder for the checkpoint of ``step`` (the trainer writes inside it)."""
    path = Path(root) / f"{_STAGING}{step}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _fsync_tree(path: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        sizes[f.relative_to(path).as_posix()] = f.stat().st_size
    return sizes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_checkpoint(written: str | Path, root: str | Path, step: int) -> Path:
    """Move the checkpoint folder ``written`` into place as ``root/checkpoint-<step>`` and mark it complete.

    Returns the final path. An existing folder of that name (an incomplete leftover, or an
    older save of the same step) is replaced.
    """
    written, root = Path(written), Path(root)
    sizes = _fsync_tree(written)
    final = root / f"checkpoint-{step}"
    swap_in(written, final)  # no moment has a half-deleted folder at `final`
    _fsync_dir(root)
    atomic_write_text(final / COMPLETE, json.dumps({"step": step, "files": sizes}, indent=1) + "\n")
    _fsync_dir(final)
    staging_parent = written.parent
    if staging_parent.name.startswith(_STAGING):
        shutil.rmtree(staging_parent, ignore_errors=True)
    return final


def rotate(root: str | Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain; return what was deleted.

    The newest complete checkpoint is always kept (even with ``keep`` < 1). Incomplete
    checkpoints older than the newest complete one, and staging leftovers, are deleted too:
    they can never be resumed from.
    """
    root = Path(root)
    found = scan(root)
    complete = [c for c in found if c.complete]
    deleted: list[Path] = []
    if not complete:
        return deleted
    newest = complete[-1]
    limit = max(1, keep) if keep is not None else len(complete)
    doomed = [c.path for c in complete[:-limit]]
    doomed += [c.path for c in found if not c.complete and c.step < newest.step]
    for path in doomed:
        if path == newest.path:  # never, but cheap to be sure
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    for child in root.iterdir():
        if child.name.startswith(_STAGING) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    return deleted
