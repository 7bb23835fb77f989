"""The data pipeline's stages: rows → conversations → token ids + trained-token masks.

What the trainer and the CLI call:

- :func:`build_datasets` returns :class:`PreparedData`: ``train``/``eval`` ``datasets.Dataset``
  objects with ``input_ids`` and ``assistant_masks`` columns, the counts, and the
  normalized conversations. The result is cached under a content-addressed key (:mod:`.cache`).
- :func:`validate_data` (``sft validate``) runs the whole pipeline with the tokenizer only.

Stages, all before any model loads:

1. **Source** (:func:`.sources.resolve_source`): ``sft:<name>`` (a file packaged in ``engine/assets``), a
   local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a folder of them, or a Hugging Face
   Hub dataset through ``datasets.load_dataset``. ``data.split`` may slice (``train[:100]``,
   ``train[10%:]``).
2. **Rows** keep where they came from (file, line, row) so every error can say so.
3. **Format**: ``data.format`` or, with ``auto``, the one format whose ``detect`` accepts the
   columns. Each row becomes a conversation, checked by
   :func:`sft.core.formats.validate_conversation` (rows of plain text turns take a shortcut with the
   same results: :mod:`.plain`). Bad rows follow ``data.on_bad_row``.
4. **Eval split**: ``data.eval_split`` or ``data.test_size`` rows drawn with ``training.seed``.
5. **Tokens**: the template renders segments; :func:`sft.core.templating.encode_rendered`
   tokenizes the full text and marks the tokens of trained segments. Rows longer than
   ``model.max_seq_length`` follow ``data.on_truncate`` when the cut splits a trained turn
   (dropped by default, counted); a row whose prompt alone is longer is left out and counted
   the same way; a long raw-text document is split into ``max_seq_length`` windows. Rows left
   with no trained token are bad rows (counted); if every row is, that is an error whatever
   the policy. A row far longer than ``model.max_seq_length`` is cut by characters before it is
   tokenized, where the outcome certainly stays the same (:mod:`.longrows`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sft.core.errors import ConfigError, ConfigProblem, DataError, SftError, did_you_mean
from sft.core.formats import validate_conversation
from sft.core.interfaces import ChatTemplate, DatasetFormat, Message, Segment
from sft.core.notices import notice
from sft.core.templating import end_of_turn, prepare_tokenizer, resolve_template
from sft.core.timelimit import TemplateTooSlow
from .cache import (PreparedData, StoredConversations, cache_key, cache_key_parts, cache_root, conversation_from_json,
                    dataset_of,
                    conversation_text, load_entry, store_entry)
from .longrows import LongRows
from .plain import Pieces, PlainTurns, plain_turns
from .preference import check_preference, encode_preferences
from .progress import Progress
from .readers import BadRow, RowRef
from .spool import Spool
from .workers import map_chunks, worker_count
from .sources import columns_of, fingerprint_split, names_local_files, read_split, resolve_source

if TYPE_CHECKING:
    from sft.core.plugins import PluginManager

__all__ = ["PreparedData", "resolve_format", "build_datasets", "describe_stats", "validate_data", "objective_row_kind"]

#: Rows rendered and tokenized per batch (bounds memory, keeps the fast tokenizer's batching).
ENCODE_BATCH = 500


#: What each row kind is, for errors that say what an objective needs and what a file has.
ROW_KIND_WORDS = {"conversation": "conversations", "pair": "preference pairs (prompt, chosen, rejected)",
                  "labelled": "completions labelled desirable or not (prompt, completion, label)"}


def _wrong_kind(cfg: Any, fmt: DatasetFormat, row_kind: str, key: str, source: str) -> DataError:
    objective = cfg.objective.name if "objective" in cfg else "this run"
    return DataError(f"objective '{objective}' trains on {ROW_KIND_WORDS[row_kind]}; {key} '{fmt.name}' reads "
                     f"{ROW_KIND_WORDS[fmt.row_kind]} (this data fits an objective of that kind; see docs/preference.md)",
                     source=source or None)


def resolve_format(cfg: Any, pm: "PluginManager | None", columns: Sequence[str], source: str = "",
                   name: str | None = None, key: str = "data.format",
                   row_kind: str = "conversation") -> tuple[DatasetFormat, Any]:
    """The dataset format (and its options) ``name`` (default ``cfg.data.format``); ``auto`` detects it from
    ``columns`` among the formats of ``row_kind`` (the rows the run's objective trains on)."""
    from sft.core.config import plugin_options
    from sft.core.plugins import get_plugin_manager

    pm = pm or get_plugin_manager()
    name = name or cfg.data.format
    if name != "auto":
        fmt = pm.get("dataset_format", name, key)
        if fmt.row_kind != row_kind:
            raise _wrong_kind(cfg, fmt, row_kind, key, source)
        return fmt, plugin_options(cfg, "dataset_format", name, pm)
    matches = []
    others = []
    for fname, fmt in sorted(pm.registry("dataset_format").items()):
        options = plugin_options(cfg, "dataset_format", fname, pm)
        if fmt.detect(columns, options):
            (matches if fmt.row_kind == row_kind else others).append((fmt, options))
    shown = ", ".join(columns[:12]) or "none"
    if not matches and others:
        raise _wrong_kind(cfg, others[0][0], row_kind, f"{key}=auto found", source)
    if matches and others and row_kind == "conversation":
        # Preference columns beside a conversation (LLaMA-Factory's KTO rows: messages + label) would train
        # the rejected answers as targets; the user says which reading is meant.
        (fmt, _), (other, _) = matches[0], others[0]
        fitting = sorted(n for n, o in pm.registry("objective").items() if o.row_kind == other.row_kind)
        objectives = ", ".join(fitting[:-1]) + " or " * (len(fitting) > 1) + fitting[-1] if fitting else "..."
        raise DataError(f"{key}=auto: the columns ({shown}) hold {ROW_KIND_WORDS[other.row_kind]}, read by "
                        f"'{other.name}', as well as conversations, read by '{fmt.name}'; train them with "
                        f"--objective {objectives} (docs/preference.md), or set {key}={fmt.name} to train the "
                        f"conversations as they are", source=source or None)
    if not matches:
        available = ", ".join(sorted(n for n, f in pm.registry("dataset_format").items() if f.row_kind == row_kind))
        kind = "" if row_kind == "conversation" else f" (formats of {ROW_KIND_WORDS[row_kind]})"
        raise DataError(f"{key}=auto: no dataset format recognises the columns ({shown}); set {key} to one of: "
                        f"{available}{kind}", source=source or None)
    if len(matches) > 1:
        names = ", ".join(f.name for f, _ in matches)
        raise DataError(f"{key}=auto is ambiguous: the columns ({shown}) match the formats {names}; "
                        f"set {key} to one of them", source=source or None)
    return matches[0]


# -- bad rows -----------------------------------------------------------------------------
class _BadRows:
    """Applies ``data.on_bad_row``: raise at once (``error``) or count and keep going (``skip``)."""

    def __init__(self, policy: str, max_fraction: float):
        self.policy = policy
        self.max_fraction = max_fraction
        self.errors: list[DataError] = []
        #: "column (format)" -> rows that carry it, a column no format reads
        self.unread: Counter[str] = Counter()
        self.reasons: dict[str, int] = {}
        self.warnings = 0

    #: Warnings printed one by one; the rest are counted (a dataset can warn on every row).
    SHOWN_WARNINGS = 5

    def warn(self, warning: DataError) -> None:
        """A row that is kept but looks wrong (e.g. it calls a tool its ``tools`` do not declare)."""
        self.warnings += 1
        if self.warnings <= self.SHOWN_WARNINGS:
            notice(f"data: warning: {warning}")

    def add(self, error: DataError) -> None:
        if self.policy == "error":
            raise DataError(error.message + " (set data.on_bad_row=skip to skip such rows)", source=error.source,
                            line=error.line, row=error.row, field=error.field)
        self.errors.append(error)
        # Numbers become N so that rows with the same problem share a reason; digits inside a name stay
        # (template 'qwen3', max_seq_length=16 -> N but not qwen3 -> qwenN, nor UTF-8 or latin-1 -> UTF-N).
        reason = re.sub(r"(?<![\w.])(?<![A-Za-z]-)\d+(?:\.\d+)?(?!\w)", "N",
                        f"{error.field}: {error.message}" if error.field else error.message)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def check(self, total: int) -> None:
        if self.warnings > self.SHOWN_WARNINGS:
            notice(f"data: {self.warnings - self.SHOWN_WARNINGS} more warning(s) like these")
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


class _ChunkBadRows(_BadRows):
    """A chunk's bad rows and warnings, kept in row order for the parent to replay (:mod:`.workers`).

    It never raises: under ``on_bad_row=error`` the parent's :class:`_BadRows` raises when the
    replay reaches the first bad row, after the warnings of the rows before it, as in one process.
    """

    def __init__(self) -> None:
        super().__init__("skip", 1.0)
        self.events: list[tuple[bool, DataError]] = []  # (is a bad row, what)

    def warn(self, warning: DataError) -> None:
        self.events.append((False, warning))

    def add(self, error: DataError) -> None:
        self.events.append((True, error))

    def in_row_order(self, refs: Sequence[RowRef]) -> None:
        """Order the events by the row they name: a chunk's format errors and its tokenizing errors come from
        two passes over it, and are reported as one pass over the file would (whatever the chunks)."""
        if len(self.events) > 1:
            position = {(r.source, r.row): i for i, r in enumerate(refs)}
            self.events.sort(key=lambda event: position.get((event[1].source, event[1].row), len(position)))

    def replay(self, into: _BadRows) -> None:
        """Hand this chunk's warnings, bad rows and unread columns to ``into``, in row order."""
        into.unread.update(self.unread)
        for is_bad, what in self.events:
            (into.add if is_bad else into.warn)(what)


@dataclass(frozen=True)
class RawText:
    """A row of a raw-text format: segments trained as they stand, no chat template."""

    segments: tuple[Segment, ...]


def _check_segments(segments: Any) -> RawText:
    if not isinstance(segments, (list, tuple)) or not all(isinstance(s, Segment) for s in segments):
        raise DataError(f"the format returned {type(segments).__name__}, not a list of Segment")
    if not "".join(s.text for s in segments).strip():
        raise DataError("empty text")
    return RawText(tuple(segments))


def _normalize(rows: Sequence[Any], refs: Sequence[RowRef], fmt: DatasetFormat, options: Any,
               bad: _BadRows) -> tuple[list[Any], list[RowRef]]:
    """Rows -> conversations (lists of :class:`Message`) or, from a raw-text format, :class:`RawText`."""
    conversations: list[Any] = []
    kept: list[RowRef] = []
    for row, ref in zip(rows, refs):
        if isinstance(row, BadRow):
            bad.add(row.error.located(row=ref.row))
            continue
        try:
            if not isinstance(row, Mapping):
                raise DataError(f"expected an object, got {type(row).__name__}")
            # Nothing a row carries is dropped silently: what the format does not read is counted.
            bad.unread.update(f"{k} ({fmt.name})" for k in fmt.unread(row, options))
            if fmt.row_kind != "conversation":
                conversation = fmt.to_preference(row, options)
                for warning in check_preference(conversation):
                    bad.warn(DataError(warning, source=ref.source, line=ref.line, row=ref.row))
                conversations.append(conversation)
                kept.append(ref)
                continue
            segments = fmt.to_segments(row, options)
            if segments is not None:
                conversation: Any = _check_segments(segments)
            elif (conversation := plain_turns(fmt, row, options)) is None:  # plain text turns skip the objects below
                conversation = fmt.to_conversation(row, options)
                for warning in validate_conversation(conversation):
                    bad.warn(DataError(warning, source=ref.source, line=ref.line, row=ref.row))
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
    """Tokenized rows as Arrow arrays, one per batch (a Python int list costs ~36 bytes a token), and their counts."""

    input_ids: list[Any] = field(default_factory=list)  # pyarrow list<int32> arrays
    masks: list[Any] = field(default_factory=list)  # pyarrow list<int8> arrays
    conversations: list[Any] = field(default_factory=list)  # pyarrow string arrays of _pack's JSON
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_tokens: int = 0
    truncated: int = 0
    #: rows left out (``on_truncate=drop``) or ended with an added end-of-turn (``keep_eot``)
    cut_dropped: int = 0
    cut_eot: int = 0
    fully_masked: int = 0
    #: of ``cut_dropped``: rows whose prompt alone is longer than model.max_seq_length
    long_prompts: int = 0
    #: long raw-text documents split into model.max_seq_length windows
    chunked: int = 0
    #: rows far longer than model.max_seq_length, cut by characters before tokenizing (:mod:`.longrows`)
    precut: int = 0
    #: for each conversation given to :func:`_encode`, the rows it became (0: left out, >1: a text's windows)
    produced: list[int] = field(default_factory=list)
    #: each row's tokens and trained tokens (the counts of a split, without reading its rows back)
    lengths: Any = field(default_factory=lambda: array("i"))
    trained: Any = field(default_factory=lambda: array("i"))

    def add_batch(self, ids: list[list[int]], masks: list[list[int]], conversations: list[str]) -> None:
        if not ids:
            return
        from itertools import chain

        import numpy as np
        import pyarrow as pa

        # Each column as one flat buffer plus the rows' offsets, as Arrow holds it: half the time of pa.array on
        # a list per row, and the trained counts come from the same buffer.
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int32)))
        total = int(offsets[-1])
        flat_masks = np.fromiter(chain.from_iterable(masks), dtype=np.int8, count=total)
        self.input_ids.append(pa.ListArray.from_arrays(
            offsets, np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)))
        self.masks.append(pa.ListArray.from_arrays(offsets, flat_masks))
        self.conversations.append(pa.array(conversations, type=pa.large_string()))
        passed = np.concatenate(([0], np.cumsum(flat_masks, dtype=np.int64)))
        trained = (passed[offsets[1:]] - passed[offsets[:-1]]).astype(np.int32)
        self.lengths.frombytes(lengths.tobytes())
        self.trained.frombytes(trained.tobytes())
        self.rows += len(ids)
        self.tokens += total
        self.trained_tokens += int(trained.sum())
        self.max_tokens = max(self.max_tokens, int(lengths.max()))

    def extend(self, other: "_Encoded") -> None:
        """Append ``other``'s rows after these, adding up the counts."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "max_tokens":
                setattr(self, f.name, max(mine, theirs))
            else:
                setattr(self, f.name, mine + theirs)


def _windows(ids: list[int], size: int) -> list[list[int]]:
    """``ids`` in consecutive windows of ``size`` tokens; a last window of one token (nothing to predict) is left out."""
    return [ids[k:k + size] for k in range(0, len(ids), size) if len(ids) - k > 1]


def _encode(texts: Sequence[str], refs: Sequence[RowRef], template: ChatTemplate, tokenizer: Any, cfg: Any,
            bad: _BadRows, conversations: Sequence[Any] | None = None) -> _Encoded:
    """One batch of conversations (as :func:`_pack` wrote them; ``conversations``, when given, are the
    same ones unpacked) rendered, tokenized, masked and cut to ``model.max_seq_length``."""
    out = _Encoded(produced=[0] * len(texts))
    kept: list[int] = []  # for each row out, its conversation's position in the batch (-1: raw text)
    max_len = int(cfg.model.max_seq_length)
    policy = str(cfg.data.on_truncate)
    eot_ids: list[int] = []
    if policy == "keep_eot":
        eot_ids = tokenizer(end_of_turn(template, tokenizer), add_special_tokens=False)["input_ids"]
    long_rows = LongRows(tokenizer, max_len, str(cfg.data.train_on))
    batch: list[tuple[Any, RowRef, int]] = []
    rendered = []
    ids_out: list[list[int]] = []
    masks_out: list[list[int]] = []
    for position, (text, ref) in enumerate(zip(texts, refs)):
        conversation = _unpack(text) if conversations is None else conversations[position]
        if isinstance(conversation, RawText):
            # Raw text ends with end-of-sequence, trained, so generation learns where a text stops.
            rendered.append([*conversation.segments, Segment(tokenizer.eos_token or "", True)])
            batch.append((conversation, ref, position))
            continue
        try:
            pieces = template.render_plain(conversation, tokenizer) if isinstance(conversation, PlainTurns) else None
            if pieces is not None:
                rendered.append(Pieces(pieces))
            else:  # the template renders plain turns as any conversation, from the Messages the format would give
                messages = [Message(*turn) for turn in conversation] if isinstance(conversation, PlainTurns) else conversation
                rendered.append(template.render(messages, tokenizer))
        except TemplateTooSlow:
            raise  # the template's fault: every row would wait as long
        except Exception as exc:  # noqa: BLE001 - a row the template cannot render is a bad row, never trained empty
            detail = str(exc) if isinstance(exc, SftError) else f"{type(exc).__name__}: {exc}"
            bad.add(DataError(f"template '{template.name}' cannot render this row: {detail}",
                              source=ref.source, line=ref.line, row=ref.row))
            continue
        batch.append((conversation, ref, position))
    # Far too long rows are cut by characters first; a raw-text document is kept whole (its windows).
    encoded = long_rows.encode(rendered, [isinstance(c, RawText) for c, _, _ in batch])
    for (conversation, ref, position), (ids, mask) in zip(batch, encoded):
        truncated = len(ids) > max_len
        if truncated and isinstance(conversation, RawText) and all(mask):
            # A long document (continued pre-training) is read in max_seq_length windows, none lost.
            windows = _windows(ids, max_len)
            out.chunked += 1
            ids_out += windows
            masks_out += [[1] * len(w) for w in windows]
            kept += [-1] * len(windows)
            out.produced[position] = len(windows)
            continue
        if truncated and not any(mask[:max_len]):
            # The prompt alone fills model.max_seq_length: left out and counted, as a cut answer is.
            out.truncated += 1
            out.cut_dropped += 1
            out.long_prompts += 1
            continue
        if truncated:
            out.truncated += 1
            # The cut splits a trained turn when the tokens on both sides of it are trained.
            splits_turn = bool(mask[max_len - 1] and mask[max_len])
            if splits_turn and policy == "drop":
                out.cut_dropped += 1
                continue
            if splits_turn and policy == "keep_eot":
                keep = max_len - len(eot_ids)
                ids, mask = ids[:keep] + eot_ids, mask[:keep] + [1] * len(eot_ids)
                out.cut_eot += 1
            else:
                ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            out.fully_masked += 1
            why = (f"no trained token left after truncation to model.max_seq_length={max_len}"
                   if truncated else "no trained token (all labels masked)")
            bad.add(DataError(why, source=ref.source, line=ref.line, row=ref.row))
            continue
        ids_out.append(ids)
        masks_out.append(mask)
        out.produced[position] = 1
        # A raw-text row has no conversation; the quick generation and chat skip it.
        kept.append(-1 if isinstance(conversation, RawText) else position)
    out.add_batch(ids_out, masks_out, [NO_CONVERSATION if i < 0 else texts[i] for i in kept])
    out.precut = long_rows.cut
    return out


def _table(encoded: _Encoded) -> Any:
    """``encoded``'s rows as one table (the spool's columns), in memory; None when there are none."""
    import pyarrow as pa

    if not encoded.rows:
        return None
    return pa.table({"input_ids": pa.chunked_array(encoded.input_ids, type=pa.list_(pa.int32())),
                     "assistant_masks": pa.chunked_array(encoded.masks, type=pa.list_(pa.int8())),
                     "conversation": pa.chunked_array(encoded.conversations, type=pa.large_string())})


# -- the per-row stages in chunks, in this process or in workers (data.num_proc) ------------
def _chunk_size(n: int, processes: int) -> int:
    return max(1, min(ENCODE_BATCH, -(-n // max(1, processes))))


def _each_chunk(fn: Any, n: int, processes: int, state: dict[str, Any], bad: _BadRows, what: str) -> Any:
    """``fn``'s results over ``[0, n)`` in chunks, in row order (:func:`.workers.map_chunks`): each chunk's
    bad rows and warnings replayed into ``bad``, progress reported as ``what``."""
    progress = Progress(what)
    size = _chunk_size(n, processes)
    for end, (result, chunk_bad) in zip(range(size, n + size, size), map_chunks(fn, n, size, processes, state)):
        chunk_bad.replay(bad)
        progress.update(min(end, n) / n, min(end, n))
        yield result


def _normalize_chunk(lo: int, hi: int, state: dict[str, Any]) -> tuple[tuple[list[Any], list[RowRef]], _ChunkBadRows]:
    bad = _ChunkBadRows()
    return _normalize(state["rows"][lo:hi], state["refs"][lo:hi], state["fmt"], state["options"], bad), bad


def _normalize_rows(rows: Sequence[Any], refs: Sequence[RowRef], fmt: DatasetFormat, options: Any, bad: _BadRows,
                    processes: int) -> tuple[list[Any], list[RowRef]]:
    """:func:`_normalize` over every row, in chunks; the same result whatever ``processes`` (preference rows)."""
    conversations: list[Any] = []
    kept: list[RowRef] = []
    state = {"rows": rows, "refs": refs, "fmt": fmt, "options": options}
    for convs, chunk_refs in _each_chunk(_normalize_chunk, len(rows), processes, state, bad, "checking rows"):
        conversations += convs
        kept += chunk_refs
    return conversations, kept


def _pack(conversation: Any) -> str:
    """A conversation or raw text as compact JSON text (what the cache stores), :func:`_unpack` reverses it."""
    if isinstance(conversation, RawText):
        return json.dumps({"raw": [[s.text, s.trained, s.reasoning] for s in conversation.segments]}, ensure_ascii=False)
    return conversation.text() if isinstance(conversation, PlainTurns) else conversation_text(conversation)


def _unpack(text: str) -> Any:
    data = json.loads(text)
    if "raw" in data:
        return RawText(tuple(Segment(t, trained, reasoning) for t, trained, reasoning in data["raw"]))
    return conversation_from_json(data)


#: What a row with no conversation (raw text) stores in place of one.
NO_CONVERSATION = conversation_text([])


def _prepare(rows: Sequence[Any], refs: Sequence[RowRef], fmt: DatasetFormat, options: Any, template: ChatTemplate,
             tokenizer: Any, cfg: Any) -> tuple[_Encoded, _ChunkBadRows]:
    """Rows checked into conversations and, in the same pass, rendered, masked and tokenized (no conversation
    waits in memory as objects); their bad rows and warnings in row order, to be replayed."""
    bad = _ChunkBadRows()
    conversations, kept = _normalize(rows, refs, fmt, options, bad)
    encoded = _encode([_pack(c) for c in conversations], kept, template, tokenizer, cfg, bad, conversations)
    bad.in_row_order(refs)
    return encoded, bad


def _prepare_chunk(lo: int, hi: int, state: dict[str, Any]) -> tuple[_Encoded, _ChunkBadRows]:
    """:func:`_prepare` over rows ``[lo, hi)``: one trip to a worker."""
    return _prepare(state["rows"][lo:hi], state["refs"][lo:hi], state["fmt"], state["options"], state["template"],
                    state["tokenizer"], state["cfg"])


def _prepare_rows(rows: Sequence[Any], refs: Sequence[RowRef], fmt: DatasetFormat, options: Any, state: dict[str, Any],
                  bad: _BadRows, spool: Spool, totals: _Encoded) -> list[int]:
    """Every row through :func:`_prepare_chunk`, in chunks (in workers, ``state["processes"]``); the tokenized
    rows go to ``spool`` in row order, the counts into ``totals``. Returns, for each kept row, how many
    tokenized rows it became: the same whatever the number of workers."""
    state = dict(state, rows=rows, refs=refs, fmt=fmt, options=options)
    produced: list[int] = []
    for encoded in _each_chunk(_prepare_chunk, len(rows), state["processes"], state, bad, "preparing rows"):
        for ids, masks, convs in zip(encoded.input_ids, encoded.masks, encoded.conversations):
            spool.write({"input_ids": ids, "assistant_masks": masks, "conversation": convs})
        encoded.input_ids, encoded.masks, encoded.conversations = [], [], []
        produced += encoded.produced
        totals.extend(encoded)
    return produced


def _positions(produced: Sequence[int], units: Sequence[int]) -> Any:
    """The positions, among the tokenized rows, of the rows of ``units`` (kept rows, in that order, repeats
    included), where kept row ``u`` became ``produced[u]`` rows, one kept row after the other."""
    import numpy as np

    counts = np.asarray(produced, dtype=np.int64)
    picked = np.asarray(units, dtype=np.int64)
    sizes = counts[picked]
    first = (np.cumsum(counts) - counts)[picked]
    # Row k of the result is row first[u] + j, for the j-th row of its unit u.
    return np.repeat(first - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))


def _hold_out(n: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions ``(train, eval)`` of ``n`` rows: ``test_size`` of them drawn with ``seed`` for eval.

    Both keep the source order; the same seed always holds out the same rows.
    """
    n_eval = _eval_count(test_size, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def _eval_count(test_size: float, n: int) -> int:
    if test_size <= 0:
        return 0
    count = int(test_size) if test_size >= 1 else max(1, round(test_size * n))
    if count >= n:
        raise ConfigError([ConfigProblem("data.test_size", f"{test_size} leaves no training rows out of {n}")])
    return count


@dataclass
class _Source:
    """One dataset of the run: ``data.dataset`` alone, or one entry of ``data.datasets``."""

    key: str  # the config key it came from, for errors
    spec: str
    format: str
    split: str
    weight: float = 1.0


def _notice_absent_columns(fmt: DatasetFormat, options: Any, rows: Sequence[Any], described: str) -> None:
    """A format option set to a column no row has reads nothing (``data.alpaca.system=sys_prompt``): say so."""
    if options is None or not dataclasses.is_dataclass(options):
        return
    columns, read = set(columns_of(rows)), set(fmt.read_columns(options) or ())  # None: the format does not say
    defaults = type(options)()
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, str) and value != getattr(defaults, f.name) and value in read and value not in columns:
            notice(f"data.{fmt.name}.{f.name}={value}: {described} has no column '{value}'"
                   f"{did_you_mean(value, columns)}, so that option reads nothing")


