"""Where rows come from: ``data.dataset`` resolved to packaged assets, local files or folders, or the Hub.

- ``sft:<name>``: a file packaged in ``engine/assets``;
- a local file or a folder of them (splits from file or folder names: ``train.jsonl``, ``test-0.parquet``),
  including folders written by ``datasets``' ``save_to_disk``;
- a glob of local files (``shards/*.jsonl.gz``): every match, in sorted order, as one file would be;
- a Hugging Face Hub dataset through ``datasets.load_dataset`` (offline: the local cache only).

``data.split`` may slice (``train[:100]``, ``train[10%:]``). Each split gets a content
fingerprint, so the cache (:mod:`.cache`) knows when the data changed.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..libraries import hub_reachable
from sft.core.errors import ConfigError, ConfigProblem, DataError, did_you_mean
from .progress import Progress
from .readers import SUPPORTED_EXTENSIONS, RowChain, RowRef, RowRefs, TableRows, extension_of, hash_files, read_file

__all__ = ["Source", "resolve_source", "names_local_files", "parse_split", "fingerprint_split", "read_split",
           "read_rows", "columns_of"]

ASSETS_DIR = Path(__file__).parent.parent / "assets"
#: Split names recognised in file names inside a dataset folder (``train.jsonl``, ``test-0.parquet``).
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


@dataclass
class Source:
    """A resolved ``data.dataset``: ``kind`` is ``local`` (files, incl. ``sft:`` assets) or ``hub``."""

    spec: str
    kind: str
    path: Path | None = None
    #: The files a glob matched, in sorted order (``path`` is then None).
    files: list[Path] | None = None
    name: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return self.spec


def resolve_source(spec: str) -> Source:
    """Decide what ``data.dataset`` names. Raises :class:`DataError` for a missing local path."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError([ConfigProblem("data.dataset", "is empty")])
    if spec.startswith("sft:"):
        name = spec[4:]
        path = ASSETS_DIR / f"{name}.json"
        if not path.is_file():
            available = sorted(p.stem for p in ASSETS_DIR.glob("*.json"))
            raise ConfigError([ConfigProblem(
                "data.dataset", f"no packaged dataset '{spec}'{did_you_mean(name, available)}; "
                                f"available: {', '.join('sft:' + a for a in available) or 'none'}")])
        return Source(spec, "local", path=path)
    path = Path(spec).expanduser()
    if path.exists():
        return Source(spec, "local", path=path)
    if _is_glob(spec):
        return Source(spec, "local", files=_glob_files(spec))
    # Hub names are "name" or "org/name"; anything else path-like that is missing is a typo.
    looks_local = spec.endswith(SUPPORTED_EXTENSIONS) or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise DataError("no such file or folder", source=spec)
    name, _, revision = spec.partition("@")
    return Source(spec, "hub", name=name, revision=revision or None)


def _is_glob(spec: str) -> bool:
    """True for a glob of files. Only ``*`` and ``?`` count: ``[...]`` is the slicing of a split name
    (``data.eval_split: test[:100]``), and shard names rarely need a character class."""
    return "*" in spec or "?" in spec


def names_local_files(spec: str) -> bool:
    """True when ``spec`` names local data (a path or a glob) rather than a split name: it exists, or it is
    spelled as a path (a data file's extension, a ``/``), so a missing file is named as missing."""
    path = Path(str(spec)).expanduser()
    return path.exists() or _is_glob(str(spec)) or bool(extension_of(path)) or "/" in str(spec)


def _glob_files(pattern: str) -> list[Path]:
    """The data files ``pattern`` matches, sorted, so shards are read in the order their names give."""
    expanded = str(Path(pattern).expanduser())
    matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
    files = [p for p in matches if p.is_file() and extension_of(p)]
    if files:
        return files
    if matches:
        raise DataError(f"the glob matches {len(matches)} path(s), none of them a "
                        f"{'/'.join(SUPPORTED_EXTENSIONS)} file", source=pattern)
    # Name what is nearby: the deepest folder of the pattern without a wildcard, and its data files.
    base = Path(expanded)
    while _is_glob(str(base)):
        base = base.parent
    if not base.is_dir():
        siblings = [p.name for p in base.parent.iterdir() if p.is_dir()] if base.parent.is_dir() else []
        raise DataError(f"no file matches the glob: there is no folder {base}{did_you_mean(base.name, siblings)}",
                        source=pattern)
    nearby = sorted(p.name for p in base.iterdir() if p.is_file() and extension_of(p))
    rest = Path(expanded).relative_to(base).as_posix()
    held = (f"{base} holds {', '.join(nearby[:5])}{', ...' if len(nearby) > 5 else ''}" if nearby
            else f"{base} holds no {'/'.join(SUPPORTED_EXTENSIONS)} files")
    raise DataError(f"no file matches the glob{_other_extension(rest, nearby)}; {held}", source=pattern)


