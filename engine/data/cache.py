"""The content-addressed cache of tokenized datasets.

The key hashes everything the tokenized rows depend on (:func:`cache_key_parts`): the data's
content, the split settings, the format and its options, the template's Jinja and stop
tokens, the tokenizer, ``max_seq_length`` and the masking settings. An entry is written
whole into a staging folder and swapped into place, so two runs filling the cache at once
never see half an entry; a damaged entry is rebuilt, and an unwritable cache is reported and
skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from sft.core.interfaces import ChatTemplate, Conversation, DatasetFormat, Message, ToolCall, tools_of
from sft.core.notices import notice

__all__ = ["PreparedData", "StoredConversations", "dataset_of", "conversation_text", "conversation_from_text", "conversation_to_json",
           "conversation_from_json", "PIPELINE_VERSION", "cache_key_parts", "cache_key", "cache_root", "load_entry", "store_entry",
           "tokenizer_fingerprint"]

#: Bump when the pipeline's output for the same inputs changes; part of every cache key.
PIPELINE_VERSION = "6"



class StoredConversations(Sequence):
    """Conversations kept as their JSON text in an Arrow array, decoded when one is read.

    A conversation as Python objects costs several times its text (a :class:`Message` per
    turn); a run needs one of them (the quick generation's prompt) and ``--check-template``
    reads them one by one, so 100k conversations are held as text, memory-mapped from the
    cache when they come from it.
    """

    def __init__(self, texts: Any, index: Any = None):
        self.texts = texts  # pyarrow (chunked) array of JSON strings
        self.index = index  # which of them, in order (a numpy array); None: all

    @classmethod
    def of(cls, conversations: Sequence[Any]) -> "StoredConversations":
        import pyarrow as pa

        if isinstance(conversations, StoredConversations):
            return conversations
        return cls(pa.array([conversation_text(c) for c in conversations], type=pa.large_string()))

    def __len__(self) -> int:
        return len(self.texts) if self.index is None else len(self.index)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return conversation_from_text(self.text(index))

    def text(self, i: int) -> str:
        """The JSON text of conversation ``i``."""
        return self.texts[i if self.index is None else int(self.index[i])].as_py()

    def column(self) -> Any:
        """The JSON texts, one per conversation, as one Arrow array."""
        return self.texts if self.index is None else self.texts.take(self.index)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return not isinstance(other, str) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StoredConversations({len(self)} conversations)"


def conversation_to_json(messages: Sequence[Message]) -> dict[str, Any]:
    """A JSON-able form of a conversation (the data cache stores these); :func:`conversation_from_json` reverses it."""
    out: dict[str, Any] = {"messages": []}
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"name": c.name, "arguments": c.arguments, "id": c.id} for c in m.tool_calls]
        if m.tool_call_id is not None or m.name is not None or m.reasoning is not None:  # rare: one test per turn
            item.update((key, getattr(m, key)) for key in _OPTIONAL if getattr(m, key) is not None)
        out["messages"].append(item)
    tools = tools_of(messages)
    if tools:
        out["tools"] = tools
    return out


#: The optional text fields of a :class:`Message` a stored conversation keeps when they are set.
_OPTIONAL = ("tool_call_id", "name", "reasoning")


def conversation_from_json(data: Mapping[str, Any]) -> list[Message]:
    """The conversation :func:`conversation_to_json` wrote (a :class:`Conversation` when it has tools)."""
    messages = []
    for item in data["messages"]:
        if len(item) == 2 and "role" in item and "content" in item:  # most turns: no copy, no keyword unpacking
            messages.append(Message(item["role"], item["content"]))
            continue
        item = dict(item)
        calls = tuple(ToolCall(c["name"], c["arguments"], c.get("id")) for c in item.pop("tool_calls", ()))
        messages.append(Message(tool_calls=calls, **item))
    return Conversation(messages, data["tools"]) if data.get("tools") else messages


def conversation_text(conversation: Sequence[Message]) -> str:
    """A conversation as the JSON text :class:`StoredConversations` holds (``{"messages": []}`` for a raw-text row)."""
    return json.dumps(conversation_to_json(conversation), ensure_ascii=False)


def conversation_from_text(text: str) -> list[Message]:
    return conversation_from_json(json.loads(text))


@dataclass
class PreparedData:
    """What :func:`build_datasets` returns.

    Attributes:
        train: ``datasets.Dataset`` with ``input_ids`` (list[int]) and ``assistant_masks``
            (list[int], 1 = trained token). Already truncated to ``model.max_seq_length``.
        eval: the same for the eval split, or None.
        stats: ``rows`` (read), ``skipped`` (``count``, ``reasons``, ``examples``),
            ``truncated`` (rows over ``model.max_seq_length``), ``truncated_dropped`` and
            ``truncated_eot_added`` (what ``data.on_truncate`` did to them; ``truncated_dropped``
            counts ``long_prompts``, rows whose prompt alone is too long), ``chunked`` (text rows
            split into windows), ``fully_masked``, ``train_rows``, ``eval_rows``, ``train_tokens``,
            ``trained_tokens``, ``eval_tokens``, ``max_tokens``, ``format``, ``template``,
            ``source``, ``cache`` (hit/miss/off) and ``cache_key``.
        train_conversations / eval_conversations: the normalized conversations, row for row
            with the datasets (lists of :class:`Message`); a :class:`StoredConversations` for
            conversation rows, decoded one at a time as they are read.
    """

    train: Any
    eval: Any
    stats: dict[str, Any]
    train_conversations: Sequence[list[Message]]
    eval_conversations: Sequence[list[Message]]


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
        "masking": [cfg.data.train_on, cfg.data.on_bad_row, float(cfg.data.max_bad_fraction), cfg.data.on_truncate],
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    """The content address of a tokenized dataset: a hash of :func:`cache_key_parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


#: The ``data.cache_dir`` values that turn the cache off (YAML reads a bare ``off`` as false);
#: a config stores each as ``off``.
CACHE_OFF = ("off", "none", "false", "")


def cache_root(cfg: Any) -> Path | None:
    """Where tokenized datasets are cached (``data.cache_dir``, default ``<sft cache>/datasets``); None when off."""
    setting = cfg.data.cache_dir
    if setting is not None and str(setting).lower() in CACHE_OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    from ..models import cache_dir

    return cache_dir("datasets")


def dataset_of(table: Any, index: Any = None, fingerprint: str | None = None) -> Any:
    """A ``datasets.Dataset`` of ``table``'s rows at ``index`` (None: all, in order), without the
    ``conversation`` column and without copying: ``table`` may be a ``pyarrow.Table`` (wrapped as it is) or a
    ``datasets`` table (a memory-mapped cache file). ``fingerprint``: the dataset's, else ``datasets`` derives
    one by pickling every row."""
    import datasets
    import numpy as np
    from datasets.table import InMemoryTable, Table

    table = table if isinstance(table, Table) else InMemoryTable(table)
    data = datasets.Dataset(table.select([c for c in table.column_names if c != "conversation"]), fingerprint=fingerprint)
    if index is None or (len(index) == len(data) and np.array_equal(index, np.arange(len(data)))):
        return data
    return data.select(index)


def _rows_table(data: PreparedData) -> tuple[Any, Any, Any]:
    """Every row of ``data`` (train, then eval) as one table with its ``conversation`` column, and the train
    and eval positions in it."""
    import numpy as np
    import pyarrow as pa

    parts = []
    for dataset, conversations in ((data.train, data.train_conversations), (data.eval, data.eval_conversations)):
        if dataset is not None:
            rows = dataset.flatten_indices() if dataset._indices is not None else dataset
            parts.append(rows.data.table.append_column("conversation", StoredConversations.of(conversations).column()))
    n_train = len(data.train)
    n_eval = 0 if data.eval is None else len(data.eval)
    return pa.concat_tables(parts), np.arange(n_train), np.arange(n_train, n_train + n_eval)


def load_entry(path: Path) -> dict[str, Any] | None:
    """The cached :class:`PreparedData` fields at ``path``, or None when absent or damaged.

    An entry is ``rows.arrow`` (every row's columns and its conversation, an Arrow stream ``datasets``
    maps), ``splits.npz`` (the train and eval positions in it), ``meta.json`` and ``COMPLETE``.
    """
    import numpy as np
    from datasets.table import MemoryMappedTable

    if not (path / "COMPLETE").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        table = MemoryMappedTable.from_file(str(path / "rows.arrow"))
        with np.load(path / "splits.npz") as splits:
            train, evals = splits["train"], splits["eval"]
        texts = table.table.column("conversation")
        key = path.name
        return {"train": dataset_of(table, train, f"{key}-train"),
                "eval": dataset_of(table, evals, f"{key}-eval") if len(evals) else None,
                "stats": dict(meta["stats"], cache="hit"),
                "train_conversations": StoredConversations(texts, train),
                "eval_conversations": StoredConversations(texts, evals)}
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
        return None


def store_entry(path: Path, data: PreparedData, rows: Any = None, splits: tuple[Any, Any] | None = None) -> None:
    """Write ``data`` as the entry at ``path``, whole or not at all; a cache that cannot be written is reported.

    ``rows`` (a :class:`.spool.Spool`) holds every row and ``splits`` the train and eval positions in
    it: the file is copied as it is. Without them the rows are written from ``data``.
    """
    import numpy as np

    from sft.core.rundir import staged_dir
    from .spool import write_rows

    _remove_abandoned(path)
    try:
        with staged_dir(path) as tmp:
            if rows is None:
                table, train, evals = _rows_table(data)
                write_rows(tmp / "rows.arrow", table)
            else:
                assert splits is not None
                rows.copy_to(tmp / "rows.arrow")
                train, evals = splits
            np.savez(tmp / "splits.npz", train=np.asarray(train, dtype=np.int64), eval=np.asarray(evals, dtype=np.int64))
            (tmp / "meta.json").write_text(json.dumps({"stats": data.stats}))
            (tmp / "COMPLETE").write_text("")
    except OSError as exc:
        notice(f"data: not caching the tokenized dataset ({exc})")  # an optimisation; never fail a run for it


def _remove_abandoned(path: Path) -> None:
    """Delete the staging folders of ``path`` whose writer is gone (killed while it wrote: they would stay, as
    big as the entry, for ever); a live writer's folder is left alone."""
    import shutil

    for staging in path.parent.glob(f".{path.name}.*.partial"):
        pid = staging.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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