def _no_rows(source: Any, src: "_Source") -> str:
    if "[" in src.split:  # the slice took every row away, not the file
        return f"{src.key}.split={src.split} selects no rows"
    one_file = source.kind == "local" and source.path is not None and source.path.is_file()
    return "the file is empty: it has no rows" if one_file else "the dataset has no rows"


def _sources(cfg: Any) -> list[_Source]:
    if len(cfg.data.datasets):
        return [_Source(f"data.datasets[{i}]", str(d.path), str(d.format), str(d.split), float(d.weight))
                for i, d in enumerate(cfg.data.datasets)]
    return [_Source("data", str(cfg.data.dataset), str(cfg.data.format), str(cfg.data.split))]


def _weighted(n: int, weight: float, seed: int) -> list[int]:
    """Positions of ``weight`` × ``n`` rows: whole copies, then a random subset (drawn with ``seed``) in source order."""
    if weight == 1.0 or not n:
        return list(range(n))
    count = max(1, round(weight * n))
    whole, rest = divmod(count, n)
    return list(range(n)) * whole + sorted(random.Random(seed).sample(range(n), rest))


def build_datasets(cfg: Any, pm: "PluginManager | None", tokenizer: Any, *, template: ChatTemplate | None = None,
                   use_cache: bool = True, quiet: bool = False, row_kind: str | None = None) -> PreparedData:
    """Load, normalize, mix, split, render and tokenize the configured data.

    Args:
        cfg: the run config (``data``, ``template``, ``model.max_seq_length``, ``training.seed``).
        pm: the plugin manager (None: the process-wide one).
        tokenizer: a fast Hugging Face tokenizer. It is passed through
            :func:`prepare_tokenizer` (idempotent), so it may be modified.
        template: the run's configured chat template, when the caller already resolved it
            (``sft run`` does, once); else resolved here from ``cfg``.
        use_cache: read and write the content-addressed cache (``data.cache_dir``).
        quiet: do not print the skipped-rows notice.
        row_kind: the rows to prepare (:data:`sft.core.interfaces.ROW_KINDS`); None: those the
            configured objective trains on. ``pair`` and ``labelled`` rows become the token
            columns of :mod:`.preference`.

    Raises:
        DataError: a bad row under ``on_bad_row=error`` (naming file:line, row and field),
            too many bad rows, every row fully masked, or an unreadable source.
        ConfigError: a bad split, test_size or format name.
    """
    if template is None:
        template = resolve_template(cfg, pm, tokenizer)
    else:
        prepare_tokenizer(tokenizer, template, cfg)
    from ..tokens import add_configured_tokens

    add_configured_tokens(tokenizer, cfg)  # model.add_tokens: rows are tokenized as training will see them
    if row_kind is None:
        row_kind = objective_row_kind(cfg, pm)
    seed = int(cfg.training.seed)
    sources = _sources(cfg)
    opened = []  # (source spec, resolved Source, fingerprint, handle, rows, refs, format, options)
    fps: list[str] = []
    for src in sources:
        source = resolve_source(src.spec)
        split_key = f"{src.key}.split"
        fp, handle = fingerprint_split(source, src.split, split_key)
        # Rows are read only on a cache miss, except that auto-detection needs a local source's columns.
        rows: list[Any] | None = None
        refs: list[RowRef] | None = None
        columns: list[str] | None = list(handle.column_names) if source.kind == "hub" else None
        if src.format == "auto" and columns is None:
            rows, refs = read_split(source, src.split, split_key, handle)
            if not rows:  # before detection, which would find no format for the columns "(none)"
                raise DataError(_no_rows(source, src), source=source.describe())
            columns = columns_of(rows)
        fmt, fmt_options = resolve_format(cfg, pm, columns or [], source.describe(), src.format, f"{src.key}.format",
                                          row_kind=row_kind)
        opened.append([src, source, fp, handle, rows, refs, fmt, fmt_options])
        fps.append(fp)

    eval_handle = eval_source = None
    eval_spec = ""
    first = opened[0][1]
    if cfg.data.eval_split:
        eval_source = first
        eval_spec = str(cfg.data.eval_split)
        if first.kind == "local" and names_local_files(eval_spec):
            eval_source, eval_spec = resolve_source(eval_spec), "train"
        efp, eval_handle = fingerprint_split(eval_source, eval_spec, "data.eval_split")
        fps[0] += "|eval:" + efp

    fmt0, options0 = opened[0][6], opened[0][7]
    parts = cache_key_parts(cfg, fmt0, options0, template, tokenizer, fps[0])
    if len(opened) > 1:
        # Every source's content, split, weight and format take part in the key.
        parts["sources"] = [[o[0].spec, o[0].split, o[0].weight, o[2],
                             cache_key_parts(cfg, o[6], o[7], template, tokenizer, o[2])["format"]] for o in opened]
    parts["rows"] = row_kind
    key = cache_key(parts)
    described = " + ".join(o[1].describe() for o in opened)
    root = cache_root(cfg) if use_cache else None
    if root is not None:
        entry = load_entry(root / key)
        if entry is not None:
            cached = PreparedData(**entry)
            cached.stats["source"] = described
            _report_skipped(cached.stats, quiet)
            return cached

    bad = _BadRows(cfg.data.on_bad_row, float(cfg.data.max_bad_fraction))
    processes = worker_count(int(cfg.data.num_proc))
    if row_kind != "conversation":
        return _prepared_preferences(cfg, template, tokenizer, bad, processes, opened, (eval_source, eval_spec, eval_handle),
                                     described, root, key, quiet)
    # Every source's rows are checked and tokenized in one pass, into one spool, in source order; the mixing
    # weights and the eval split then pick among the kept rows ("units") by position, as they would among
    # the conversations.
    state = {"template": template, "tokenizer": tokenizer, "cfg": cfg, "processes": processes}
    spool = Spool()
    counts = _Encoded()  # each source row counted once, whatever its weight
    produced: list[int] = []  # per unit, in source order: the tokenized rows it became
    units: list[int] = []  # the units to train on, weights applied
    total = 0
    per_source: list[dict[str, Any]] = []
    for opened_source in opened:
        src, source, _fp, handle, rows, refs, fmt, fmt_options = opened_source
        opened_source[4] = opened_source[5] = None  # the rows are not needed once prepared
        if rows is None:
            rows, refs = read_split(source, src.split, f"{src.key}.split", handle)
        if not rows:
            raise DataError(_no_rows(source, src), source=source.describe())
        _notice_absent_columns(fmt, fmt_options, rows, source.describe())
        skipped_before, first = len(bad.errors), len(produced)
        produced += _prepare_rows(rows, refs, fmt, fmt_options, state, bad, spool, counts)
        picked = _weighted(len(produced) - first, src.weight, seed)
        units += [first + i for i in picked]
        per_source.append({"source": source.describe(), "format": fmt.name, "split": src.split, "rows": len(rows),
                           "skipped": len(bad.errors) - skipped_before, "weight": src.weight, "used": len(picked)})
        total += len(rows)
        del rows, refs  # the file's bytes are not needed once its rows are prepared

    if eval_handle is not None:
        assert eval_source is not None
        erows, erefs = read_split(eval_source, eval_spec, "data.eval_split", eval_handle)
        first = len(produced)
        produced += _prepare_rows(erows, erefs, fmt0, options0, state, bad, spool, counts)
        total += len(erows)
        del erows, erefs
        train_units, eval_units = units, list(range(first, len(produced)))
    else:
        train_at, eval_at = _hold_out(len(units), float(cfg.data.test_size), seed)
        train_units, eval_units = [units[i] for i in train_at], [units[i] for i in eval_at]

    table = spool.read()
    train_at, eval_at = _positions(produced, train_units), _positions(produced, eval_units)
    if not len(train_at):
        first_bad = f"; the first: {bad.errors[0]}" if bad.errors else ""
        dropped = (f"; {counts.cut_dropped} row(s) longer than model.max_seq_length={cfg.model.max_seq_length} "
                   f"were dropped (data.on_truncate=drop)" if counts.cut_dropped else "")
        raise DataError("no training row has a trained token: every row is fully masked, bad or too long "
                        f"(check template '{template.name}', data.train_on and model.max_seq_length){dropped}{first_bad}",
                        source=described)
    bad.check(total)

    import numpy as np

    lengths = np.frombuffer(counts.lengths, dtype=np.int32)
    trained = np.frombuffer(counts.trained, dtype=np.int32)
    stats: dict[str, Any] = {
        "rows": total,
        "skipped": bad.stats(),
        "truncated": counts.truncated,
        "truncated_dropped": counts.cut_dropped,
        "truncated_eot_added": counts.cut_eot,
        "long_prompts": counts.long_prompts,
        "chunked": counts.chunked,
        "precut": counts.precut,
        "fully_masked": counts.fully_masked,
        "unread_columns": dict(bad.unread.most_common()),
        "train_rows": len(train_at),
        "eval_rows": len(eval_at),
        "train_tokens": int(lengths[train_at].sum()),
        "trained_tokens": int(trained[train_at].sum()),
        "eval_tokens": int(lengths[eval_at].sum()),
        "max_tokens": int(lengths[np.concatenate([train_at, eval_at])].max()),
        "format": "+".join(dict.fromkeys(o[6].name for o in opened)),
        "template": template.name,
        "source": described,
        "cache": "miss" if root is not None else "off",
        "cache_key": key,
    }
    if len(opened) > 1:
        stats["sources"] = per_source
        stats["mix_seed"] = seed
    texts = table.column("conversation")
    prepared = PreparedData(dataset_of(table, train_at, f"{key}-train"),
                            dataset_of(table, eval_at, f"{key}-eval") if len(eval_at) else None, stats,
                            StoredConversations(texts, train_at), StoredConversations(texts, eval_at))
    _report_skipped(stats, quiet)
    if root is not None:
        store_entry(root / key, prepared, spool, (train_at, eval_at))
    return prepared