def _other_extension(pattern: str, names: list[str]) -> str:
    """" (did you mean 'train-*.parquet'?)" when the pattern matches ``names`` with another extension:
    the usual slip is the extension (shards saved as .jsonl.gz, globbed as .jsonl)."""
    ext = extension_of(pattern)
    stem = pattern[:-len(ext)] if ext else pattern
    for other in sorted({extension_of(n) or "" for n in names}):
        if fnmatch.filter(names, stem + other):
            return f" (did you mean '{stem + other}'?)"
    return ""


_SPLIT_RE = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(split: str, key: str = "data.split") -> tuple[str, str | None, str | None]:
    """``"train[:100]"`` → ``("train", None, "100")``; bounds may be percentages (``"10%"``)."""
    m = _SPLIT_RE.match(str(split))
    if not m:
        raise ConfigError([ConfigProblem(key, f"'{split}' is not a split like train, train[:100] or train[10%:]")])
    return m.group(1), m.group(2), m.group(3)


def _slice(items: list, start: str | None, stop: str | None) -> list:
    def bound(b: str | None) -> int | None:
        if b is None:
            return None
        if b.endswith("%"):
            return round(len(items) * int(b[:-1]) / 100)
        return int(b)

    return items[bound(start):bound(stop)]


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file in a dataset folder belongs to, from its name or its folder's name."""
    names = [path.stem.lower()] + [p.lower() for p in path.relative_to(root).parts[:-1]]
    for name in names:
        for split in SPLIT_NAMES:
            if name == split or re.match(rf"^{split}[-_.]", name):
                return split
    return None


