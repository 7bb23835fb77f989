"""``data.streaming: true``: the training split read lazily and tokenized ahead of the trainer.

For data that does not fit on disk twice (the files, and their tokenized copy in the cache),
the rows are read as training goes, a chunk of :data:`CHUNK_ROWS` at a time: JSON lines
(plain, ``.gz``, ``.zst``) block by block with their line numbers, Parquet by record batch,
Arrow by record batch, a hub dataset through ``datasets``' own streaming. Each chunk passes the
same stages the cached pipeline runs (:func:`.pipeline._prepare`), so its token ids, trained-token
masks, counts and bad-row messages are those of :func:`.pipeline.build_datasets`. A background thread prepares the next
:data:`READ_AHEAD` chunks while the trainer works on the current one.

What a stream cannot do is said before any model loads (:func:`check_streaming`,
:func:`streaming_notes`): no global shuffle (a shuffle buffer instead), no length (so
``training.max_steps``), no eval split by fraction (a row count or ``data.eval_split``), no
mixing of ``data.datasets``, no data cache, SFT rows only. docs/datasets.md has the user's view.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.core.errors import ConfigError, ConfigProblem, DataError
from sft.core.notices import notice
from sft.core.templating import prepare_tokenizer, resolve_template
from .cache import PreparedData, dataset_of
from .pipeline import (ROW_KIND_WORDS, _BadRows, _ChunkBadRows, _conversations_of, _Encoded, _prepare, _sources,
                       _table, describe_stats, objective_row_kind, resolve_format)
from .readers import JsonLines, RowChain, RowRef, RowRefs, extension_of, open_decompressed, read_file, scan_lines
from .sources import Source, _local_files, columns_of, names_local_files, parse_split, resolve_source

if TYPE_CHECKING:
    from sft.core.interfaces import ChatTemplate
    from sft.core.plugins import PluginManager

__all__ = ["CHUNK_ROWS", "SHUFFLE_BUFFER", "check_streaming", "streaming_notes", "build_streaming", "stream_rows",
           "validate_streaming"]

#: Rows read, checked and tokenized together (the unit of the read-ahead, and of TRL's packing).
CHUNK_ROWS = 1000
#: Rows in the shuffle buffer (``datasets.IterableDataset.shuffle``), the size of Hugging Face's streaming examples.
SHUFFLE_BUFFER = 10_000
#: Chunks prepared ahead of the one the trainer reads.
READ_AHEAD = 2
#: Files read whole even when streaming: their rows cannot be told apart without reading all of them.
_WHOLE = (".json", ".csv")


# -- what streaming cannot do ---------------------------------------------------------------
def streaming_problems(cfg: Any, row_kind: str) -> list[ConfigProblem]:
    """The settings a stream cannot honour, one problem each (empty when ``data.streaming`` is off)."""
    if not cfg.data.streaming:
        return []
    problems = []
    if int(cfg.training.max_steps) <= 0:
        problems.append(ConfigProblem("training.max_steps", "data.streaming=true needs training.max_steps > 0: a "
                                      "stream's length is unknown, so epochs cannot be counted"))
    test_size = float(cfg.data.test_size)
    if 0 < test_size < 1 and not cfg.data.eval_split:
        problems.append(ConfigProblem("data.test_size", f"{test_size:g} is a fraction of a stream of unknown length; "
                                      f"with data.streaming=true give a row count (data.test_size=200 holds out the "
                                      f"first 200 rows) or data.eval_split"))
    elif test_size >= 1 and test_size != int(test_size):
        problems.append(ConfigProblem("data.test_size", f"{test_size:g} is neither a fraction nor a row count"))
    if len(cfg.data.datasets):
        problems.append(ConfigProblem("data.datasets", "mixing several datasets is not streamed yet; use data.dataset "
                                      "with data.streaming=true, or data.streaming=false to mix"))
    if row_kind != "conversation":
        problems.append(ConfigProblem("data.streaming", f"data.streaming supports SFT conversation and text rows; "
                                      f"objective '{cfg.objective.name}' trains on {ROW_KIND_WORDS[row_kind]} "
                                      f"(set data.streaming=false)"))
    _name, start, stop = parse_split(str(cfg.data.split))
    if any(b is not None and (b.endswith("%") or b.startswith("-")) for b in (start, stop)):
        problems.append(ConfigProblem("data.split", f"'{cfg.data.split}': a stream's length is unknown, so it is "
                                      f"sliced by row counts from its start only (e.g. train[1000:5000])"))
    return problems


def check_streaming(cfg: Any, row_kind: str) -> None:
    """Raise :class:`ConfigError` with every setting ``data.streaming`` cannot honour."""
    problems = streaming_problems(cfg, row_kind)
    if problems:
        raise ConfigError(problems)


def streaming_notes(cfg: Any) -> list[str]:
    """One line for each thing a streamed run does differently from a cached one."""
    notes = [f"data.streaming: no global shuffle; rows come in file order through a shuffle buffer of "
             f"{SHUFFLE_BUFFER:,} rows seeded by training.seed (shuffle the files beforehand for more)",
             "data.streaming: the data cache is not used; rows are read and tokenized again as training reads them",
             f"data.streaming: training.max_steps={cfg.training.max_steps} bounds the run; the stream starts over "
             f"when it ends"]
    test_size = float(cfg.data.test_size)
    if test_size >= 1 and not cfg.data.eval_split:
        notes.append(f"data.streaming: data.test_size={int(test_size)} holds out the first {int(test_size)} rows of "
                     f"the stream (not a seeded draw), and training starts after them")
    if str(cfg.training.packing).lower() == "auto":
        notes.append(f"data.streaming: training.packing=auto is decided on the first {CHUNK_ROWS:,} rows")
    if int(cfg.data.num_proc) != 1:
        notes.append("data.streaming: data.num_proc is not used; one background thread tokenizes ahead of the trainer")
    return notes


# -- reading rows lazily ----------------------------------------------------------------------
class _BlockBytes:
    """The bytes of one block of a file, indexed by offsets in the whole file: :class:`JsonLines` and its
    not-UTF-8 errors then name the byte offset in the file, as when the file is read whole."""

    def __init__(self, data: bytes, base: int):
        self.data, self.base = data, base

    def __getitem__(self, span: slice) -> bytes:
        return self.data[span.start - self.base:span.stop - self.base]


def _jsonl_chunks(path: Path, size: int) -> Iterator[tuple[Sequence[Any], Sequence[RowRef]]]:
    """The rows of a JSON-lines file, ``size`` at a time, as the cached reader numbers them
    (:func:`.readers.scan_lines`), parsed when read."""
    src = str(path)
    pending: tuple[Sequence[Any], Sequence[RowRef]] = ([], [])
    row = 0
    with open_decompressed(path) as fh:
        for buf, base, starts, ends, lines in scan_lines(fh.read, path):
            if len(starts):
                block = _BlockBytes(buf[starts[0] - base:ends[-1] - base], starts[0])
                pending = (RowChain([pending[0], JsonLines(block, src, starts, ends, lines)]),
                           RowChain([pending[1], RowRefs(src, len(starts), lines, row)]))
                row += len(starts)
            while len(pending[0]) >= size:
                yield pending[0][:size], pending[1][:size]
                pending = (pending[0][size:], pending[1][size:])
    if len(pending[0]):
        yield pending


def _parquet_chunks(path: Path, size: int) -> Iterator[tuple[Sequence[Any], list[RowRef]]]:
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=size)
        for batch in batches:
            rows = batch.to_pylist()
            yield rows, [RowRef(str(path), None, row + i) for i in range(len(rows))]
            row += len(rows)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"cannot read Parquet: {exc}", source=str(path)) from None


def _arrow_batches(path: Path) -> Iterator[Any]:
    """The record batches of an Arrow IPC stream (what ``datasets`` writes) or file."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            yield from pa.ipc.open_stream(source)
            return
        except pa.ArrowInvalid:
            source.seek(0)
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _arrow_chunks(path: Path, size: int) -> Iterator[tuple[Sequence[Any], list[RowRef]]]:
    row = 0
    try:
        for batch in _arrow_batches(path):
            for lo in range(0, batch.num_rows, size):
                rows = batch.slice(lo, size).to_pylist()
                yield rows, [RowRef(str(path), None, row + i) for i in range(len(rows))]
                row += len(rows)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read Arrow: {first}", source=str(path)) from None