def _conversations_of(table: Any) -> StoredConversations:
    """The conversations of a table of prepared rows (none for None)."""
    import pyarrow as pa

    if table is None:
        return StoredConversations(pa.chunked_array([], type=pa.large_string()))
    return StoredConversations(table.column("conversation"))


def objective_row_kind(cfg: Any, pm: "PluginManager | None") -> str:
    """The rows the configured objective (``objective.name``) trains on."""
    from sft.core.plugins import get_plugin_manager

    if "objective" not in cfg:
        return "conversation"
    return (pm or get_plugin_manager()).get("objective", cfg.objective.name, "objective.name").row_kind


def _prepared_preferences(cfg: Any, template: ChatTemplate, tokenizer: Any, bad: _BadRows, processes: int,
                          opened: list, eval_from: tuple, described: str, root: Any, key: str,
                          quiet: bool) -> PreparedData:
    """Preference rows (pairs or labelled completions) checked, mixed, split and tokenized by :mod:`.preference`,
    with their counts."""
    from .preference import to_dataset

    seed = int(cfg.training.seed)
    conversations: list[Any] = []
    kept: list[RowRef] = []
    total = 0
    per_source: list[dict[str, Any]] = []
    for src, source, _fp, handle, rows, refs, fmt, fmt_options in opened:
        if rows is None:
            rows, refs = read_split(source, src.split, f"{src.key}.split", handle)
        if not rows:
            raise DataError(_no_rows(source, src), source=source.describe())
        _notice_absent_columns(fmt, fmt_options, rows, source.describe())
        skipped_before = len(bad.errors)
        convs, kept_refs = _normalize_rows(rows, refs, fmt, fmt_options, bad, processes)
        picked = _weighted(len(convs), src.weight, seed)
        per_source.append({"source": source.describe(), "format": fmt.name, "split": src.split, "rows": len(rows),
                           "skipped": len(bad.errors) - skipped_before, "weight": src.weight, "used": len(picked)})
        total += len(rows)
        conversations += [convs[i] for i in picked]
        kept += [kept_refs[i] for i in picked]
    eval_source, eval_spec, eval_handle = eval_from
    if eval_handle is not None:
        erows, erefs = read_split(eval_source, eval_spec, "data.eval_split", eval_handle)
        evals = _normalize_rows(erows, erefs, opened[0][6], opened[0][7], bad, processes)
        total += len(erows)
        train = (conversations, kept)
    else:
        train_at, eval_at = _hold_out(len(conversations), float(cfg.data.test_size), seed)
        train = ([conversations[i] for i in train_at], [kept[i] for i in train_at])
        evals = ([conversations[i] for i in eval_at], [kept[i] for i in eval_at])
    train_enc = encode_preferences(*train, template, tokenizer, cfg, bad)
    eval_enc = encode_preferences(*evals, template, tokenizer, cfg, bad)
    if not len(train_enc):
        first = f"; the first: {bad.errors[0]}" if bad.errors else ""
        raise DataError(f"no preference row is left to train on: every row is bad or longer than "
                        f"model.max_seq_length={cfg.model.max_seq_length}{first}", source=described)
    bad.check(total)
    stats: dict[str, Any] = {
        "rows": total,
        "kind": "pair" if "chosen_ids" in train_enc.columns else "labelled",
        "skipped": bad.stats(),
        "truncated": train_enc.truncated + eval_enc.truncated,
        "truncated_dropped": train_enc.cut_dropped + eval_enc.cut_dropped,
        "truncated_eot_added": 0,
        "precut": train_enc.precut + eval_enc.precut,
        "fully_masked": 0,
        "train_rows": len(train_enc),
        "eval_rows": len(eval_enc),
        "train_tokens": train_enc.tokens,
        "trained_tokens": train_enc.scored_tokens,
        "eval_tokens": eval_enc.tokens,
        "max_tokens": max(train_enc.max_tokens, eval_enc.max_tokens),
        "template": template.name,
        "source": described,
        "cache": "miss" if root is not None else "off",
        "cache_key": key,
        "unread_columns": dict(bad.unread.most_common()),
    }
    if "label" in train_enc.columns:
        labels = train_enc.columns["label"]
        stats["labels"] = {"desirable": sum(labels), "undesirable": len(labels) - sum(labels)}
    stats["format"] = "+".join(dict.fromkeys(o[6].name for o in opened))
    if len(opened) > 1:
        stats.update(sources=per_source, mix_seed=seed)
    prepared = PreparedData(to_dataset(train_enc), to_dataset(eval_enc) if len(eval_enc) else None, stats,
                            train_enc.conversations, eval_enc.conversations)
    _report_skipped(stats, quiet)
    if root is not None:
        store_entry(root / key, prepared)
    return prepared


