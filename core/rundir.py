"""The run directory: where a run's files live, and atomic updates of ``summary.json``.

Layout (see DEVELOPERS.md)::

    config.yaml  metrics.jsonl  loss.png  checkpoints/  adapter/  exports/<exporter>/  summary.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import SftError

__all__ = ["RunDir", "RUN_ENTRIES", "append_text", "atomic_write_bytes", "atomic_write_text", "remove_inside", "staged_dir", "swap_in"]

#: What ``sft`` and its bundled plugins write, replace or delete in a run directory. None of them may be
#: a symbolic link (:meth:`RunDir.refuse_links`): a run folder may come from someone else, and a write or
#: a delete through a link would land outside the run. The folders' own entries are checked too.
RUN_ENTRIES = (".lock", ".launch-config.yaml", "config.yaml", "metrics.jsonl", "loss.png", "summary.json",
               "eval.json", "checkpoints", "adapter", "initial_adapter", "exports", "previous", "tensorboard", "wandb")
_RUN_FOLDERS = ("checkpoints", "exports", "previous")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` like :func:`atomic_write_text`. The temporary file has a new name
    and the rename replaces ``path`` itself: nothing is written through a link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; results are shared like any file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to the file ``path`` (created if missing), never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        raise _link_error(Path(path)) if Path(path).is_symlink() else exc
    with os.fdopen(fd, "a") as f:
        f.write(text)


def _link_error(path: Path) -> SftError:
    return SftError(f"{path} is a symbolic link (to {os.readlink(path)}); sft never writes or deletes through a "
                    f"link in a run directory (it may lead outside the run): replace it with a real file or folder, "
                    f"or use another run directory")


def remove_inside(root: str | Path, path: str | Path) -> None:
    """Delete the file or folder ``path`` (a link: only the link) when it really lies inside the run
    directory ``root``. Its location is resolved first, so a folder reached through a symbolic link
    (``exports/`` pointing elsewhere) is refused with an :class:`SftError` instead of deleted."""
    path = Path(path)
    where = Path(os.path.realpath(path.parent)) / path.name
    if not where.is_relative_to(os.path.realpath(root)):
        raise SftError(f"{path}: not deleted, its real path {where} is outside the run directory {root} "
                       f"(a symbolic link on the way leads there)")
    if where.is_symlink() or where.is_file():
        where.unlink(missing_ok=True)
    elif where.exists():
        shutil.rmtree(where, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_in(ready: str | Path, final: str | Path) -> None:
    """Move the finished folder ``ready`` to ``final`` (same filesystem).

    Whatever was at ``final`` is moved aside first and deleted only once ``ready`` is in
    place, so at every moment ``final`` is either the old folder or the new one, whole.
    """
    ready, final = Path(ready), Path(final)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    try:
        ready.rename(final)
    except BaseException:
        if old.exists():
            if final.exists():  # another writer swapped its own folder in meanwhile: keep that one
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Write a folder whole, then swap it in: the one way `sft` replaces a folder of results.

    Yields an empty staging folder beside ``final`` (a hidden, uniquely named sibling naming the
    writer's process, so two writers never share one). When the block ends without an error the staging folder
    replaces ``final`` (:func:`swap_in`); on an error it is deleted and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @classmethod
    def of(cls, path: str | Path) -> "RunDir":
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    def refuse_links(self) -> None:
        """Raise :class:`SftError` naming the first of :data:`RUN_ENTRIES` (or an entry of its folders)
        that is a symbolic link, before a command writes anything in the run."""
        for name in RUN_ENTRIES:
            path = self.root / name
            inside = sorted(path.iterdir()) if name in _RUN_FOLDERS and path.is_dir() and not path.is_symlink() else []
            for entry in (path, *inside):
                if entry.is_symlink():
                    raise _link_error(entry)

    def has_trained_model(self) -> bool:
        """Whether ``adapter/`` holds what training wrote: a LoRA adapter, or a full fine-tune's model."""
        return (self.adapter / "adapter_config.json").is_file() or (self.adapter / "config.json").is_file()

    def export_dir(self, exporter: str) -> Path:
        return self.root / "exports" / exporter

    def export_files(self, paths: Iterable[str]) -> list[tuple[Path, str]]:
        """``(local file, path below the export)`` for the paths an export recorded: a folder's files
        keep their place below it, a file goes to the top. Hidden files (``.sft-merged.json``,
        partial writes) are left out. A recorded path under ``exports/`` is read from this run
        directory, so a run that was moved or copied publishes its own files. What every
        publisher sends; raises :class:`~sft.core.errors.SftError` for a path no longer on disk.

        Only regular files whose real path is inside this run's ``exports/`` are returned: a
        ``summary.json`` from someone else may list any path (``/home/you/.ssh``) and an export
        folder may hold links to anywhere, so a path outside and a symbolic link are refused,
        naming the path, before anything is sent."""
        out: list[tuple[Path, str]] = []
        exports = self.root / "exports"
        for p in map(self._moved_here, paths):
            self.own_path(p, exports)
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    rel = f.relative_to(p)
                    if any(part.startswith(".") for part in rel.parts):
                        continue
                    self.own_path(f, exports)
                    if f.is_file():
                        out.append((f, rel.as_posix()))
            elif p.is_file():
                out.append((p, p.name))
            else:
                raise SftError(f"{p}: listed in summary.json but not on disk; write it again with sft export")
        return out

    def own_path(self, path: str | Path, within: str | Path | None = None) -> Path:
        """``path``, checked to be this run's own: neither it nor ``within`` (default: the run
        folder) is a symbolic link, and its real path is inside ``within``. Raises
        :class:`~sft.core.errors.SftError` naming the path otherwise: what is sent out of a run
        (a publisher's files) must never reach past the folder it was sent from."""
        path, within = Path(path), Path(within) if within is not None else self.root
        link = next((p for p in (within, path) if p.is_symlink()), None)
        if link is not None:
            raise SftError(f"{link}: a symbolic link (to {os.readlink(link)}); sft sends only the regular files "
                           f"inside {within} and follows no link: replace it with the file itself")
        if path.exists() and not path.resolve().is_relative_to(within.resolve()):
            raise SftError(f"{path}: listed in summary.json but outside {within}; sft sends only the run's own "
                           f"files (write them again with sft export)")
        return path

    def _moved_here(self, path: str | Path) -> Path:
        p = Path(path)
        if "exports" in p.parts:
            i = len(p.parts) - 1 - p.parts[::-1].index("exports")
            moved = self.root.joinpath(*p.parts[i:])
            if moved.exists():
                return moved
        return p

    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.exists():
            return {}
        return json.loads(self.summary_path.read_text())

    def update_summary(self, **values: Any) -> dict[str, Any]:
        """Merge ``values`` into ``summary.json`` (top-level keys; ``exports`` is merged per exporter)."""
        summary = self.read_summary()
        for key, value in values.items():
            if key == "exports" and isinstance(value, dict):
                summary.setdefault("exports", {}).update(value)
            else:
                summary[key] = value
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def dir_size(path: str | Path) -> int:
    """Total bytes of the files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (weights do not fit in memory twice)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