def _whole_file_chunks(path: Path, size: int) -> Iterator[tuple[Sequence[Any], list[RowRef]]]:
    rows, refs = read_file(path)
    for lo in range(0, len(rows), size):
        yield rows[lo:lo + size], refs[lo:lo + size]


def _file_chunks(path: Path, size: int) -> Iterator[tuple[Sequence[Any], list[RowRef]]]:
    ext = extension_of(path) or ""
    inner = re.sub(r"\.(gz|zst)$", "", ext)
    if inner == ".jsonl":
        return _jsonl_chunks(path, size)
    if inner in _WHOLE:
        return _whole_file_chunks(path, size)
    return _parquet_chunks(path, size) if inner == ".parquet" else _arrow_chunks(path, size)


def _hub_chunks(source: Source, split: str, size: int) -> Iterator[tuple[Sequence[Any], list[RowRef]]]:
    """A hub dataset through ``datasets.load_dataset(..., streaming=True)``: nothing is downloaded whole."""
    import datasets

    try:
        stream = iter(datasets.load_dataset(source.name, split=split, revision=source.revision, streaming=True))
        row = 0
        while True:
            rows = [r for _, r in zip(range(size), stream)]
            if not rows:
                return
            yield rows, [RowRef(str(source.name), None, row + i) for i in range(len(rows))]
            row += len(rows)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all become one clear error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot stream hub dataset '{source.name}' split '{split}': {type(exc).__name__}: {first}",
                        source=source.name) from None


