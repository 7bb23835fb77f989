"""Crafted model files in a model folder, a received run or an export: one line naming the file, never a
traceback, a panic, a hang or a huge allocation (engine/model_files.py)."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest

from sft.testing import run_sft

from datakit import FIXTURES


def _one_line_error(result, path: Path, *words: str) -> str:
    """The command failed like every user error: exit 1, one ``Error:`` line naming ``path``, no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert str(path) in lines[0] and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _preview(model_dir: Path, tmp_path: Path, *extra: str):
    return run_sft("preview", "-n", "1", f"model.name={model_dir}", f"data.dataset={FIXTURES / 'messages.jsonl'}",
                   f"data.cache_dir={tmp_path / 'cache'}", *extra, check=False)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "received-run"))


# -- tokenizer.json ----------------------------------------------------------------------------
def _with_split_regex(model_dir: Path, pattern: str) -> Path:
    """The model's tokenizer.json with a regex pre-tokenizer (as Llama 3's) in front of its byte-level one."""
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, dict(spec["pre_tokenizer"], use_regex=False)]}
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("content, words", [
    ("{\"version\": \"1.0\",\n  oops}", ("tokenizer.json:2: not valid JSON",)),
    ("[1, 2]", ("expected a JSON object, found a list",)),
    ("{\"version\": \"1.0\"}", ("'model' is null, expected an object",)),
    ("{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": 3, \"merges\": []}}",
     ("not a tokenizer the tokenizers library can read", "expected a map")),
], ids=["not-json", "a-list", "no-model", "wrong-shape"])
def test_a_broken_tokenizer_json_is_one_line_naming_it(model_copy, tmp_path, content, words):
    (model_copy / "tokenizer.json").write_text(content)
    _one_line_error(_preview(model_copy, tmp_path), model_copy / "tokenizer.json", *words)


def test_a_sound_tokenizer_regex_passes_the_probe(model_copy, tmp_path):
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    _with_split_regex(model_copy, llama3)
    result = _preview(model_copy, tmp_path)
    assert result.exit_code == 0, result.output


def test_a_catastrophically_backtracking_regex_is_refused_at_load(model_copy, tmp_path):
    # Oniguruma gives up on (a+)+$ after its retry limit and the tokenizers library panics mid-encode.
    path = _with_split_regex(model_copy, "(a+)+$")
    _one_line_error(_preview(model_copy, tmp_path), path, "backtracks catastrophically", "(a+)+$")


def test_a_regex_that_would_hang_on_a_long_word_is_refused_in_bounded_time(model_copy, tmp_path, monkeypatch):
    # Polynomial backtracking stays under Oniguruma's retry limit at every position: minutes on 1,000 'a's.
    from sft.engine import model_files

    monkeypatch.setattr(model_files, "REGEX_PROBE_SECONDS", 3.0)
    path = _with_split_regex(model_copy, "a*a*a*[^a]")
    start = time.monotonic()
    _one_line_error(_preview(model_copy, tmp_path), path, "took over 3 s", "catastrophic backtracking")
    assert time.monotonic() - start < 30


# -- safetensors -------------------------------------------------------------------------------
def _safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


_TENSOR = {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}
SAFETENSORS = {
    "length-past-end": (dict(header=b"{}", length=2**62), "header length (4,611,686,018,427,387,904 bytes)"),
    "header-not-json": (dict(header=b"{nope"), "its header is not valid JSON"),
    "offsets-past-end": (dict(header=json.dumps({"w": _TENSOR}).encode(), data=b"\0" * 16),
                         "data_offsets end at byte 4,000,000"),
}


@pytest.mark.parametrize("kind", SAFETENSORS)
def test_crafted_adapter_weights_in_a_received_run_are_one_line_naming_them(run_copy, kind):
    crafted, words = SAFETENSORS[kind]
    path = _safetensors(run_copy / "adapter" / "adapter_model.safetensors", **crafted)
    _one_line_error(run_sft("generate", run_copy, "hi", "--max-new-tokens", "2", check=False), path, words)


def test_crafted_weights_fail_sft_export_before_any_work(run_copy):
    path = _safetensors(run_copy / "adapter" / "adapter_model.safetensors", **SAFETENSORS["offsets-past-end"][0])
    result = run_sft("export", run_copy, "--exporter", "lora", check=False)
    assert result.exit_code != 0 and f"{path}: tensor 'w'" in result.output and "Traceback" not in result.output
    assert not (run_copy / "exports" / "lora").exists()


def test_crafted_base_weights_in_a_model_folder_are_one_line_naming_them(model_copy, tmp_path):
    path = _safetensors(model_copy / "model.safetensors", **SAFETENSORS["length-past-end"][0])
    _one_line_error(_preview(model_copy, tmp_path), path, "more than the file holds")


# -- GGUF --------------------------------------------------------------------------------------
def _gguf(path: Path, *parts: bytes) -> Path:
    path.write_bytes(b"".join(parts))
    return path


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


GGUFS = {
    "bad-magic": ((b"GGML", _u32(3), _u64(0), _u64(0)), "not a GGUF file"),
    "bad-version": ((b"GGUF", _u32(99), _u64(0), _u64(0)), "GGUF version 99"),
    "huge-count": ((b"GGUF", _u32(3), _u64(0), _u64(2**60)), "the metadata count says 1,152,921,504,606,846,976"),
    "huge-string": ((b"GGUF", _u32(3), _u64(0), _u64(1), _u64(2**40), b"general.name"), "a string length says"),
    "huge-array": ((b"GGUF", _u32(3), _u64(0), _u64(1), _u64(3), b"key", _u32(9), _u32(4), _u64(2**50)),
                   "an array length says"),
    "too-many-dims": ((b"GGUF", _u32(3), _u64(1), _u64(0), _u64(1), b"w", _u32(2**31), b"\0" * 64), "dimensions"),
}


@pytest.mark.parametrize("kind", GGUFS)
def test_a_crafted_gguf_given_to_generate_is_one_line_naming_it(tiny_run, tmp_path, kind):
    parts, words = GGUFS[kind]
    path = _gguf(tmp_path / "model-Q8_0.gguf", *parts)
    result = run_sft("generate", tiny_run, "hi", "--gguf", "--file", path, check=False)
    _one_line_error(result, path, words)


def test_a_crafted_gguf_file_of_a_model_folder_is_one_line_naming_it(model_copy, tmp_path):
    path = _gguf(model_copy / "model.gguf", *GGUFS["huge-string"][0])
    _one_line_error(_preview(model_copy, tmp_path, "model.gguf_file=model.gguf"), path, "damaged GGUF header")


def test_the_gguf_reader_still_reads_a_real_header(tmp_path):
    import gguf

    from sft.plugins.exporters.gguf.header import read_gguf_header

    writer = gguf.GGUFWriter(str(tmp_path / "real.gguf"), "llama")
    writer.add_name("tiny")
    writer.add_token_list(["a", "b", "c"])
    import numpy as np

    writer.add_tensor("w", np.zeros((2, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata, types = read_gguf_header(tmp_path / "real.gguf")
    assert metadata["general.name"] == "tiny" and metadata["tokenizer.ggml.tokens"] == {"array": 3}
    assert types == {"w": "F32"}
