"""Inputs users have at scale: compressed JSON lines, Arrow files, save_to_disk folders, globs of shards.

Each input holds the same rows as a plain .jsonl file and must give the same tokenized training rows;
bad rows are located by file and line (or row); the cache key covers every file read.
"""

from __future__ import annotations

import gzip
import json

import pytest

from sft.core.errors import ConfigError, DataError
from sft.engine.data import build_datasets, read_rows
from sft.testing import write_jsonl

from datakit import FIXTURES, data_config, fresh_tokenizer

ROWS, _ = read_rows(str(FIXTURES / "alpaca.jsonl"))


def _build(model_dir, dataset, *overrides):
    return build_datasets(data_config(model_dir, dataset, *overrides), None, fresh_tokenizer(model_dir))


def _jsonl_bytes(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _write_inputs(tmp_path, rows):
    """The same rows as every input kind; name → the value of data.dataset."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = {"jsonl": write_jsonl(tmp_path / "plain.jsonl", rows)}
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(rows)))
    inputs["jsonl.gz"] = tmp_path / "rows.jsonl.gz"
    (tmp_path / "rows.json.gz").write_bytes(gzip.compress(json.dumps(rows, indent=1).encode()))
    inputs["json.gz"] = tmp_path / "rows.json.gz"
    (tmp_path / "lines.json.gz").write_bytes(gzip.compress(_jsonl_bytes(rows)))  # JSON lines saved as .json
    inputs["jsonl as json.gz"] = tmp_path / "lines.json.gz"
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, start in enumerate(range(0, len(rows), 2)):  # two rows a shard, names sort in row order
        pq.write_table(pa.Table.from_pylist(rows[start:start + 2]), shards / f"train-{i:05d}.parquet")
        (shards / f"part-{i:05d}.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(rows[start:start + 2])))
    inputs["parquet glob"] = f"{shards}/train-*.parquet"
    inputs["jsonl.gz glob"] = f"{shards}/*.jsonl.gz"
    saved = datasets.Dataset.from_list(rows)
    saved.save_to_disk(str(tmp_path / "saved"))
    inputs["save_to_disk"] = tmp_path / "saved"
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "saved_dict"))
    inputs["save_to_disk dict"] = tmp_path / "saved_dict"
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows))
    inputs["arrow stream"] = tmp_path / "stream.arrow"
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as writer:
        writer.write_table(pa.Table.from_pylist(rows))
    inputs["arrow file"] = tmp_path / "file.arrow"
    try:
        (tmp_path / "rows.jsonl.zst").write_bytes(_zstd(_jsonl_bytes(rows)))
        inputs["jsonl.zst"] = tmp_path / "rows.jsonl.zst"
    except pytest.skip.Exception:
        pass  # zstandard not installed: its own test says so
    return inputs


def test_every_input_gives_the_same_tokenized_rows(smollm2_dir, tmp_path):
    inputs = _write_inputs(tmp_path, ROWS)
    expected = _build(smollm2_dir, inputs.pop("jsonl"))
    assert expected.stats["train_rows"] == len(ROWS) == 3
    for name, dataset in inputs.items():
        prepared = _build(smollm2_dir, dataset)
        assert prepared.stats["format"] == "alpaca", name
        assert prepared.train["input_ids"] == expected.train["input_ids"], name
        assert prepared.train["assistant_masks"] == expected.train["assistant_masks"], name


def test_an_eval_split_given_as_a_glob_or_a_compressed_file(smollm2_dir, tmp_path):
    inputs = _write_inputs(tmp_path, ROWS)
    for eval_split in (inputs["jsonl.gz glob"], inputs["jsonl.gz"]):
        prepared = _build(smollm2_dir, inputs["jsonl"], f"data.eval_split={eval_split}")
        assert len(prepared.eval["input_ids"]) == 3 and len(prepared.train["input_ids"]) == 3


def test_rows_keep_their_lines_through_gzip_and_a_bad_row_in_a_shard_says_where(smollm2_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(ROWS)))
    bad = _jsonl_bytes(ROWS[:1]) + b"\n" + _jsonl_bytes([{"instruction": "Hi", "output": 7}])
    (shards / "b.jsonl.gz").write_bytes(gzip.compress(bad))
    rows, refs = read_rows(f"{shards}/*.jsonl.gz")
    assert [(r.source, r.line) for r in refs][-2:] == [(str(shards / "b.jsonl.gz"), 1), (str(shards / "b.jsonl.gz"), 3)]
    with pytest.raises(DataError, match=rf"^{shards}/b\.jsonl\.gz:3, row 1, field 'output': expected text"):
        _build(smollm2_dir, f"{shards}/*.jsonl.gz", "data.format=alpaca")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n{"a": \n'))
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz:2: invalid JSON"):
        read_rows(str(tmp_path / "broken.jsonl.gz"))
    (tmp_path / "truncated.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(ROWS))[:-12])
    with pytest.raises(DataError, match=r"truncated\.jsonl\.gz: cannot decompress \.gz file"):
        read_rows(str(tmp_path / "truncated.jsonl.gz"))


def test_a_bad_row_in_an_arrow_file_is_located_by_row(smollm2_dir, tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS + [{"instruction": "Hi", "input": "", "output": ""}]).save_to_disk(
        str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow, row 3, field 'output'"):
        _build(smollm2_dir, tmp_path / "saved", "data.format=alpaca")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"junk\.arrow: cannot read Arrow"):
        read_rows(str(tmp_path / "junk.arrow"))


def test_a_save_to_disk_folder_reads_only_the_files_its_state_lists(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    # `map` with a cache file leaves cache-*.arrow beside the data; they are not the dataset.
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "saved" / "cache-extra.parquet"))
    rows, refs = read_rows(str(tmp_path / "saved"))
    assert len(rows) == 3 and {r.source.rsplit("/", 1)[1] for r in refs} == {"data-00000-of-00001.arrow"}


def test_a_glob_matching_nothing_names_the_pattern_and_what_is_near(tmp_path):
    (tmp_path / "train-00000.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{tmp_path}/train-\*\.jsonl: no file matches the glob "
                                        rf"\(did you mean 'train-\*\.parquet'\?\); {tmp_path} holds train-00000.parquet"):
        read_rows(f"{tmp_path}/train-*.jsonl")
    (tmp_path / "shards").mkdir()
    with pytest.raises(DataError, match=r"no file matches the glob: there is no folder .*/shard \(did you mean 'shards'\?\)"):
        read_rows(f"{tmp_path}/shard/*.jsonl")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"the glob matches 1 path\(s\), none of them a"):
        read_rows(f"{tmp_path}/*.txt")
    with pytest.raises(ConfigError, match=r"a glob of files has only the split 'train', not 'test'"):
        read_rows(f"{tmp_path}/*.parquet", split="test")


def test_a_changed_shard_changes_the_cache_key(smollm2_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, row in enumerate(ROWS):
        (shards / f"part-{i}.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes([row])))
    glob = f"{shards}/*.jsonl.gz"
    before = _build(smollm2_dir, glob).stats["cache_key"]
    assert _build(smollm2_dir, glob).stats["cache_key"] == before
    changed = dict(ROWS[2], output="Joyful.")
    (shards / "part-2.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes([changed])))
    assert _build(smollm2_dir, glob).stats["cache_key"] != before
    (shards / "part-3.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes([changed])))  # a new shard counts too
    assert _build(smollm2_dir, glob).stats["cache_key"] != before


def test_zstd_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "rows.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    real_import = builtins.__import__

    def no_zstandard(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    with pytest.raises(DataError, match=r"rows\.jsonl\.zst: reading \.zst files needs the zstandard package: "
                                        r"pip install zstandard$"):
        read_rows(str(tmp_path / "rows.jsonl.zst"))


def test_zstd_rows_keep_their_lines(tmp_path):
    (tmp_path / "rows.jsonl.zst").write_bytes(_zstd(_jsonl_bytes(ROWS[:1]) + b"\n" + _jsonl_bytes(ROWS[1:])))
    rows, refs = read_rows(str(tmp_path / "rows.jsonl.zst"))
    assert rows == ROWS and [r.line for r in refs] == [1, 3, 4]


def test_data_datasets_paths_take_the_new_inputs(smollm2_dir, tmp_path):
    inputs = _write_inputs(tmp_path, ROWS)
    sources = [{"path": inputs["parquet glob"], "format": "alpaca"}, {"path": str(inputs["jsonl.gz"]), "weight": 2}]
    prepared = _build(smollm2_dir, None, f"data.datasets={json.dumps(sources)}")
    assert [(s["source"], s["rows"], s["used"]) for s in prepared.stats["sources"]] == [
        (inputs["parquet glob"], 3, 3), (str(inputs["jsonl.gz"]), 3, 6)]


# -- progress -----------------------------------------------------------------------------------
def test_progress_is_quiet_for_a_short_step_then_says_rows_per_second_and_time_left():
    from sft.engine.data.progress import Progress

    now, lines = [100.0], []
    progress = Progress("tokenizing", clock=lambda: now[0], say=lines.append)
    for t, fraction, rows in ((104.0, 0.1, 1000), (106.0, 0.2, 2000), (108.0, 0.3, 3000), (111.5, 0.5, 5000)):
        now[0] = t
        progress.update(fraction, rows)
    # Nothing in the first 5 s; then one line, and the next only 5 s later.
    assert lines == ["tokenizing: 2,000 rows (333 rows/s), about 24s left",
                     "tokenizing: 5,000 rows (435 rows/s), about 12s left"]


def test_reading_and_tokenizing_report_progress(smollm2_dir, tmp_path, monkeypatch):
    import functools

    import sft.engine.data.pipeline as pipeline
    import sft.engine.data.readers as readers
    import sft.engine.data.sources as sources
    from sft.engine.data.progress import Progress

    lines: list[str] = []
    eager = functools.partial(Progress, after=0, every=0, say=lines.append)
    monkeypatch.setattr(sources, "Progress", eager)
    monkeypatch.setattr(pipeline, "Progress", eager)
    monkeypatch.setattr(pipeline, "ENCODE_BATCH", 1)  # a batch a row, so three rows are three steps
    monkeypatch.setattr(readers, "SCAN_BLOCK", 1)  # a file's lines are scanned a block at a time: one byte here
    inputs = _write_inputs(tmp_path, ROWS)
    lines.clear()
    _build(smollm2_dir, inputs["jsonl.gz glob"])
    # Within a file as its blocks are scanned (a single 200 MB file is read for minutes), then at each file's end.
    shown = [line.split(" (")[0] + line.split(")")[1].removesuffix(", about 0s left") for line in lines]
    assert [line for k, line in enumerate(shown) if not k or line != shown[k - 1]] == [
        "reading data: 0 rows, 1/2 files", "reading data: 1 rows, 1/2 files", "reading data: 2 rows, 1/2 files",
        "reading data: 2 rows, 2/2 files", "reading data: 3 rows, 2/2 files",
        "preparing rows: 1 rows", "preparing rows: 2 rows", "preparing rows: 3 rows"]


def test_a_dataset_dict_with_split_names_of_its_own_is_all_training_data(tmp_path):
    import datasets

    datasets.DatasetDict({"chat": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    rows, refs = read_rows(str(tmp_path / "saved"))
    assert len(rows) == 3 and refs[0].source.endswith("chat/data-00000-of-00001.arrow")


def test_a_data_file_named_state_json_is_still_data(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps(ROWS))
    assert read_rows(str(folder))[0] == ROWS


@pytest.mark.parametrize("text", [b'\xef\xbb\xbf{"a": 1}\r\n\r\n  \t\n{"a": "\xc3\xa9"}\r{"a": 3}\n\n{"a": 4}',
                                  # no \r at all: line ends found by memchr, not the regex
                                  b'{"a": 1}\n\n  \t\n{"a": "\xc3\xa9"}\n{"a": 3}\n\n{"a": 4}'], ids=["mixed-ends", "newlines"])
@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 20])
def test_json_lines_are_found_whatever_the_scan_block(tmp_path, monkeypatch, block, text):
    # A file is scanned a block at a time: a \r\n, a blank line or a row may straddle two blocks.
    import sft.engine.data.readers as readers

    monkeypatch.setattr(readers, "SCAN_BLOCK", block)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(text)
    rows, refs = readers.read_file(path)
    assert list(rows) == [{"a": 1}, {"a": "é"}, {"a": 3}, {"a": 4}]
    assert [r.line for r in refs] == [1, 4, 5, 7] and [r.row for r in refs] == [0, 1, 2, 3]
    assert [rows[i] for i in range(len(rows))] == list(rows) and list(rows[1:3]) == [{"a": "é"}, {"a": 3}]


def test_table_rows_are_read_a_batch_at_a_time_as_the_whole_table_would_read(tmp_path):
    # Parquet, Arrow and hub datasets are Arrow tables: their rows are made Python objects as they are read.
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sft.engine.data.readers import TableRows, read_file
    from sft.engine.data.sources import Source, read_split

    rows = [{"instruction": f"Say {i}.", "output": str(i), "extra": {"n": i} if i % 3 else None} for i in range(2500)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=700)
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    hub = datasets.Dataset.from_list(rows).select(range(2499, -1, -1))  # with an index, as a shuffled split has
    read = {"parquet": read_file(tmp_path / "rows.parquet"), "arrow": read_file(tmp_path / "rows.arrow"),
            "hub": read_split(Source("org/rows", "hub", name="org/rows"), "train", "data.split", hub)}
    for name, (got, refs) in read.items():
        want = rows[::-1] if name == "hub" else rows
        assert isinstance(got, TableRows) and len(got) == len(refs) == 2500, name
        assert list(got) == want and got[1234] == want[1234] and got[-1] == want[-1], name
        assert list(got[100:1900:1]) == want[100:1900] and got[5:10:2] == want[5:10:2], name
        assert [r.row for r in refs[:3]] == [0, 1, 2] and refs[7].line is None, name