@dataclass
class _Plan:
    """What one stream reads: a split of a source, sliced by row counts."""

    source: Source
    split: str
    key: str
    start: int = 0
    stop: int | None = None
    files: list[Path] = field(default_factory=list)

    @classmethod
    def of(cls, spec: str, split: str, key: str) -> "_Plan":
        source = resolve_source(spec)
        name, start, stop = parse_split(split, key)
        plan = cls(source, name, key, int(start or 0), None if stop is None else int(stop))
        if source.kind == "local":
            plan.files = _local_files(source, name, key)
        return plan

    def chunks(self, skip: int = 0) -> Iterator[tuple[Sequence[Any], list[RowRef]]]:
        """The rows of the split in chunks, the first ``skip`` (after the slice's start) left out unparsed."""
        parts = ((c for f in self.files for c in _file_chunks(f, CHUNK_ROWS)) if self.source.kind == "local"
                 else _hub_chunks(self.source, self.split, CHUNK_ROWS))
        lo, index = self.start + skip, 0
        for rows, refs in parts:
            n = len(rows)
            a = max(lo - index, 0)
            b = n if self.stop is None else min(n, self.stop - index)
            if a < b:
                yield rows[a:b], refs[a:b]
            index += n
            if self.stop is not None and index >= self.stop:
                return


# -- the stages, chunk by chunk -------------------------------------------------------------------
@dataclass
class _Stages:
    """What turns a chunk of rows into tokenized rows: the run's format, template, tokenizer and config."""

    fmt: Any
    options: Any
    template: Any
    tokenizer: Any
    cfg: Any

    def chunk(self, rows: Sequence[Any], refs: Sequence[RowRef]) -> tuple[_Encoded, _ChunkBadRows, int]:
        """One chunk through every stage (:func:`.pipeline._prepare`); its bad rows and warnings kept for the
        reader to replay in order."""
        encoded, bad = _prepare(rows, refs, self.fmt, self.options, self.template, self.tokenizer, self.cfg)
        return encoded, bad, len(rows)


