"""Model files from elsewhere checked before a library parses them: ``tokenizer.json``, safetensors, GGUF.

A model folder, a run folder someone sent, or an export holds files that the tokenizers,
safetensors and gguf libraries (and llama.cpp) parse. Given a crafted file they panic, raise
an error that names no file, allocate what a length field asks for, or hang. Each check here
reads only what it must (a safetensors header, a GGUF header, the tokenizer JSON) and raises
one :class:`SftError` line naming the file and what is wrong:

- ``tokenizer.json``: parsed by the tokenizers library itself; when it refuses the file (or
  panics), the line says whether the JSON, its shape or what the library names is wrong. Its normalizer and
  pre-tokenizer regexes run in the Oniguruma engine, which backtracks: a nested quantifier
  such as ``(a+)+$`` hits Oniguruma's retry limit and panics mid-tokenization, and a
  polynomial one such as ``a*a*a*[^a]`` is under that limit at every position and runs for
  minutes on a 1,000-character word. Which patterns do that cannot be told from their text
  reliably, so the regexes are run: a child process tokenizes long runs of each kind of
  character with the file's normalizer and pre-tokenizer, and a file whose probe panics or
  takes longer than :data:`REGEX_PROBE_SECONDS` is refused. A child, because the tokenizers
  library holds the GIL while it encodes: only a process can be stopped. Files without a
  regex (SmolLM2's byte-level pre-tokenizer) need no child; a file's verdict is kept for
  the process.
- safetensors: the 8-byte header length within the file, the header a JSON object, and every
  tensor's ``data_offsets`` inside the data that follows.
- GGUF: magic and version, then every count and length bounded by the bytes left in the file,
  so nothing is allocated that the file does not hold. :func:`read_gguf_header` is that walk.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from sft.core.errors import SftError

__all__ = ["check_model_folder", "check_tokenizer_json", "check_safetensors", "read_gguf_header",
           "REGEX_PROBE_SECONDS"]

#: How long the tokenizer's regexes may take on the probe text (they take milliseconds).
REGEX_PROBE_SECONDS = 10.0
#: The largest safetensors header the safetensors library itself accepts.
_SAFETENSORS_MAX_HEADER = 100_000_000

_checked_tokenizers: dict[tuple[str, int, int], None] = {}


def check_model_folder(folder: str | Path, gguf_file: str | None = None) -> None:
    """Check the files of ``folder`` that sft hands to a library: its ``tokenizer.json``, every
    ``*.safetensors`` and, when given, the GGUF file ``gguf_file`` inside it. A folder that is not
    on disk (a hub id) is left to the library."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if (folder / "tokenizer.json").is_file():
        check_tokenizer_json(folder / "tokenizer.json")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    if gguf_file and (folder / gguf_file).is_file():
        read_gguf_header(folder / gguf_file)


# -- tokenizer.json ----------------------------------------------------------------------------

def check_tokenizer_json(path: str | Path) -> None:
    """Refuse a ``tokenizer.json`` that is not one the tokenizers library reads, or whose regexes backtrack."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _checked_tokenizers:
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SftError(f"{path}: not a tokenizer file: not UTF-8 text (byte {exc.start:,})") from None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception for every shape error
        raise SftError(_unreadable_tokenizer(path, text, exc)) from None
    except BaseException as exc:  # a Rust panic (pyo3's PanicException derives from BaseException)
        if type(exc).__name__ != "PanicException":
            raise
        raise SftError(f"{path}: the tokenizers library failed on this file: {_first_line(exc)}") from None
    # Each part's own JSON, as the library parsed it (the whole file is not parsed twice).
    parts = {name: json.loads(part.__getstate__()) if part is not None else None
             for name, part in (("normalizer", tokenizer.normalizer), ("pre_tokenizer", tokenizer.pre_tokenizer))}
    regexes = [pattern for part in parts.values() for pattern in _regexes(part)]
    if regexes:
        _probe_regexes(path, parts, regexes)
    _checked_tokenizers[key] = None


def _unreadable_tokenizer(path: Path, text: str, exc: BaseException) -> str:
    """What is wrong with a tokenizer file the library refused: its JSON, its shape, or what the library says."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as bad:
        return f"{path}:{bad.lineno}: not valid JSON: {bad.msg} (column {bad.colno})"
    if not isinstance(spec, dict):
        return f"{path}: not a tokenizer file: expected a JSON object, found {_json_kind(spec)}"
    if not isinstance(spec.get("model"), dict):
        return f"{path}: not a tokenizer file: 'model' is {_json_kind(spec.get('model'))}, expected an object"
    return f"{path}: not a tokenizer the tokenizers library can read: {_first_line(exc)}"


def _regexes(node: Any) -> Iterator[str]:
    """Every ``{"Regex": pattern}`` below ``node`` (a normalizer or pre-tokenizer, possibly a Sequence)."""
    if isinstance(node, dict):
        if isinstance(node.get("Regex"), str):
            yield node["Regex"]
        for value in node.values():
            yield from _regexes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _regexes(value)


# The probe: long runs of each kind of character (a backtracking regex is slow on a long run of
# what it repeats), each also followed by a character of another kind (where a match fails late).
_PROBE = r"""
import json, sys
from tokenizers import Tokenizer
parts = json.loads(sys.stdin.read())
spec = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}, **parts}
tok = Tokenizer.from_str(json.dumps(spec))
for ch in "aZ1 \t\n.,'-_é中😀":
    for tail in ("", "!", "a", " ", "1", "\n"):
        tok.encode(ch * 2000 + tail)
tok.encode("The quick brown fox, 12 jumps over the lazy dog's 345 fences.\n" * 40)
"""


