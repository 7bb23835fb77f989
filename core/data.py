"""The data pipeline: sources → rows → conversations → token ids + trained-token masks.

What the trainer and the CLI call:

- :func:`prepare_tokenizer` makes a tokenizer fit a chat template (EOT token, distinct pad,
  the template's Jinja as ``chat_template``).
- :func:`build_datasets` returns :class:`PreparedData`: ``train``/``eval`` ``datasets.Dataset``
  objects with ``input_ids`` and ``assistant_masks`` columns, the counts, and the
  normalized conversations. The result is cached under a content-addressed key.
- :func:`validate_data` (``sft validate``) runs the whole pipeline with the tokenizer only.

Stages, all before any model loads:

1. **Source** (:func:`resolve_source`): ``sft:<name>`` (a file packaged in ``core/assets``), a
   local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a folder of them, or a Hugging Face
   Hub dataset through ``datasets.load_dataset``. ``data.split`` may slice (``train[:100]``,
   ``train[10%:]``).
2. **Rows** keep where they came from (file, line, row) so every error can say so.
3. **Format**: ``data.format`` or, with ``auto``, the one format whose ``detect`` accepts the
   columns. Each row becomes a conversation, checked by
   :func:`sft.core.formats.validate_conversation`. Bad rows follow ``data.on_bad_row``.
4. **Eval split**: ``data.eval_split`` or ``data.test_size`` rows drawn with ``training.seed``.
5. **Tokens**: the template renders segments; :func:`sft.core.templating.encode_rendered`
   tokenizes the full text and marks the tokens of trained segments. Rows longer than
   ``model.max_seq_length`` are truncated (counted); rows left with no trained token are bad
   rows (counted); if every row is, that is an error whatever the policy.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .errors import ConfigError, ConfigProblem, DataError, SftError, did_you_mean
from .formats import validate_conversation
from .interfaces import ChatTemplate, DatasetFormat, Message
from .templating import encode_rendered, end_of_turn

if TYPE_CHECKING:
    from .plugins import PluginManager

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "PIPELINE_VERSION",
    "PreparedData",
    "Source",
    "RowRef",
    "resolve_source",
    "parse_split",
    "read_rows",
    "resolve_format",
    "load_template",
    "prepare_tokenizer",
    "tokenizer_fingerprint",
    "cache_key_parts",
    "cache_key",
    "build_datasets",
    "describe_stats",
    "validate_data",
]

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
#: Bump when the pipeline's output for the same inputs changes; part of every cache key.
PIPELINE_VERSION = "1"
ASSETS_DIR = Path(__file__).parent / "assets"
#: Split names recognised in file names inside a dataset folder (``train.jsonl``, ``test-0.parquet``).
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")
#: Tokens a tokenizer may already have that make a good pad (checked in this order).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<|padding|>")
#: Rows rendered and tokenized per batch (bounds memory, keeps the fast tokenizer's batching).
ENCODE_BATCH = 2000


# -- where rows come from ---------------------------------------------------------------
@dataclass(frozen=True)
class RowRef:
    """Where one row came from: its file (or hub name), 1-based line when known, 0-based row."""

    source: str
    line: int | None
    row: int


@dataclass
class Source:
    """A resolved ``data.dataset``: ``kind`` is ``local`` (files, incl. ``sft:`` assets) or ``hub``."""

    spec: str
    kind: str
    path: Path | None = None
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
    # Hub names are "name" or "org/name"; anything else path-like that is missing is a typo.
    looks_local = spec.endswith(SUPPORTED_EXTENSIONS) or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise DataError("no such file or folder", source=spec)
    name, _, revision = spec.partition("@")
    return Source(spec, "hub", name=name, revision=revision or None)


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


def _local_files(source: Source, split: str, key: str) -> list[Path]:
    """The files of ``split`` (already stripped of slicing) for a local source."""
    assert source.path is not None
    if source.path.is_file():
        if source.path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise DataError(f"unsupported file type '{source.path.suffix}'; use one of {', '.join(SUPPORTED_EXTENSIONS)}",
                            source=str(source.path))
        if split != "train":
            raise ConfigError([ConfigProblem(key, f"a single file has only the split 'train', not '{split}' "
                                                  f"(use a folder with {split}.jsonl, or data.test_size)")])
        return [source.path]
    files = sorted(p for p in source.path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(source.path).parts))
    if not files:
        raise DataError(f"the folder holds no {'/'.join(SUPPORTED_EXTENSIONS)} files", source=str(source.path))
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, source.path) or "", []).append(f)
    if set(by_split) == {""}:
        by_split = {"train": files}  # no split names: every file is training data
    by_split.pop("", None)
    if split not in by_split:
        raise ConfigError([ConfigProblem(key, f"the folder {source.path} has no split '{split}'"
                                              f"{did_you_mean(split, by_split)}; splits: {', '.join(sorted(by_split))}")])
    return by_split[split]


# -- reading files ----------------------------------------------------------------------
def _read_json(path: Path) -> tuple[list[Any], list[RowRef]]:
    """A JSON array of rows, each with the line its object starts on. JSONL-in-.json works too."""
    text = path.read_text(encoding="utf-8-sig")
    src = str(path)
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] == "{":
        # One object per line saved as .json is common; a single object is not a dataset.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":
                return _read_jsonl(path)
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=src, line=exc.lineno) from None
        raise DataError(f"expected a list of rows (a JSON array) or JSON lines, got an object with keys "
                        f"{', '.join(list(obj)[:8])}", source=src, line=1)
    if i >= len(text) or text[i] != "[":
        if i >= len(text):
            raise DataError("the file is empty", source=src)
        raise DataError("expected a JSON array of rows", source=src, line=text.count("\n", 0, i) + 1)
    rows: list[Any] = []
    refs: list[RowRef] = []
    line, counted = 1, 0  # line number at offset `counted`, advanced incrementally
    i = _skip_ws(text, i + 1)
    try:
        if i < len(text) and text[i] == "]":
            return rows, refs
        while True:
            obj, end = decoder.raw_decode(text, i)
            line += text.count("\n", counted, i)
            counted = i
            rows.append(obj)
            refs.append(RowRef(src, line, len(refs)))
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                break
            raise json.JSONDecodeError("expected ',' or ']' after a row", text, i)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=src, line=exc.lineno) from None
    return rows, refs


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return i


def _read_jsonl(path: Path) -> tuple[list[Any], list[RowRef]]:
    rows: list[Any] = []
    refs: list[RowRef] = []
    src = str(path)
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=src, line=lineno) from None
            refs.append(RowRef(src, lineno, len(refs)))
    return rows, refs


def _read_csv(path: Path) -> tuple[list[Any], list[RowRef]]:
    rows: list[Any] = []
    refs: list[RowRef] = []
    src = str(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        try:
            for row in reader:
                rows.append(dict(row))
                refs.append(RowRef(src, start, len(refs)))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"invalid CSV: {exc}", source=src, line=reader.line_num) from None
    return rows, refs


def _read_parquet(path: Path) -> tuple[list[Any], list[RowRef]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"cannot read Parquet: {exc}", source=str(path)) from None
    return rows, [RowRef(str(path), None, i) for i in range(len(rows))]


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def _hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:  # contents in order; names don't matter (a renamed copy hits the cache)
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# -- the hub ----------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in a second instead of after retries."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(source: Source, split: str) -> Any:
    """``datasets.load_dataset`` for a hub name; offline, only the local cache is tried."""
    import datasets
    import huggingface_hub.constants as hub_constants

    online = _hub_reachable()
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


def _fingerprint_split(source: Source, split: str, key: str) -> tuple[str, Any]:
    """A content hash for ``split`` of ``source``, plus what reading it needs (files or a hub dataset)."""
    name, start, stop = parse_split(split, key)
    if source.kind == "local":
        files = _local_files(source, name, key)
        return _hash_files(files) + f"|{start}:{stop}", files
    ds = _load_hub(source, split)
    # The fingerprint `datasets` derives from the downloaded files at the resolved revision.
    return f"hub|{source.name}|{source.revision}|{split}|{getattr(ds, '_fingerprint', '')}", ds


def _read_split(source: Source, split: str, key: str, handle: Any) -> tuple[list[Any], list[RowRef]]:
    if source.kind == "hub":
        rows = handle.to_list()
        return rows, [RowRef(source.name, None, i) for i in range(len(rows))]
    _name, start, stop = parse_split(split, key)
    rows: list[Any] = []
    refs: list[RowRef] = []
    for f in handle:
        r, rf = _READERS[f.suffix.lower()](f)
        rows += r
        refs += rf
    if start is not None or stop is not None:
        idx = _slice(list(range(len(rows))), start, stop)
        rows, refs = [rows[i] for i in idx], [refs[i] for i in idx]
    return rows, refs


def read_rows(spec: str, split: str = "train") -> tuple[list[Any], list[RowRef]]:
    """All rows of ``split`` of the dataset ``spec``, each with its :class:`RowRef`."""
    source = resolve_source(spec)
    _fp, handle = _fingerprint_split(source, split, "data.split")
    return _read_split(source, split, "data.split", handle)


def _columns(rows: Sequence[Any], limit: int = 100) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows[:limit]:
        if isinstance(row, Mapping):
            cols.update(dict.fromkeys(map(str, row)))
    return list(cols)


# -- plugins ------------------------------------------------------------------------------
def _pm(pm: "PluginManager | None") -> "PluginManager":
    if pm is not None:
        return pm
    from .plugins import get_plugin_manager

    return get_plugin_manager()


def resolve_format(cfg: Any, pm: "PluginManager | None", columns: Sequence[str], source: str = "") -> tuple[DatasetFormat, Any]:
    """The dataset format (and its options) for ``cfg.data.format``; ``auto`` detects it from ``columns``."""
    from .config import plugin_options

    pm = _pm(pm)
    name = cfg.data.format
    if name != "auto":
        return pm.get("dataset_format", name, "data.format"), plugin_options(cfg, "dataset_format", name, pm)
    matches = []
    for fname, fmt in sorted(pm.registry("dataset_format").items()):
        options = plugin_options(cfg, "dataset_format", fname, pm)
        if fmt.detect(columns, options):
            matches.append((fmt, options))
    shown = ", ".join(columns[:12]) or "none"
    if not matches:
        available = ", ".join(sorted(pm.registry("dataset_format")))
        raise DataError(f"data.format=auto: no dataset format recognises the columns ({shown}); "
                        f"set data.format to one of: {available}", source=source or None)
    if len(matches) > 1:
        names = ", ".join(f.name for f, _ in matches)
        raise DataError(f"data.format=auto is ambiguous: the columns ({shown}) match the formats {names}; "
                        f"set data.format to one of them", source=source or None)
    return matches[0]


def load_template(cfg: Any, pm: "PluginManager | None" = None) -> ChatTemplate:
    """The :class:`ChatTemplate` named by ``cfg.template.name``, with its options applied.

    A template with an ``options`` dataclass gets the config node ``template.<name>``; since
    the interface's methods take no options, a template that has options provides
    ``configure(options) -> ChatTemplate`` returning a configured copy, and that copy is used.
    """
    from .config import plugin_options

    pm = _pm(pm)
    name = cfg.template.name
    template = pm.get("chat_template", name, "template.name")
    options = plugin_options(cfg, "chat_template", name, pm)
    if isinstance(options, Mapping) and template.options is not None:
        # A run's config.yaml loaded as plain YAML (sft generate/export) gives a dict here.
        options = template.options(**options)
    configure = getattr(template, "configure", None)
    if options is not None and callable(configure):
        template = configure(options)
    return template


# -- the tokenizer ----------------------------------------------------------------------
def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def prepare_tokenizer(tokenizer: Any, template: ChatTemplate, cfg: Any) -> int:
    """Make ``tokenizer`` agree with ``template``; return how many tokens were added.

    Called by the trainer before it loads data (and by :func:`build_datasets`; it is
    idempotent). When the result is > 0 the trainer must resize the model's embeddings.

    1. The template's end-of-turn token (its first stop token) must be one token. If it is
       not in the vocabulary, ``template.on_missing_eot`` adds it as a special token
       (``add``) or raises :class:`ConfigError` (``error``).
    2. ``eos_token`` becomes that EOT, so ``generate()``, the saved tokenizer and the GGUF
       stop where training taught the model to stop.
    3. When ``pad == eos`` (or pad is unset), a distinct pad is chosen: an existing pad-like
       token, else the unk token, else a new ``<|pad|>``. Collators that mask pad ids
       would otherwise mask the trained EOS too.
    4. ``tokenizer.chat_template`` becomes ``template.jinja(tokenizer)``.
    """
    from tokenizers import AddedToken

    added = 0
    eot = end_of_turn(template, tokenizer)
    if _single_token_id(tokenizer, eot) is None:
        if cfg.template.on_missing_eot == "error":
            raise ConfigError([ConfigProblem(
                "template.on_missing_eot",
                f"the end-of-turn token {eot!r} of template '{template.name}' is not a token of the tokenizer of "
                f"'{cfg.model.name}'; set template.on_missing_eot=add to add it (the embeddings are resized), "
                f"or choose a template made for this model")])
        added += tokenizer.add_tokens([AddedToken(eot, special=True, normalized=False)], special_tokens=True)
    if tokenizer.eos_token != eot:
        tokenizer.eos_token = eot
    pad = tokenizer.pad_token
    if pad is None or pad in (eot, tokenizer.eos_token):
        vocab = tokenizer.get_vocab()
        taken = {eot, tokenizer.eos_token, tokenizer.bos_token}
        choice = next((c for c in (*PAD_CANDIDATES, tokenizer.unk_token) if c and c in vocab and c not in taken), None)
        if choice is None:
            choice = "<|pad|>"
            added += tokenizer.add_tokens([AddedToken(choice, special=True, normalized=False)], special_tokens=True)
        tokenizer.pad_token = choice
    tokenizer.chat_template = template.jinja(tokenizer)
    return added


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes token ids: its class, its full
    backend (vocab, merges, normalizer, pre-tokenizer, added tokens) or vocab, its special
    tokens and its chat_template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        for name in sorted(getattr(tokenizer, "vocab_files_names", {}).values()):
            path = Path(getattr(tokenizer, "name_or_path", "")) / name
            if path.is_file():
                h.update(path.read_bytes())
    specials = {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()


# -- bad rows -----------------------------------------------------------------------------
class _BadRows:
    """Applies ``data.on_bad_row``: raise at once (``error``) or count and keep going (``skip``)."""

    def __init__(self, policy: str, max_fraction: float):
        self.policy = policy
        self.max_fraction = max_fraction
        self.errors: list[DataError] = []
        self.reasons: dict[str, int] = {}

    def add(self, error: DataError) -> None:
        if self.policy == "error":
            raise DataError(error.message + " (set data.on_bad_row=skip to skip such rows)", source=error.source,
                            line=error.line, row=error.row, field=error.field)
        self.errors.append(error)
        reason = re.sub(r"\d+", "N", f"{error.field}: {error.message}" if error.field else error.message)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def check(self, total: int) -> None:
        if not self.errors:
            return
        n = len(self.errors)
        if n >= total:
            raise DataError(f"all {total} rows are bad; the first: {self.errors[0]}")
        if n / total > self.max_fraction:
            raise DataError(f"{n} of {total} rows are bad ({n / total:.1%}), more than data.max_bad_fraction="
                            f"{self.max_fraction}; the first: {self.errors[0]}")

    def stats(self) -> dict[str, Any]:
        return {"count": len(self.errors), "reasons": dict(sorted(self.reasons.items(), key=lambda kv: -kv[1])),
                "examples": [str(e) for e in self.errors[:10]]}


def _normalize(rows: Sequence[Any], refs: Sequence[RowRef], fmt: DatasetFormat, options: Any,
               bad: _BadRows) -> tuple[list[list[Message]], list[RowRef]]:
    conversations: list[list[Message]] = []
    kept: list[RowRef] = []
    for row, ref in zip(rows, refs):
        try:
            if not isinstance(row, Mapping):
                raise DataError(f"expected an object, got {type(row).__name__}")
            conversation = fmt.to_conversation(row, options)
            validate_conversation(conversation)
        except DataError as exc:
            bad.add(exc.located(source=ref.source, line=ref.line, row=ref.row))
            continue
        except Exception as exc:  # noqa: BLE001 - a plugin bug on one row is still a located error
            bad.add(DataError(f"format '{fmt.name}' failed: {type(exc).__name__}: {exc}",
                              source=ref.source, line=ref.line, row=ref.row))
            continue
        conversations.append(conversation)
        kept.append(ref)
    return conversations, kept


# -- tokenization -------------------------------------------------------------------------
@dataclass
class _Encoded:
    input_ids: list[list[int]] = field(default_factory=list)
    masks: list[list[int]] = field(default_factory=list)
    conversations: list[list[Message]] = field(default_factory=list)
    truncated: int = 0
    fully_masked: int = 0


def _encode(conversations: Sequence[list[Message]], refs: Sequence[RowRef], template: ChatTemplate,
            tokenizer: Any, cfg: Any, bad: _BadRows) -> _Encoded:
    out = _Encoded()
    max_len = int(cfg.model.max_seq_length)
    for lo in range(0, len(conversations), ENCODE_BATCH):
        batch: list[tuple[list[Message], RowRef]] = []
        rendered = []
        for conversation, ref in zip(conversations[lo:lo + ENCODE_BATCH], refs[lo:lo + ENCODE_BATCH]):
            try:
                rendered.append(template.render(conversation, tokenizer))
            except Exception as exc:  # noqa: BLE001 - a row the template cannot render is a bad row, never trained empty
                detail = str(exc) if isinstance(exc, SftError) else f"{type(exc).__name__}: {exc}"
                bad.add(DataError(f"template '{template.name}' cannot render this row: {detail}",
                                  source=ref.source, line=ref.line, row=ref.row))
                continue
            batch.append((conversation, ref))
        encoded = encode_rendered(tokenizer, rendered, cfg.data.train_on)
        for (conversation, ref), (ids, mask) in zip(batch, encoded):
            truncated = len(ids) > max_len
            if truncated:
                ids, mask = ids[:max_len], mask[:max_len]
                out.truncated += 1
            if not any(mask):
                out.fully_masked += 1
                why = (f"no trained token left after truncation to model.max_seq_length={max_len}"
                       if truncated else "no trained token (all labels masked)")
                bad.add(DataError(why, source=ref.source, line=ref.line, row=ref.row))
                continue
            out.input_ids.append(ids)
            out.masks.append(mask)
            out.conversations.append(conversation)
    return out


def _to_dataset(encoded: _Encoded) -> Any:
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    # Arrow arrays straight from the lists: Dataset.from_dict would encode row by row.
    table = pa.table({
        "input_ids": pa.array(encoded.input_ids, type=pa.list_(pa.int32())),
        "assistant_masks": pa.array(encoded.masks, type=pa.list_(pa.int8())),
    })
    return datasets.Dataset(InMemoryTable(table))


# -- cache ----------------------------------------------------------------------------------
def cache_key_parts(cfg: Any, fmt: DatasetFormat, fmt_options: Any, template: ChatTemplate, tokenizer: Any,
                    data_fingerprint: str) -> dict[str, Any]:
    """Everything the tokenized dataset depends on, by component (each is tested to change the key)."""
    options = dataclasses.asdict(fmt_options) if dataclasses.is_dataclass(fmt_options) else fmt_options
    return {
        "pipeline": PIPELINE_VERSION,
        "data": data_fingerprint,
        "split": [cfg.data.split, cfg.data.eval_split, float(cfg.data.test_size), int(cfg.training.seed)],
        "format": [fmt.name, fmt.version, options],
        "template": [template.name, template.version, template.jinja(tokenizer), template.stop_tokens(tokenizer)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_length": int(cfg.model.max_seq_length),
        "masking": [cfg.data.train_on, cfg.data.on_bad_row, float(cfg.data.max_bad_fraction)],
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    """The content address of a tokenized dataset: a hash of :func:`cache_key_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cache_root(cfg: Any) -> Path | None:
    setting = cfg.data.cache_dir
    if setting is not None and str(setting).lower() in ("off", "none", "false", ""):
        return None
    if setting:
        return Path(setting).expanduser()
    from .models import cache_dir

    return cache_dir("datasets")


def _conv_to_json(conversations: Sequence[Sequence[Message]]) -> list[list[list[str]]]:
    return [[[m.role, m.content] for m in c] for c in conversations]


def _conv_from_json(data: Sequence[Sequence[Sequence[str]]]) -> list[list[Message]]:
    return [[Message(role, content) for role, content in c] for c in data]


def _load_cached(path: Path) -> "PreparedData | None":
    import datasets

    if not (path / "COMPLETE").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        train = datasets.load_from_disk(str(path / "train"))
        eval_ds = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
        return None
    stats = dict(meta["stats"], cache="hit")
    return PreparedData(train, eval_ds, stats, _conv_from_json(meta["train_conversations"]),
                        _conv_from_json(meta["eval_conversations"]))


def _store_cached(path: Path, data: "PreparedData") -> None:
    import shutil
    import tempfile

    from datasets.utils import logging as ds_logging

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    except OSError as exc:
        _echo(f"data: not caching the tokenized dataset ({exc})")  # an optimisation; never fail a run for it
        return
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a "Saving the dataset" bar per run is noise
    try:
        data.train.save_to_disk(str(tmp / "train"))
        if data.eval is not None:
            data.eval.save_to_disk(str(tmp / "eval"))
        meta = {"stats": data.stats, "train_conversations": _conv_to_json(data.train_conversations),
                "eval_conversations": _conv_to_json(data.eval_conversations)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        (tmp / "COMPLETE").write_text("")
        if path.exists():  # a damaged entry (a complete one would have been a hit)
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # atomic: a reader sees the whole entry or none
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _echo(f"data: not caching the tokenized dataset ({exc})")
    finally:
        if bars:
            ds_logging.enable_progress_bar()


# -- the public entry points ------------------------------------------------------------
@dataclass
class PreparedData:
    """What :func:`build_datasets` returns.

    Attributes:
        train: ``datasets.Dataset`` with ``input_ids`` (list[int]) and ``assistant_masks``
            (list[int], 1 = trained token). Already truncated to ``model.max_seq_length``.
        eval: the same for the eval split, or None.
        stats: ``rows`` (read), ``skipped`` (``count``, ``reasons``, ``examples``),
            ``truncated``, ``fully_masked``, ``train_rows``, ``eval_rows``, ``train_tokens``,
            ``trained_tokens``, ``eval_tokens``, ``max_tokens``, ``format``, ``template``,
            ``source``, ``cache`` (hit/miss/off) and ``cache_key``.
        train_conversations / eval_conversations: the normalized conversations, row for row
            with the datasets (lists of :class:`Message`).
    """

    train: Any
    eval: Any
    stats: dict[str, Any]
    train_conversations: list[list[Message]]
    eval_conversations: list[list[Message]]


def _echo(message: str) -> None:
    print(message, file=sys.stderr)


def _hold_out(conversations: list, refs: list, test_size: float, seed: int) -> tuple[tuple[list, list], tuple[list, list]]:
    """Split rows into ``(train, eval)`` pairs of (conversations, refs); ``test_size`` rows drawn with ``seed``.

    Both keep the source order; the same seed always holds out the same rows.
    """
    n_eval = _eval_count(test_size, len(conversations))
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = ([c for i, c in enumerate(conversations) if i not in held], [r for i, r in enumerate(refs) if i not in held])
    evals = ([conversations[i] for i in sorted(held)], [refs[i] for i in sorted(held)])
    return train, evals


def _eval_count(test_size: float, n: int) -> int:
    if test_size <= 0:
        return 0
    count = int(test_size) if test_size >= 1 else max(1, round(test_size * n))
    if count >= n:
        raise ConfigError([ConfigProblem("data.test_size", f"{test_size} leaves no training rows out of {n}")])
    return count


def build_datasets(cfg: Any, pm: "PluginManager | None", tokenizer: Any, *, use_cache: bool = True,
                   quiet: bool = False) -> PreparedData:
    """Load, normalize, split, render and tokenize the configured data.

    Args:
        cfg: the run config (``data``, ``template``, ``model.max_seq_length``, ``training.seed``).
        pm: the plugin manager (None: the process-wide one).
        tokenizer: a fast Hugging Face tokenizer. It is passed through
            :func:`prepare_tokenizer` (idempotent), so it may be modified.
        use_cache: read and write the content-addressed cache (``data.cache_dir``).
        quiet: do not print the skipped-rows notice.

    Raises:
        DataError: a bad row under ``on_bad_row=error`` (naming file:line, row and field),
            too many bad rows, every row fully masked, or an unreadable source.
        ConfigError: a bad split, test_size or format name.
    """
    pm = _pm(pm)
    template = load_template(cfg, pm)
    prepare_tokenizer(tokenizer, template, cfg)
    source = resolve_source(cfg.data.dataset)

    fp, handle = _fingerprint_split(source, cfg.data.split, "data.split")
    eval_handle = eval_source = None
    eval_spec = ""
    if cfg.data.eval_split:
        eval_source = source
        eval_spec = str(cfg.data.eval_split)
        if source.kind == "local" and Path(eval_spec).expanduser().exists():
            eval_source, eval_spec = resolve_source(eval_spec), "train"
        efp, eval_handle = _fingerprint_split(eval_source, eval_spec, "data.eval_split")
        fp += "|eval:" + efp

    # Rows are read only on a cache miss, except that auto-detection needs a local source's columns.
    rows: list[Any] | None = None
    refs: list[RowRef] | None = None
    columns: list[str] | None = list(handle.column_names) if source.kind == "hub" else None
    if cfg.data.format == "auto" and columns is None:
        rows, refs = _read_split(source, cfg.data.split, "data.split", handle)
        columns = _columns(rows)
    fmt, fmt_options = resolve_format(cfg, pm, columns or [], source.describe())

    parts = cache_key_parts(cfg, fmt, fmt_options, template, tokenizer, fp)
    key = cache_key(parts)
    root = _cache_root(cfg) if use_cache else None
    if root is not None:
        cached = _load_cached(root / key)
        if cached is not None:
            cached.stats["source"] = source.describe()
            _report_skipped(cached.stats, quiet)
            return cached

    if rows is None:
        rows, refs = _read_split(source, cfg.data.split, "data.split", handle)
    bad = _BadRows(cfg.data.on_bad_row, float(cfg.data.max_bad_fraction))
    conversations, kept = _normalize(rows, refs, fmt, fmt_options, bad)
    total = len(rows)
    if total == 0:
        raise DataError("the dataset has no rows", source=source.describe())

    if eval_handle is not None:
        assert eval_source is not None
        erows, erefs = _read_split(eval_source, eval_spec, "data.eval_split", eval_handle)
        eval_convs, eval_refs = _normalize(erows, erefs, fmt, fmt_options, bad)
        total += len(erows)
        train_convs, train_refs = conversations, kept
    else:
        (train_convs, train_refs), (eval_convs, eval_refs) = _hold_out(
            conversations, kept, float(cfg.data.test_size), int(cfg.training.seed))

    train_enc = _encode(train_convs, train_refs, template, tokenizer, cfg, bad)
    eval_enc = _encode(eval_convs, eval_refs, template, tokenizer, cfg, bad)
    if not train_enc.input_ids:
        first = f"; the first: {bad.errors[0]}" if bad.errors else ""
        raise DataError("no training row has a trained token: every row is fully masked or bad "
                        f"(check template '{template.name}', data.train_on and model.max_seq_length){first}",
                        source=source.describe())
    bad.check(total)

    stats: dict[str, Any] = {
        "rows": total,
        "skipped": bad.stats(),
        "truncated": train_enc.truncated + eval_enc.truncated,
        "fully_masked": train_enc.fully_masked + eval_enc.fully_masked,
        "train_rows": len(train_enc.input_ids),
        "eval_rows": len(eval_enc.input_ids),
        "train_tokens": sum(map(len, train_enc.input_ids)),
        "trained_tokens": sum(map(sum, train_enc.masks)),
        "eval_tokens": sum(map(len, eval_enc.input_ids)),
        "max_tokens": max(map(len, train_enc.input_ids + eval_enc.input_ids)),
        "format": fmt.name,
        "template": template.name,
        "source": source.describe(),
        "cache": "miss" if root is not None else "off",
        "cache_key": key,
    }
    prepared = PreparedData(_to_dataset(train_enc), _to_dataset(eval_enc) if eval_enc.input_ids else None,
                            stats, train_enc.conversations, eval_enc.conversations)
    _report_skipped(stats, quiet)
    if root is not None:
        _store_cached(root / key, prepared)
    return prepared


def _report_skipped(stats: Mapping[str, Any], quiet: bool) -> None:
    skipped = stats["skipped"]
    if quiet or not skipped["count"]:
        return
    reasons = "; ".join(f"{n} × {r}" for r, n in list(skipped["reasons"].items())[:5])
    _echo(f"data: skipped {skipped['count']} of {stats['rows']} rows (data.on_bad_row=skip): {reasons}")
    for example in skipped["examples"][:3]:
        _echo(f"  e.g. {example}")


def describe_stats(stats: Mapping[str, Any]) -> str:
    """One line: ``500 rows (sharegpt, template chatml) → 450 train / 50 eval; ...``."""
    return (f"{stats['rows']} rows ({stats['format']}, template {stats['template']}) → {stats['train_rows']} train / "
            f"{stats['eval_rows']} eval; skipped {stats['skipped']['count']}, truncated {stats['truncated']}, "
            f"fully masked {stats['fully_masked']}; {stats['train_tokens']:,} train tokens, "
            f"{stats['trained_tokens']:,} trained")


def validate_data(cfg: Any) -> str:
    """``sft validate``: run the whole data pipeline with the tokenizer only (never model weights).

    Returns a one-line report; raises :class:`DataError` / :class:`ConfigError`.
    """
    from .models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepared = build_datasets(cfg, None, tokenizer)
    return "data OK: " + describe_stats(prepared.stats)