class _Quiet(_BadRows):
    """Bad rows met again (the first chunk looked at before training, a second pass): an ``error`` policy
    still raises, nothing is printed or counted twice."""

    def warn(self, warning: DataError) -> None:
        """Warned about when the stream first meets the row."""


def _ahead(stages: _Stages, chunks: Iterator[tuple[Sequence[Any], list[RowRef]]]) -> Iterator[Any]:
    """``stages.chunk`` over ``chunks`` in a background thread, :data:`READ_AHEAD` chunks ahead, in order.

    The fast tokenizer releases the GIL while it encodes, so the thread works while the trainer does.
    An exception is raised here at its chunk's turn. Closing the iterator stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for rows, refs in chunks:
                if stop.is_set():
                    return
                _put(ready, ("ok", stages.chunk(rows, refs)), stop)
            _put(ready, ("ok", done), stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, raised there
            _put(ready, ("error", exc), stop)

    thread = threading.Thread(target=work, name="sft-stream", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = ready.get()
            if kind == "error":
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


def _put(ready: queue.Queue, item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


# -- the stream -------------------------------------------------------------------------------------
_COUNTS = ("truncated", "cut_dropped", "cut_eot", "long_prompts", "chunked", "precut", "fully_masked")
_STAT_NAMES = {"cut_dropped": "truncated_dropped", "cut_eot": "truncated_eot_added"}


class _Stream:
    """The training rows of a streamed run, pass after pass, and the counts of the first pass (``stats``,
    updated in place as the rows are read: ``summary.json`` shows what the run read)."""

    def __init__(self, opened: "_Opened", evals: _Encoded, eval_read: int, skip: int):
        self.plan, self.stages, self.bad, self.stats = opened.plan, opened.stages, opened.bad, opened.stats
        #: the eval rows (counted with the first pass's), the rows read for them, the rows the training pass skips
        self.evals, self.eval_read, self.skip = evals, eval_read, skip
        self.passes = 0
        self._count(_Encoded(), 0)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every training row (``input_ids``, ``assistant_masks``) of one pass, in file order."""
        self.passes += 1
        first = self.passes == 1
        self.stats["passes"] = self.passes
        into = self.bad if first else _Quiet(self.bad.policy, 1.0)
        totals = _Encoded()
        read = 0
        for encoded, chunk_bad, n in _ahead(self.stages, self.plan.chunks(self.skip)):
            chunk_bad.replay(into)
            if first:
                read += n
                totals.extend(_counts_only(encoded))
                self._count(totals, read)
            for ids, masks in zip(encoded.input_ids, encoded.masks):
                for row_ids, row_mask in zip(ids.to_pylist(), masks.to_pylist()):
                    yield {"input_ids": row_ids, "assistant_masks": row_mask}
        if first:
            self._finish(totals, read)

    def _count(self, totals: _Encoded, read: int) -> None:
        s = self.stats
        s["rows"] = self.eval_read + read
        s["train_rows"] = totals.rows
        s["train_tokens"] = totals.tokens
        s["trained_tokens"] = totals.trained_tokens
        s["eval_rows"] = self.evals.rows
        s["eval_tokens"] = self.evals.tokens
        s["max_tokens"] = max(self.evals.max_tokens, totals.max_tokens)
        for name in _COUNTS:
            s[_STAT_NAMES.get(name, name)] = getattr(self.evals, name) + getattr(totals, name)
        s["skipped"] = self.bad.stats()
        s["unread_columns"] = dict(self.bad.unread.most_common())

    def _finish(self, totals: _Encoded, read: int) -> None:
        """The end of the first pass: what the cached pipeline checks once every row is read."""
        self._count(totals, read)
        if not totals.rows:
            first = f"; the first: {self.bad.errors[0]}" if self.bad.errors else ""
            raise DataError(f"no training row has a trained token: every streamed row is fully masked, bad or too "
                            f"long (check template '{self.stages.template.name}', data.train_on and "
                            f"model.max_seq_length){first}", source=self.stats["source"])
        self.bad.check(self.stats["rows"])
        self.stats["complete"] = True
        skipped = self.bad.stats()
        if skipped["count"]:
            notice(f"data.streaming: skipped {skipped['count']} of {self.stats['rows']} rows (data.on_bad_row=skip); "
                   f"summary.json's dataset.skipped lists them")