def _probe_regexes(path: Path, parts: dict[str, Any], regexes: list[str]) -> None:
    shown = ", ".join(repr(r) for r in regexes[:3]) + (" ..." if len(regexes) > 3 else "")
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps(parts), capture_output=True, text=True,
                              timeout=REGEX_PROBE_SECONDS, env={**os.environ, "RUST_BACKTRACE": "0"})
    except subprocess.TimeoutExpired:
        raise SftError(f"{path}: its tokenizer regex ({shown}) took over {REGEX_PROBE_SECONDS:g} s on a 2,000-character "
                       f"test word (catastrophic backtracking); refusing a tokenizer that could hang on your data") from None
    if done.returncode == 0:
        return
    if "retry-limit" in done.stderr:
        raise SftError(f"{path}: its tokenizer regex ({shown}) backtracks catastrophically: the regex engine "
                       f"gave up on a 2,000-character test word; refusing a tokenizer that fails on ordinary text")
    last = [line for line in done.stderr.strip().splitlines() if line.strip()]
    raise SftError(f"{path}: its tokenizer regex ({shown}) failed on test text: {last[-1] if last else done.returncode}")


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- safetensors -------------------------------------------------------------------------------

def check_safetensors(path: str | Path) -> dict[str, Any]:
    """The header of the safetensors file ``path`` (tensor name -> dtype, shape, data_offsets), checked:
    its length within the file, valid JSON, every tensor's data inside the file. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise SftError(f"{path}: not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        n = int.from_bytes(first, "little")
        if n > size - 8 or n > _SAFETENSORS_MAX_HEADER:
            raise SftError(f"{path}: not a safetensors file: its header length ({n:,} bytes) is more than the file "
                           f"holds ({size:,} bytes); the file is damaged or was not written as safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SftError(f"{path}: not a safetensors file: its header is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise SftError(f"{path}: not a safetensors file: its header is {_json_kind(header)}, not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1] and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)):
            raise SftError(f"{path}: tensor {name!r}: its header entry is not a dtype, shape and two data_offsets")
        if offsets[1] > data:
            raise SftError(f"{path}: tensor {name!r}: its data_offsets end at byte {offsets[1]:,} but the file holds "
                           f"{data:,} bytes of tensor data; the file is truncated or damaged")
    return header


# -- GGUF --------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Truncated(Exception):
    pass


class _GgufCursor:
    """Reads a GGUF header where every length is checked against the bytes left in the file."""

    def __init__(self, f: Any, size: int):
        self.f, self.size = f, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise _Truncated(f"needs {n:,} bytes at byte {self.f.tell():,}, the file has {self.left():,} left")
        return self.f.read(n)

    def scalar(self, vtype: int) -> Any:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, each: int) -> int:
        """A 64-bit count of items of at least ``each`` bytes, bounded by what is left."""
        n = self.scalar(10)
        if n * each > self.left():
            raise _Truncated(f"{what} says {n:,}, more than the {self.left():,} bytes left in the file can hold")
        return n

    def string(self) -> str:
        return self.take(self.count("a string length", 1)).decode("utf-8", errors="replace")

    def value_type(self) -> int:
        vtype = self.scalar(4)
        if vtype not in _GGUF_SCALARS and vtype not in (_GGUF_STRING, _GGUF_ARRAY):
            raise _Truncated(f"unknown metadata value type {vtype} at byte {self.f.tell() - 4:,}")
        return vtype

    def skip_array(self) -> int:
        inner = self.value_type()
        each = 8 if inner in (_GGUF_STRING, _GGUF_ARRAY) else struct.calcsize(_GGUF_SCALARS[inner])
        n = self.count("an array length", each)
        if inner == _GGUF_STRING:
            for _ in range(n):
                self.f.seek(self.count("a string length", 1), 1)
        elif inner == _GGUF_ARRAY:
            for _ in range(n):
                self.skip_array()
        else:
            self.f.seek(each * n, 1)
        return n


def read_gguf_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, list[int]]]]:
    """``(metadata, tensors)`` of a little-endian GGUF (version 2 or 3), read from its header with
    every count bounded by the file's size: tensors maps a name to ``(ggml type id, shape)``.

    Metadata arrays are returned as their length (``{"array": n}``), so a 100k-token vocabulary
    is skipped, not parsed. A damaged or crafted file raises one :class:`SftError` line naming it.
    """
    path = Path(path)
    metadata: dict[str, Any] = {}
    tensors: dict[str, tuple[int, list[int]]] = {}
    with path.open("rb") as f:
        cur = _GgufCursor(f, path.stat().st_size)
        try:
            if cur.take(4) != b"GGUF":
                raise SftError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")
            version = cur.scalar(4)
            if version not in (2, 3):
                raise SftError(f"{path}: GGUF version {version} is not one sft reads (2 or 3)")
            # A tensor entry is at least 8+4+4+8 bytes, a metadata entry 8+4+1.
            n_tensors, n_kv = cur.count("the tensor count", 24), cur.count("the metadata count", 13)
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.value_type()
                if vtype == _GGUF_STRING:
                    metadata[key] = cur.string()
                elif vtype == _GGUF_ARRAY:
                    metadata[key] = {"array": cur.skip_array()}
                else:
                    metadata[key] = cur.scalar(vtype)
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.scalar(4)
                if n_dims > _GGUF_MAX_DIMS:
                    raise _Truncated(f"tensor {name!r} has {n_dims} dimensions (at most {_GGUF_MAX_DIMS})")
                shape = [cur.scalar(10) for _ in range(n_dims)]
                tensors[name] = (cur.scalar(4), shape)
                cur.scalar(10)  # its offset in the data section
        except _Truncated as exc:
            raise SftError(f"{path}: damaged GGUF header: {exc}") from None
    return metadata, tensors
