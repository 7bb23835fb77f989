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

from sft.core.formats import conversation_from_json, conversation_to_json
from sft.core.interfaces import ChatTemplate, DatasetFormat, Message
from sft.core.notices import notice

__all__ = ["PreparedData", "PIPELINE_VERSION", "cache_key_parts", "cache_key", "cache_root", "load_entry", "store_entry",
           "tokenizer_fingerprint"]

#: Bump when the pipeline's output for the same inputs changes; part of every cache key.
PIPELINE_VERSION = "4"



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
            with the datasets (lists of :class:`Message`).
    """

    train: Any
    eval: Any
    stats: dict[str, Any]
    train_conversations: list[list[Message]]
    eval_conversations: list[list[Message]]


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


def _conv_to_json(conversations: Sequence[Sequence[Message]]) -> list[dict[str, Any]]:
    return [conversation_to_json(c) for c in conversations]


def _conv_from_json(data: Sequence[Any]) -> list[list[Message]]:
    return [conversation_from_json(c) for c in data]


def load_entry(path: Path) -> dict[str, Any] | None:
    """The cached :class:`PreparedData` fields at ``path``, or None when absent or damaged."""
    import datasets

    if not (path / "COMPLETE").is_file():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        train = datasets.load_from_disk(str(path / "train"))
        eval_ds = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
        return None
    return {"train": train, "eval": eval_ds, "stats": dict(meta["stats"], cache="hit"),
            "train_conversations": _conv_from_json(meta["train_conversations"]),
            "eval_conversations": _conv_from_json(meta["eval_conversations"])}


def store_entry(path: Path, data: PreparedData) -> None:
    """Write ``data`` as the entry at ``path``, whole or not at all; a cache that cannot be written is reported."""
    from datasets.utils import logging as ds_logging

    from sft.core.rundir import staged_dir

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # a "Saving the dataset" bar per run is noise
    try:
        with staged_dir(path) as tmp:
            data.train.save_to_disk(str(tmp / "train"))
            if data.eval is not None:
                data.eval.save_to_disk(str(tmp / "eval"))
            meta = {"stats": data.stats, "train_conversations": _conv_to_json(data.train_conversations),
                    "eval_conversations": _conv_to_json(data.eval_conversations)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            (tmp / "COMPLETE").write_text("")
    except OSError as exc:
        notice(f"data: not caching the tokenized dataset ({exc})")  # an optimisation; never fail a run for it
    finally:
        if bars:
            ds_logging.enable_progress_bar()


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