def _counts_only(encoded: _Encoded) -> _Encoded:
    """``encoded``'s counts without its rows (the totals keep counts only)."""
    import dataclasses

    return dataclasses.replace(encoded, input_ids=[], masks=[], conversations=[])


def _generate(stream: _Stream) -> Iterator[dict[str, Any]]:
    yield from stream.rows()


def _as_dataset(stream: _Stream) -> Any:
    """The stream as a ``datasets.IterableDataset`` with typed columns (TRL reads the column names)."""
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "assistant_masks": datasets.List(datasets.Value("int8"))})
    return datasets.IterableDataset.from_generator(_generate, features=features, gen_kwargs={"stream": stream})


# -- building and validating -------------------------------------------------------------------------
@dataclass
class _Opened:
    plan: _Plan
    stages: _Stages
    bad: _BadRows
    stats: dict[str, Any]


def _open(cfg: Any, pm: "PluginManager | None", tokenizer: Any, template: "ChatTemplate | None",
          row_kind: str | None) -> _Opened:
    if template is None:
        template = resolve_template(cfg, pm, tokenizer)
    else:
        prepare_tokenizer(tokenizer, template, cfg)
    from ..tokens import add_configured_tokens

    add_configured_tokens(tokenizer, cfg)  # model.add_tokens: rows are tokenized as training will see them
    check_streaming(cfg, row_kind or objective_row_kind(cfg, pm))
    src = _sources(cfg)[0]
    plan = _Plan.of(src.spec, src.split, f"{src.key}.split")
    columns: list[str] = []
    if src.format == "auto":
        first = next(plan.chunks(), None)
        if first is None:
            raise DataError("the dataset has no rows", source=plan.source.describe())
        columns = columns_of(first[0])
    fmt, options = resolve_format(cfg, pm, columns, plan.source.describe(), src.format, f"{src.key}.format")
    stats: dict[str, Any] = {"streaming": True, "rows": 0, "format": fmt.name, "template": template.name,
                             "source": plan.source.describe(), "cache": "off (data.streaming)", "cache_key": None,
                             "passes": 0, "complete": False}
    return _Opened(plan, _Stages(fmt, options, template, tokenizer, cfg),
                   _BadRows(cfg.data.on_bad_row, float(cfg.data.max_bad_fraction)), stats)


def _eval_rows(opened: _Opened) -> tuple[_Encoded, int, int]:
    """The eval rows tokenized (``data.eval_split``, read whole, or the first ``data.test_size`` rows kept), the
    rows read for them and the rows the training stream skips."""
    cfg = opened.stages.cfg
    out = _Encoded()
    read = 0

    def prepare(rows: Sequence[Any], refs: Sequence[RowRef]) -> None:
        encoded, bad, _n = opened.stages.chunk(rows, refs)
        bad.replay(opened.bad)
        out.extend(encoded)

    if cfg.data.eval_split:
        spec, split = str(cfg.data.dataset), str(cfg.data.eval_split)
        if opened.plan.source.kind == "local" and names_local_files(split):
            spec, split = split, "train"
        for rows, chunk_refs in _Plan.of(spec, split, "data.eval_split").chunks():
            prepare(rows, chunk_refs)
            read += len(rows)
        return out, read, 0
    count = int(float(cfg.data.test_size))
    if count <= 0:
        return out, 0, 0
    for rows, chunk_refs in opened.plan.chunks():
        for row, ref in zip(rows, chunk_refs):
            if len(out.produced) == count:  # conversations kept, as a cached split counts them
                return out, read, read
            read += 1
            prepare([row], [ref])
    raise ConfigError([ConfigProblem("data.test_size", f"{count} leaves no training rows out of {len(out.produced)}")])