def _report_skipped(stats: Mapping[str, Any], quiet: bool) -> None:
    long_prompts = stats.get("long_prompts", 0)
    cut_answers = stats.get("truncated_dropped", 0) - long_prompts
    if not quiet and cut_answers and stats.get("kind") in ("pair", "labelled"):
        notice(f"data: left out {cut_answers} preference row(s) longer than model.max_seq_length (data.on_truncate="
               f"drop; truncate keeps them, each completion cut at its end as TRL's collator does)")
    elif not quiet and cut_answers:
        notice(f"data: left out {cut_answers} row(s) whose answer model.max_seq_length would cut "
               f"(data.on_truncate=drop; keep_eot keeps them, cut, with their end-of-turn token)")
    if not quiet and long_prompts:
        notice(f"data: left out {long_prompts} row(s) whose prompt alone is longer than model.max_seq_length "
               f"(nothing of their answers would be seen); raise model.max_seq_length to train them")
    if not quiet and stats.get("unread_columns"):
        shown = ", ".join(f"'{c}' in {n} row(s)" for c, n in stats["unread_columns"].items())
        notice(f"data: column(s) the format does not read, not trained: {shown} (map a column with the format's "
               f"data.<format>.* options, or drop it from the file)")
    if not quiet and stats.get("chunked"):
        notice(f"data: split {stats['chunked']} text row(s) longer than model.max_seq_length into windows of "
               f"that length")
    skipped = stats["skipped"]
    if quiet or not skipped["count"]:
        return
    reasons = "; ".join(f"{n} × {r}" for r, n in list(skipped["reasons"].items())[:5])
    notice(f"data: skipped {skipped['count']} of {stats['rows']} rows (data.on_bad_row=skip): {reasons}")
    for example in skipped["examples"][:3]:
        notice(f"  e.g. {example}")


