"""Reading dataset files into rows, each with where it came from (file, line, row).

``.json`` (an array, or JSON lines saved as .json), ``.jsonl``, ``.csv``, ``.parquet`` and ``.arrow``
(the IPC stream or file format ``datasets`` writes); ``.json``/``.jsonl``/``.csv`` also compressed (``.gz``, and
``.zst`` when the ``zstandard`` package is installed), with the lines of the uncompressed text.
Every parse error names the file and line (an Arrow or Parquet file has rows, not lines); a row whose bytes are not UTF-8 becomes a
:class:`BadRow` naming the file, line and byte offset (so ``data.on_bad_row=skip`` can skip it).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sft.core.errors import DataError

__all__ = ["SUPPORTED_EXTENSIONS", "BadRow", "JsonLines", "RowChain", "RowRef", "RowRefs", "TableRows", "READERS", "extension_of", "read_file", "hash_files"]

#: ``progress(fraction of the file read, rows so far)``: how a reader reports on a big file.
OnRow = Callable[[float, int], None]


def _quiet(fraction: float, rows: int) -> None:
    """No progress report."""


#: Compressions of text files, by suffix: the name of the package that reads it ("" for the standard library).
COMPRESSIONS = {".gz": "", ".zst": "zstandard"}
_COMPRESSIBLE = (".json", ".jsonl", ".csv")
SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".arrow") + tuple(
    ext + comp for ext in _COMPRESSIBLE for comp in COMPRESSIONS)


@dataclass(frozen=True)
class BadRow:
    """A row that could not be read (its bytes are not UTF-8); the pipeline applies ``data.on_bad_row`` to it."""

    error: DataError


def _first_bad_byte(data: bytes, start: int) -> int:
    """The offset of the first byte at or after ``start`` that is not valid UTF-8."""
    try:
        data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        return start + exc.start
    return start


def _not_utf8(data: bytes, start: int, src: str, line: int | None) -> BadRow:
    offset = _first_bad_byte(data, start)
    return _not_utf8_at(offset, data[offset], src, line)


def _not_utf8_at(offset: int, byte: int, src: str, line: int | None) -> BadRow:
    return BadRow(DataError(
        f"not valid UTF-8: byte 0x{byte:02x} at byte offset {offset}; save the file as UTF-8 "
        f"(e.g. iconv -f latin-1 -t UTF-8 FILE)", source=src, line=line))


def _line_start(data: bytes, line: int) -> int:
    """The byte offset where 1-based ``line`` starts."""
    offset = 0
    for _ in range(line - 1):
        found = data.find(b"\n", offset)
        if found < 0:
            break
        offset = found + 1
    return offset


def _has_undecodable(text: str) -> bool:
    """True when ``text`` (decoded with ``surrogateescape``) holds a byte that was not UTF-8."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def _decode(data: bytes) -> str:
    """The file's text; bytes that are not UTF-8 become lone surrogates, so the rows that hold them
    can be found (and skipped under ``on_bad_row=skip``) instead of failing the whole file."""
    return data.decode("utf-8-sig", errors="surrogateescape")


def _byte_offset(text: str, i: int, data: bytes) -> int:
    """The byte offset in ``data`` of character ``i`` of ``text = _decode(data)``."""
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    return bom + len(text[:i].encode("utf-8", errors="surrogateescape"))


@dataclass(frozen=True)
class RowRef:
    """Where one row came from: its file (or hub name), 1-based line when known, 0-based row."""

    source: str
    line: int | None
    row: int


class RowRefs(Sequence):
    """The :class:`RowRef` of each row of one file, made when one is read: a list of them would cost about
    a hundred bytes a row, what a million-row file cannot spare. ``lines`` (1-based, one a row) or None."""

    def __init__(self, src: str, count: int, lines: Any = None, first: int = 0):
        self.src, self.count, self.lines, self.first = src, count, lines, first

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            lo, hi, step = index.indices(self.count)
            if step != 1:
                return [self[i] for i in range(lo, hi, step)]
            lines = None if self.lines is None else self.lines[lo:hi]
            return RowRefs(self.src, max(0, hi - lo), lines, self.first + lo)
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        return RowRef(self.src, None if self.lines is None else self.lines[index], self.first + index)


