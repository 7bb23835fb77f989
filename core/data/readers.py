"""Reading dataset files into rows, each with where it came from (file, line, row).

``.json`` (an array, or JSON lines saved as .json), ``.jsonl``, ``.csv`` and ``.parquet``.
Every parse error names the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError

__all__ = ["SUPPORTED_EXTENSIONS", "RowRef", "READERS", "hash_files"]

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


@dataclass(frozen=True)
class RowRef:
    """Where one row came from: its file (or hub name), 1-based line when known, 0-based row."""

    source: str
    line: int | None
    row: int


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


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:  # contents in order; names don't matter (a renamed copy hits the cache)
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