def _stream(cfg: Any, pm: "PluginManager | None", tokenizer: Any, template: "ChatTemplate | None",
            row_kind: str | None) -> tuple[_Stream, _Encoded]:
    opened = _open(cfg, pm, tokenizer, template, row_kind)
    evals, eval_read, skip = _eval_rows(opened)
    return _Stream(opened, evals, eval_read, skip), evals


def build_streaming(cfg: Any, pm: "PluginManager | None", tokenizer: Any, *, template: "ChatTemplate | None" = None,
                    row_kind: str | None = None, quiet: bool = False) -> PreparedData:
    """:func:`.pipeline.build_datasets` for ``data.streaming: true``: ``train`` is a ``datasets.IterableDataset``.

    Before returning it reads the first chunk (a bad row there under ``on_bad_row=error`` fails
    now, before any model loads): its rows decide ``training.packing=auto`` (``stats["sample_rows"]``,
    ``stats["sample_tokens"]``) and its conversations are ``train_conversations`` (the quick
    generation's prompt). ``stats`` is updated as training reads the stream.
    """
    stream, evals = _stream(cfg, pm, tokenizer, template, row_kind)
    first = next(stream.plan.chunks(stream.skip), None)
    if first is None:
        raise DataError("the dataset has no training rows" + (" after the held-out rows" if stream.skip else ""),
                        source=stream.stats["source"])
    sample, sample_bad, _n = stream.stages.chunk(*first)
    sample_bad.replay(_Quiet(stream.bad.policy, 1.0))  # on_bad_row=error: the first bad row stops the run here
    stream.stats.update(sample_rows=sample.rows, sample_tokens=sample.tokens)
    if not quiet:
        for line in streaming_notes(cfg):
            notice(line)
        notice(f"data: streaming {describe_stream(stream.stats)}")
    train = _as_dataset(stream).shuffle(seed=int(cfg.training.seed), buffer_size=SHUFFLE_BUFFER)
    eval_table = _table(evals)
    return PreparedData(train, dataset_of(eval_table) if eval_table is not None else None, stream.stats,
                        _conversations_of(_table(sample)), _conversations_of(eval_table))


def stream_rows(cfg: Any, pm: "PluginManager | None", tokenizer: Any, *, template: "ChatTemplate | None" = None,
                row_kind: str | None = None) -> tuple[Iterator[dict[str, Any]], dict[str, Any]]:
    """One pass over the training rows in file order (before the shuffle buffer), and the stats it fills in."""
    stream, _evals = _stream(cfg, pm, tokenizer, template, row_kind)
    return stream.rows(), stream.stats


def describe_stream(stats: dict[str, Any]) -> str:
    """What is known of a stream before training reads it: its source, format, template and first chunk."""
    held = f"; {stats['eval_rows']} eval rows held out" if stats.get("eval_rows") else ""
    sample = (f"; the first {stats['sample_rows']} training rows average "
              f"{stats['sample_tokens'] / max(1, stats['sample_rows']):.0f} tokens" if stats.get("sample_rows") else "")
    return f"{stats['source']} ({stats['format']}, template {stats['template']}){held}{sample}"


def validate_streaming(cfg: Any, template: "ChatTemplate | None" = None) -> str:
    """``sft validate`` with ``data.streaming: true``: every row through the stream once, nothing cached.

    The caveats are printed one line each; returns the one-line report ``sft validate`` prints.
    """
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    rows, stats = stream_rows(cfg, None, tokenizer, template=template)
    for _row in rows:
        pass
    for line in streaming_notes(cfg):
        notice(line)
    return "data OK (streamed, every row read once): " + describe_stats(stats)