def _saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a folder written by ``Dataset.save_to_disk``, as its ``state.json`` lists them
    (the folder may also hold ``cache-*.arrow`` files of ``map`` calls, which are not the dataset)."""
    state = folder / "state.json"
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"not a state.json written by datasets' save_to_disk ({type(exc).__name__}: {exc})",
                        source=str(state)) from None
    return [folder / name for name in names]


def _folder_files(root: Path) -> list[Path]:
    """The data files under ``root``, sorted by path, hidden ones skipped; a ``save_to_disk`` folder
    (one with ``state.json`` and ``dataset_info.json``) contributes the files its state lists."""
    # Both files, so a user's own data file that happens to be named state.json is still read as data.
    saved = {p.parent for p in root.rglob("state.json") if (p.parent / "dataset_info.json").is_file()}
    files = [f for folder in saved for f in _saved_dataset_files(folder)]
    # A DatasetDict's dataset_dict.json (beside its split folders) names the splits; it holds no rows.
    dict_roots = {folder.parent for folder in saved}
    found = [p for p in root.rglob("*") if p.is_file() and p.parent not in saved
             and not (p.name == "dataset_dict.json" and p.parent in dict_roots)
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    unread = sorted(str(p.relative_to(root)) for p in found if not extension_of(p))
    if unread:
        from sft.core.notices import notice

        notice(f"{root}: {len(unread)} file(s) not read, not {'/'.join(SUPPORTED_EXTENSIONS)}: "
               f"{', '.join(unread[:5])}{', ...' if len(unread) > 5 else ''}")
    return sorted([*files, *(p for p in found if extension_of(p))])


def _local_files(source: Source, split: str, key: str) -> list[Path]:
    """The files of ``split`` (already stripped of slicing) for a local source."""
    if source.files is not None or source.path.is_file():
        if source.path is not None and not extension_of(source.path):
            raise DataError(f"unsupported file type '{source.path.suffix}'; use one of {', '.join(SUPPORTED_EXTENSIONS)}",
                            source=str(source.path))
        if split != "train":
            what = "a glob of files has" if source.files is not None else "a single file has"
            hint = did_you_mean(split, ["train"]) or f" (use a folder with {split}.jsonl, or data.test_size)"
            raise ConfigError([ConfigProblem(key, f"{what} only the split 'train', not '{split}'{hint}")])
        return source.files if source.files is not None else [source.path]
    assert source.path is not None
    files = _folder_files(source.path)
    if not files:
        raise DataError(f"the folder holds no {'/'.join(SUPPORTED_EXTENSIONS)} files", source=str(source.path))
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, source.path) or "", []).append(f)
    if set(by_split) == {""}:
        by_split = {"train": files}  # no split names: every file is training data
    stray = by_split.pop("", [])
    if stray:  # beside split-named files, a file of no split would be read by no split
        first = stray[0].relative_to(source.path)
        raise DataError(f"{first}{f' and {len(stray) - 1} more file(s) belong' if len(stray) > 1 else ' belongs'} to no "
                        f"split{did_you_mean(first.stem.split('-')[0].split('_')[0].lower(), SPLIT_NAMES)}: beside "
                        f"{', '.join(sorted(by_split))} files, a file is read only when its name (or its folder's) "
                        f"starts with a split name (train-{first.name}); rename it or move it out",
                        source=str(source.path))
    if split not in by_split:
        raise ConfigError([ConfigProblem(key, f"the folder {source.path} has no split '{split}'"
                                              f"{did_you_mean(split, by_split)}; splits: {', '.join(sorted(by_split))}")])
    return by_split[split]


def _load_hub(source: Source, split: str) -> Any:
    """``datasets.load_dataset`` for a hub name; offline, only the local cache is tried."""
    import datasets
    import huggingface_hub.constants as hub_constants

    online = hub_reachable()
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if not online:
        # Offline mode makes `datasets` use its local cache and fail at once when the dataset
        # is not there, instead of retrying the network for half a minute.
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(source.name, split=split, revision=source.revision)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all become one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not online:
            msg = (f"cannot load hub dataset '{source.name}': the Hugging Face Hub cannot be reached and the "
                   f"dataset is not in the local cache ({first}). Use a local file, or connect and run once to cache it")
        elif type(exc).__name__ in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError"):
            msg = f"hub dataset '{source.name}' not found ({first})"
        else:
            msg = f"cannot load hub dataset '{source.name}' split '{split}': {type(exc).__name__}: {first}"
        raise DataError(msg, source=source.name) from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def fingerprint_split(source: Source, split: str, key: str) -> tuple[str, Any]:
    """A content hash for ``split`` of ``source``, plus what reading it needs (files or a hub dataset)."""
    name, start, stop = parse_split(split, key)
    if source.kind == "local":
        files = _local_files(source, name, key)
        return hash_files(files) + f"|{start}:{stop}", files
    ds = _load_hub(source, split)
    # The fingerprint `datasets` derives from the downloaded files at the resolved revision.
    return f"hub|{source.name}|{source.revision}|{split}|{getattr(ds, '_fingerprint', '')}", ds


def read_split(source: Source, split: str, key: str, handle: Any) -> tuple[Sequence[Any], Sequence[RowRef]]:
    if source.kind == "hub":
        # The Arrow table `datasets` memory-maps from its cache, read a batch at a time: no dict a row.
        table = (handle if handle._indices is None else handle.flatten_indices()).data.table
        return TableRows(table), RowRefs(source.name, table.num_rows)
    _name, start, stop = parse_split(split, key)
    parts: list[Sequence[Any]] = []
    ref_parts: list[Sequence[RowRef]] = []
    count = 0
    # Progress by bytes read, so shards of any size weigh what they cost; a line only after 5 s.
    sizes = [f.stat().st_size for f in handle]
    progress, done = Progress("reading data"), 0
    total = sum(sizes) or 1
    for i, (f, size) in enumerate(zip(handle, sizes), 1):
        def within(fraction: float, in_file: int, i: int = i, at: int = done, size: int = size,
                   before: int = count) -> None:
            progress.update((at + fraction * size) / total, before + in_file, f"{i}/{len(sizes)} files")

        r, rf = read_file(f, within)
        parts.append(r)
        ref_parts.append(rf)
        count += len(rf)
        done += size
        progress.update(done / total, count, f"{i}/{len(sizes)} files")
    # JSON lines stay unparsed until the pipeline reads them (in its workers); shards are chained, not copied.
    rows: Sequence[Any] = parts[0] if len(parts) == 1 else RowChain(parts)
    refs: Sequence[RowRef] = ref_parts[0] if len(ref_parts) == 1 else RowChain(ref_parts)
    if start is not None or stop is not None:
        idx = _slice(range(len(rows)), start, stop)
        rows, refs = rows[idx.start:idx.stop], refs[idx.start:idx.stop]
    return rows, refs


def read_rows(spec: str, split: str = "train") -> tuple[list[Any], Sequence[RowRef]]:
    """All rows of ``split`` of the dataset ``spec``, each with its :class:`RowRef`."""
    source = resolve_source(spec)
    _fp, handle = fingerprint_split(source, split, "data.split")
    rows, refs = read_split(source, split, "data.split", handle)
    return list(rows), refs  # every row parsed: an invalid line raises here


def columns_of(rows: Sequence[Any], limit: int = 100) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows[:limit]:
        if isinstance(row, Mapping):
            cols.update(dict.fromkeys(map(str, row)))
    return list(cols)