def describe_sources(stats: Mapping[str, Any]) -> list[str]:
    """One line per source of a mixed run: its rows, format, skipped rows, weight and rows used."""
    return [f"  {s['source']} ({s['format']}, {s['split']}): {s['rows']} rows, skipped {s['skipped']}, "
            f"weight {s['weight']:g} → {s['used']} used" for s in stats.get("sources", ())]


def describe_stats(stats: Mapping[str, Any]) -> str:
    """One line: ``500 rows (sharegpt, template chatml) → 450 train / 50 eval; ...``; a mixed run adds a line per source."""
    sources = describe_sources(stats)
    if sources:
        head = f"{len(sources)} datasets mixed with seed {stats['mix_seed']} (training.seed):"
        return "\n".join([head, *sources, _describe_totals(stats)])
    return _describe_totals(stats)


def _describe_totals(stats: Mapping[str, Any]) -> str:
    if stats.get("kind") in ("pair", "labelled"):
        what = "pairs" if stats["kind"] == "pair" else "labelled completions"
        labels = stats.get("labels")
        split = f" ({labels['desirable']} desirable, {labels['undesirable']} not)" if labels else ""
        return (f"{stats['rows']} rows ({stats['format']}, template {stats['template']}) → {stats['train_rows']} train "
                f"{what}{split} / {stats['eval_rows']} eval; skipped {stats['skipped']['count']}, too long "
                f"{stats['truncated']}{_cut_detail(stats)}; {stats['train_tokens']:,} train tokens, "
                f"{stats['trained_tokens']:,} scored")
    return (f"{stats['rows']} rows ({stats['format']}, template {stats['template']}) → {stats['train_rows']} train / "
            f"{stats['eval_rows']} eval; skipped {stats['skipped']['count']}, truncated {stats['truncated']}"
            f"{_cut_detail(stats)}, "
            f"fully masked {stats['fully_masked']}; {stats['train_tokens']:,} train tokens, "
            f"{stats['trained_tokens']:,} trained")


def _cut_detail(stats: Mapping[str, Any]) -> str:
    parts = [f"{stats[k]} {what}" for k, what in (("truncated_dropped", "dropped"), ("truncated_eot_added", "ended with EOT"),
                                                  ("chunked", "text rows split into windows"),
                                                  ("precut", "cut by characters before tokenizing"))
             if stats.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


def validate_data(cfg: Any, template: ChatTemplate | None = None) -> str:
    """``sft validate``: run the whole data pipeline with the tokenizer only (never model weights).

    Returns a one-line report; raises :class:`DataError` / :class:`ConfigError`.
    """
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepared = build_datasets(cfg, None, tokenizer, template=template)
    return "data OK: " + describe_stats(prepared.stats)
