"""Atomic checkpoints: a checkpoint counts only once it is complete.

Writing a checkpoint (:func:`commit_checkpoint`):

1. the trainer writes everything into ``checkpoints/.staging-<step>/checkpoint-<step>/``;
2. every file is fsynced, then the folder is renamed to ``checkpoints/checkpoint-<step>``
   (a rename within one filesystem is atomic);
3. a ``COMPLETE`` file (JSON: step, and the size and sha256 of every file) is written
   atomically inside it.

A process killed at any point leaves either no ``checkpoint-<step>`` folder, or one without
``COMPLETE``; :func:`scan` ignores the latter and :func:`last_complete` names them in a
notice. Sizes are checked on every scan; before a resume, ``last_complete(verify=True)``
also checks every file's sha256 and that the saved weights are finite, so a checkpoint
damaged on disk after it was written (same size, other bytes) is named and passed over. Rotation (:func:`rotate`) deletes the oldest complete checkpoints beyond the limit,
never the newest complete one, and clears incomplete leftovers and stale staging folders.
Only the finite-weights check imports torch (inside it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sft.core.errors import SftError
from sft.core.rundir import atomic_write_text, remove_inside, swap_in

__all__ = [
    "COMPLETE",
    "Checkpoint",
    "scan",
    "last_complete",
    "staging_dir",
    "commit_checkpoint",
    "writing",
    "rotate",
    "is_complete",
    "damage",
]

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING = ".staging-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    complete: bool


def _manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def is_complete(path: str | Path) -> bool:
    """True when ``path`` has a valid ``COMPLETE`` marker and every file it lists has the recorded size."""
    return _marker_problem(Path(path)) is None and _size_problem(Path(path)) is None


def _marker_problem(path: Path) -> str | None:
    return None if _manifest(path) is not None else f"no valid {COMPLETE} marker"


def _size_problem(path: Path) -> str | None:
    """The first file the valid ``COMPLETE`` marker of ``path`` lists that is missing or of another size."""
    for name, size in (_manifest(path) or {"files": {}})["files"].items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing (listed in {COMPLETE})"
        if f.stat().st_size != size:
            return f"{f} is truncated or corrupt ({f.stat().st_size} bytes, {COMPLETE} records {size})"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def damage(path: str | Path) -> str | None:
    """Why the complete checkpoint at ``path`` cannot be trusted, or None: a file whose sha256 differs
    from its ``COMPLETE`` record, or saved weights that are not finite."""
    path = Path(path)
    why = _marker_problem(path) or _size_problem(path)
    if why is not None:
        return why
    hashes = _manifest(path).get("sha256")
    for name, digest in sorted((hashes if isinstance(hashes, dict) else {}).items()):  # older markers: sizes only
        if _sha256(path / name) != digest:
            return f"{name} does not match the sha256 in {COMPLETE} (the file changed on disk after it was saved)"
    return _non_finite_weights(path)


def _non_finite_weights(path: Path) -> str | None:
    import torch
    from safetensors import safe_open

    from .model_files import check_safetensors

    for weights in sorted(path.glob("*.safetensors")):
        try:
            check_safetensors(weights)
        except SftError as exc:
            return str(exc)
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    return f"{weights.name} holds NaN/inf in {key}"
    return None


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


def last_complete(root: str | Path, notify=None, verify: bool = False) -> Checkpoint | None:
    """The complete checkpoint with the highest step, or None.

    Incomplete checkpoints (a run killed while saving) are skipped; ``notify(message)`` is
    called once naming them. With ``verify``, a complete checkpoint that :func:`damage` finds
    damaged is skipped too (and named), and the next older one is tried.
    """
    found = scan(root)
    # Without a marker: killed while saving. With one whose files differ in size: damaged on disk since.
    incomplete = [c for c in found if not c.complete and _marker_problem(c.path)]
    complete = [c for c in found if c.complete]
    if incomplete and notify is not None:
        names = ", ".join(c.path.name for c in incomplete)
        notify(f"ignoring incomplete checkpoint(s) {names} in {Path(root)} (no valid {COMPLETE} marker; "
               f"the run was probably killed while saving)")
    for checkpoint in (c for c in found if not c.complete and c not in incomplete):
        if notify is not None:
            notify(f"ignoring damaged checkpoint {checkpoint.path.name}: {_size_problem(checkpoint.path)}")
    for checkpoint in reversed(complete):
        why = damage(checkpoint.path) if verify else None
        if why is None:
            return checkpoint
        if notify is not None:
            notify(f"ignoring damaged checkpoint {checkpoint.path.name}: {why}")
    return None


def staging_dir(root: str | Path, step: int) -> Path:
    """A fresh, empty staging folder for the checkpoint of ``step`` (the trainer writes inside it)."""
    path = Path(root) / f"{_STAGING}{step}"
    _remove(root, path)
    path.mkdir(parents=True)
    return path


def _remove(root: str | Path, path: Path) -> None:
    # ``root`` is the run's checkpoints/ folder: what is deleted must lie inside the run around it.
    remove_inside(Path(root).parent, path)


def _fsync_tree(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Fsync every file under ``path``; return each file's size and sha256."""
    sizes: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        name = f.relative_to(path).as_posix()
        sizes[name] = f.stat().st_size
        hashes[name] = _sha256(f)
    return sizes, hashes


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


@contextlib.contextmanager
def writing(root: str | Path, step: int, clean: bool = True) -> Iterator[None]:
    """Turn a failure while ``checkpoint-<step>`` is written (a full disk, a folder that cannot be
    written) into one line naming that checkpoint, the file and the checkpoint ``--resume`` continues
    from. With ``clean`` (rank 0) the half-written staging folder is deleted first: on a full disk
    that frees the space the run's ``summary.json`` needs."""
    try:
        yield
    except SftError:
        raise
    except Exception as exc:
        if clean:
            _remove(root, Path(root) / f"{_STAGING}{step}")
        why = (f"{Path(exc.filename).name}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename and exc.strerror
               else (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        last = last_complete(root)
        resume = (f"the last complete checkpoint is {last.path}; continue from it with --resume once this is fixed"
                  if last else "no checkpoint was completed before it, so the run can only start over")
        raise SftError(f"could not write the checkpoint {Path(root) / f'checkpoint-{step}'} ({why}); {resume}") from exc


def commit_checkpoint(written: str | Path, root: str | Path, step: int) -> Path:
    """Move the checkpoint folder ``written`` into place as ``root/checkpoint-<step>`` and mark it complete.

    Returns the final path. An existing folder of that name (an incomplete leftover, or an
    older save of the same step) is replaced.
    """
    written, root = Path(written), Path(root)
    sizes, hashes = _fsync_tree(written)
    final = root / f"checkpoint-{step}"
    swap_in(written, final)  # no moment has a half-deleted folder at `final`
    _fsync_dir(root)
    atomic_write_text(final / COMPLETE, json.dumps({"step": step, "files": sizes, "sha256": hashes}, indent=1) + "\n")
    _fsync_dir(final)
    staging_parent = written.parent
    if staging_parent.name.startswith(_STAGING):
        _remove(root, staging_parent)
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
        _remove(root, path)
        deleted.append(path)
    for child in root.iterdir():
        if child.name.startswith(_STAGING) and child.is_dir():
            _remove(root, child)
    return deleted