def extension_of(path: Path | str) -> str | None:
    """The supported extension ``path`` ends with (``.jsonl.gz`` before ``.gz``), lower-cased; None if none."""
    name = str(path).lower()
    # Longest first, so a compressed file is read by its inner format rather than refused as ".gz".
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def open_decompressed(path: Path) -> Any:
    """``path`` opened for reading its bytes, decompressed when its name says so: lines and byte offsets in
    errors are then those of the uncompressed text, as the user would see them with ``zcat``."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError("reading .zst files needs the zstandard package: pip install zstandard",
                            source=str(path)) from None
        # A stream reader, because zstd frames written by streaming tools carry no content size.
        return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
    return path.open("rb")


@contextmanager
def _decompressing(path: Path) -> Iterator[None]:
    """A damaged compressed file is one clear error (gzip/zlib/zstandard raise several types)."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        if path.suffix.lower() not in COMPRESSIONS:
            raise
        raise DataError(f"cannot decompress {path.suffix.lower()} file: {exc}", source=str(path)) from None


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed (:func:`open_decompressed`)."""
    with _decompressing(path), open_decompressed(path) as fh:
        return _utf8_or_say(fh.read(), path)


class _FileBytes:
    """A file's bytes, read by slice when asked (``os.pread``: forked workers share the descriptor safely,
    and nothing of the file stays in memory)."""

    def __init__(self, fh: Any):
        self.fh = fh  # kept open (and a temporary copy kept alive) as long as rows may be read

    def __getitem__(self, span: slice) -> bytes:
        return os.pread(self.fh.fileno(), span.stop - span.start, span.start)


def _local_bytes(path: Path) -> tuple[Any, int]:
    """``path``'s (decompressed) bytes readable by offset, and their size: the file itself, or for a
    compressed file a decompressed copy in the temporary folder (unnamed: gone when closed)."""
    if path.suffix.lower() not in COMPRESSIONS:
        fh = path.open("rb", buffering=0)
        return _FileBytes(fh), os.fstat(fh.fileno()).st_size
    copy = tempfile.TemporaryFile(prefix="sft-rows-")
    with _decompressing(path), open_decompressed(path) as fh:
        shutil.copyfileobj(fh, copy, SCAN_BLOCK)
    copy.flush()  # rows are read with os.pread, past Python's buffer
    return _FileBytes(copy), copy.tell()


#: Byte-order marks of the encodings a text file is saved in other than UTF-8 (UTF-32 first: its LE mark starts
#: with UTF-16's).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))


def _utf8_or_say(data: bytes, path: Path) -> bytes:
    """``data``, unless its byte-order mark says the whole file is in another encoding (then every row would be
    refused as not UTF-8, one by one); only its first bytes are looked at."""
    encoding = next((name for bom, name in _OTHER_BOMS if data[:4].startswith(bom)), None)
    if encoding:
        raise DataError(f"the file is {encoding} (it starts with a {encoding} byte-order mark), not UTF-8; save it as "
                        f"UTF-8 (e.g. iconv -f {encoding} -t UTF-8 FILE)", source=str(path))
    return data


def _read_json(path: Path, progress: OnRow = _quiet) -> tuple[list[Any], list[RowRef]]:
    """A JSON array of rows, each with the line its object starts on. JSONL-in-.json works too."""
    data = _read_bytes(path)
    text = _decode(data)
    src = str(path)
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] == "{":
        # One object per line saved as .json is common; a single object is not a dataset.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":
                return _jsonl_rows(data, len(data), src, progress)  # the bytes already read (and decompressed)
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
            if _has_undecodable(text[i:end]):
                obj = _not_utf8(data, _byte_offset(text, i, data), src, line)
            rows.append(obj)
            refs.append(RowRef(src, line, len(refs)))
            progress(end / len(text), len(rows))
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


def _read_jsonl(path: Path, progress: OnRow = _quiet) -> tuple["JsonLines", "RowRefs"]:
    data, size = _local_bytes(path)
    _utf8_or_say(data[0:4], path)
    return _jsonl_rows(data, size, str(path), progress)


class JsonLines(Sequence):
    """The rows of JSON-lines text, parsed when read.

    Only where each non-blank line starts and ends is held (24 bytes a row); a row's bytes are read
    when it is read, from the file (:class:`_FileBytes`) or from the bytes given, in the data workers
    (:mod:`.workers`) for most rows. A line that is not UTF-8 reads as a :class:`BadRow`; one that is
    not JSON raises a :class:`DataError` naming the file and line. A slice is a view on the same bytes.
    """

    def __init__(self, data: Any, src: str, starts: Any, ends: Any, lines: Any):
        self.data, self.src = data, src
        self.starts, self.ends, self.lines = starts, ends, lines  # array('q') each, one entry a row

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return JsonLines(self.data, self.src, self.starts[index], self.ends[index], self.lines[index])
        start, end = self.starts[index], self.ends[index]
        return self._parse(self.data[start:end], start, self.lines[index])

    def __iter__(self) -> Iterator[Any]:
        # Consecutive rows are read a block at a time: one read (or copy) per block, not per row.
        for lo in range(0, len(self), 1024):
            hi = min(lo + 1024, len(self))
            base = self.starts[lo]
            block = self.data[base:self.ends[hi - 1]]
            for k in range(lo, hi):
                yield self._parse(block[self.starts[k] - base:self.ends[k] - base], self.starts[k], self.lines[k])

    def _parse(self, raw: bytes, start: int, line: int) -> Any:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _not_utf8_at(start + exc.start, raw[exc.start], self.src, line)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            # A pretty-printed JSON array saved as .jsonl opens with a lone "[" (or "[{"): say what it is.
            array = line == 1 and text.lstrip().startswith("[") and not text.rstrip().endswith("]")
            hint = "; the file looks like one JSON array, which a .json file holds (JSON Lines is one row a line)"
            raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno}){hint if array else ''}", source=self.src,
                            line=line) from None


class RowChain(Sequence):
    """The rows of several files one after the other, without copying (or parsing) them into one list."""

    def __init__(self, parts: Sequence[Sequence[Any]]):
        self.parts = [p for p in parts if len(p)]
        self.ends = list(itertools.accumulate(len(p) for p in self.parts))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(lo, hi, step)]
            parts, begin = [], 0
            for part, end in zip(self.parts, self.ends):
                if lo < end and hi > begin:
                    parts.append(part[max(lo, begin) - begin:min(hi, end) - begin])
                begin = end
            return RowChain(parts)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self.ends, index)
        return self.parts[k][index - (self.ends[k - 1] if k else 0)]


#: A line break as ``bytes.splitlines`` sees one, and a character that makes a line not blank.
_LINE_END = re.compile(rb"\r\n|\r|\n")
_NOT_BLANK = re.compile(rb"[^ \t\f\v\x1c-\x1f]")


#: Bytes read at a time when JSON lines are scanned for their lines.
SCAN_BLOCK = 16 << 20


def scan_lines(read: Callable[[int], bytes], path: Path) -> Iterator[tuple[bytes, int, Any, Any, Any]]:
    """The rows of JSON-lines bytes, found a block at a time (``read(n)`` gives the next ``n`` bytes).

    Yields ``(buf, base, starts, ends, lines)`` per block: ``buf`` holds the bytes from offset ``base``
    on, ``starts``/``ends`` are the offsets (in the whole text) of the rows completed in it and ``lines``
    their 1-based line numbers. A line ends at ``\\n``, ``\\r\\n`` or ``\\r`` (as ``bytes.splitlines``); a blank
    line is no row; a line that straddles two blocks comes with the later one.
    """
    with _decompressing(path):
        block = read(max(SCAN_BLOCK, 4))  # a byte-order mark whole
    _utf8_or_say(block, path)
    carry_at = 3 if block.startswith(b"\xef\xbb\xbf") else 0
    carry, block = b"", block[carry_at:]
    lineno = 0
    while True:
        buf, base = carry + block, carry_at
        starts, ends, lines = array("q"), array("q"), array("q")
        pos = 0
        # Without a \r in the block every line ends at a \n, which bytes.find (memchr) finds far faster than the regex.
        newline_only = b"\r" not in buf
        while pos < len(buf):
            if newline_only:
                end = buf.find(b"\n", pos)
                if end < 0:
                    if block:  # a line without its end yet waits for the next block
                        break
                    end = len(buf)
                after = end + 1
            else:
                brk = _LINE_END.search(buf, pos)
                # A line without its end yet, or a \r that may be the first half of \r\n, waits for the next block.
                if block and (brk is None or brk.end() == len(buf) and brk.group() == b"\r"):
                    break
                end, after = (brk.start(), brk.end()) if brk else (len(buf), len(buf))
            lineno += 1
            if _NOT_BLANK.search(buf, pos, end):
                starts.append(base + pos)
                ends.append(base + end)
                lines.append(lineno)
            pos = after
        yield buf, base, starts, ends, lines
        if not block:
            return
        carry, carry_at = buf[pos:], base + pos
        with _decompressing(path):
            block = read(SCAN_BLOCK)


def _jsonl_rows(data: Any, size: int, src: str, progress: OnRow = _quiet) -> tuple[JsonLines, RowRefs]:
    """JSON lines in ``data`` (``size`` bytes of ``src``, decompressed): one row a non-blank line, parsed when
    read; only the line index is kept (:func:`scan_lines`)."""
    starts, ends, lines = array("q"), array("q"), array("q")
    at = 0

    def read(n: int) -> bytes:
        nonlocal at
        block = data[at:min(at + n, size)]
        at += len(block)
        return block

    for buf, base, block_starts, block_ends, block_lines in scan_lines(read, Path(src)):
        starts.extend(block_starts)
        ends.extend(block_ends)
        lines.extend(block_lines)
        progress(min(1.0, (base + len(buf)) / max(size, 1)), len(starts))
    return JsonLines(data, src, starts, ends, lines), RowRefs(src, len(starts), lines)


def _read_csv(path: Path, progress: OnRow = _quiet) -> tuple[list[Any], list[RowRef]]:
    rows: list[Any] = []
    refs: list[RowRef] = []
    src = str(path)
    data = _read_bytes(path)
    text = _decode(data)
    lines = text.count("\n") + 1
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # line 1 is the header
        try:
            for row in reader:
                values = [str(v) for v in list(row.values()) + list(row.keys()) if v is not None]
                if any(_has_undecodable(v) for v in values):
                    rows.append(_not_utf8(data, _line_start(data, start), src, start))
                else:
                    rows.append(dict(row))
                refs.append(RowRef(src, start, len(refs)))
                start = reader.line_num + 1
                progress(min(1.0, reader.line_num / lines), len(rows))
        except csv.Error as exc:
            raise DataError(f"invalid CSV: {exc}", source=src, line=reader.line_num) from None
    return rows, refs


class TableRows(Sequence):
    """The rows of an Arrow table (memory-mapped), made Python objects a batch at a time as they are read:
    a Parquet, Arrow or hub dataset of any size costs its columns on disk, not a dict a row in memory."""

    def __init__(self, table: Any):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(lo, hi, step)]
            return TableRows(self.table.slice(lo, max(0, hi - lo)))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.table.slice(index, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()


def _read_parquet(path: Path, progress: OnRow = _quiet) -> tuple[TableRows, RowRefs]:
    """A Parquet file, decoded row group by row group into an Arrow file in the temporary folder
    (:class:`.spool.Spool`) that is mapped back: decoded, its columns would otherwise sit in memory."""
    import pyarrow.parquet as pq

    from .spool import Spool

    spool = Spool()
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=8192):
            spool.write_batch(batch)
        table = spool.read() if spool.writer is not None else parquet.schema_arrow.empty_table()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"cannot read Parquet: {exc}", source=str(path)) from None
    return TableRows(table), RowRefs(str(path), table.num_rows)


def _read_arrow(path: Path, progress: OnRow = _quiet) -> tuple[TableRows, RowRefs]:
    """An Arrow IPC file, memory-mapped: ``datasets`` writes the stream format (``save_to_disk``, its cache);
    other tools often write the random-access file format, so both are tried."""
    import pyarrow as pa

    errors = []
    for open_ipc in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            table = open_ipc(pa.memory_map(str(path))).read_all()
            return TableRows(table), RowRefs(str(path), table.num_rows)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
            errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    raise DataError(f"cannot read Arrow: {errors[-1]}", source=str(path))


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet,
           ".arrow": _read_arrow}
# A compressed file is read by its inner format's reader, which decompresses through `_read_bytes`.
READERS.update({ext + comp: READERS[ext] for ext in _COMPRESSIBLE for comp in COMPRESSIONS})


def read_file(path: Path, progress: OnRow = _quiet) -> tuple[list[Any], list[RowRef]]:
    """The rows of one supported file, each with its :class:`RowRef`; a text file's reader reports each row to
    ``progress`` (a big file is read for minutes)."""
    ext = extension_of(path)
    if ext is None:
        raise DataError(f"unsupported file type; use one of {', '.join(SUPPORTED_EXTENSIONS)}", source=str(path))
    return READERS[ext](path, progress)


def hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    # Contents in order; names don't matter (a renamed copy hits the cache). A compressed file is
    # hashed as stored: a change to its rows changes its bytes too.
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
