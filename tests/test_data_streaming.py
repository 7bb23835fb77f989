"""data.streaming: rows read lazily and tokenized as training reads them (engine/data/streaming.py).

The streamed rows must be the cached pipeline's: the same token ids and trained-token masks in
the same order, the same counts and skipped rows, the same first error, on real JSONL (plain,
gzip, CRLF, blank lines, a line that is not UTF-8) and Parquet files, with chunks and read blocks
small enough that rows straddle them. What a stream cannot do is refused or said in one line.
"""

from __future__ import annotations

import gzip
import json

import pytest

from sft.core.errors import ConfigError, DataError
from sft.engine.data import build_datasets
from sft.engine.data import streaming
from sft.testing import run_sft, tiny_config, write_jsonl

from datakit import faulty_rows


def _rows(n: int) -> list[dict]:
    """Messages rows: good ones, long ones (some over max_seq_length), bad ones and unread columns."""
    return faulty_rows(n, words=37, empty=23, robot=29, unread=31)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows and read blocks of 64 bytes: rows and line breaks straddle both."""
    from sft.engine.data import readers

    monkeypatch.setattr(streaming, "CHUNK_ROWS", 7)
    monkeypatch.setattr(readers, "SCAN_BLOCK", 64)


def _config(tmp_path, model_dir, data, *extra):
    return tiny_config(tmp_path / "run", model_dir, "data.on_bad_row=skip", "data.max_bad_fraction=0.5",
                       "data.cache_dir=off", "model.max_seq_length=48", *extra, dataset=data)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _streamed(cfg, model_dir):
    rows, stats = streaming.stream_rows(cfg, None, _tokenizer(model_dir))
    rows = list(rows)
    return [r["input_ids"] for r in rows], [r["assistant_masks"] for r in rows], stats


def _cached(cfg, model_dir):
    prepared = build_datasets(cfg, None, _tokenizer(model_dir), use_cache=False, quiet=True)
    return prepared.train["input_ids"], prepared.train["assistant_masks"], prepared.stats


#: The counts that must agree between the cached pipeline and the stream.
COUNTS = ("rows", "train_rows", "eval_rows", "train_tokens", "trained_tokens", "max_tokens", "truncated",
          "truncated_dropped", "long_prompts", "fully_masked", "precut", "format", "template", "unread_columns")


def _assert_same(cached, streamed):
    ids, masks, stats = cached
    s_ids, s_masks, s_stats = streamed
    assert s_ids == ids
    assert s_masks == masks
    assert {k: s_stats.get(k) for k in COUNTS} == {k: stats.get(k) for k in COUNTS}
    assert s_stats["skipped"] == stats["skipped"]  # counts, reasons, and the examples in file order
    assert s_stats["complete"] and s_stats["streaming"]


def test_streamed_jsonl_rows_are_the_cached_rows(tiny_model_dir, tmp_path, small_chunks):
    rows = _rows(120)
    lines = [json.dumps(r) for r in rows]
    lines[40] = lines[40].replace("Question 40", "Question \xe9 40")
    text = "\r\n".join(lines[:60]) + "\n\n  \n" + "\n".join(lines[60:])  # CRLF, blank lines, no final newline
    data = text.encode("utf-8").replace("Question \xe9 40".encode(), b"Question \xe9 40")  # a latin-1 byte
    plain = tmp_path / "chat.jsonl"
    plain.write_bytes(b"\xef\xbb\xbf" + data)
    packed = tmp_path / "chat.jsonl.gz"
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbf" + data))
    for path in (plain, packed):
        for workers in (1, 2):
            cfg = _config(tmp_path, tiny_model_dir, path, f"data.num_proc={workers}")
            cached = _cached(cfg, tiny_model_dir)
            assert cached[2]["skipped"]["count"] > 8 and cached[2]["truncated_dropped"] > 5  # the file exercises both
            assert any("not valid UTF-8" in e for e in cached[2]["skipped"]["examples"])
            _assert_same(cached, _streamed(cfg, tiny_model_dir))


def test_streamed_parquet_rows_are_the_cached_rows(tiny_model_dir, tmp_path, small_chunks):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": r["messages"]} for r in _rows(80)]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=9)
    cfg = _config(tmp_path, tiny_model_dir, path)
    _assert_same(_cached(cfg, tiny_model_dir), _streamed(cfg, tiny_model_dir))


def test_a_bad_row_stops_the_stream_with_the_cached_message(tiny_model_dir, tmp_path, small_chunks):
    rows = [r for r in _rows(60) if "robot" not in json.dumps(r) and "   " not in json.dumps(r)]
    rows[33]["messages"][0]["role"] = "robot"
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = _config(tmp_path, tiny_model_dir, data, "data.on_bad_row=error")
    with pytest.raises(DataError) as cached:
        _cached(cfg, tiny_model_dir)
    with pytest.raises(DataError) as streamed:
        _streamed(cfg, tiny_model_dir)
    assert str(streamed.value) == str(cached.value)
    assert "chat.jsonl:34" in str(streamed.value)


def test_packed_sequences_are_the_cached_ones(tiny_model_dir, tmp_path):
    """TRL packs an IterableDataset 1,000 rows at a time, as it packs a Dataset: the same sequences."""
    import datasets
    from trl.data_utils import pack_dataset

    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"},
                          {"role": "assistant", "content": "ok " * (i % 7 + 1)}]} for i in range(2300)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)  # more than 2 of TRL's packing batches of 1,000 rows
    cfg = _config(tmp_path, tiny_model_dir, data)
    ids, masks, _stats = _cached(cfg, tiny_model_dir)
    s_ids, s_masks, _s_stats = _streamed(cfg, tiny_model_dir)
    cached = pack_dataset(datasets.Dataset.from_dict({"input_ids": ids, "labels": masks}), 96)
    streamed = pack_dataset(datasets.IterableDataset.from_generator(
        lambda: ({"input_ids": i, "labels": m} for i, m in zip(s_ids, s_masks)),
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                    "labels": datasets.List(datasets.Value("int8"))})), 96)
    assert list(streamed) == list(cached)
    assert len(cached) < len(ids) // 2  # rows were really packed together


def test_test_size_holds_out_the_first_rows(tiny_model_dir, tmp_path):
    rows = [r for r in _rows(40) if "robot" not in json.dumps(r) and "   " not in json.dumps(r)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = _config(tmp_path, tiny_model_dir, data, "data.test_size=5", "model.max_seq_length=256")
    prepared = streaming.build_streaming(cfg, None, _tokenizer(tiny_model_dir), quiet=True)
    whole = _streamed(_config(tmp_path, tiny_model_dir, data, "model.max_seq_length=256"), tiny_model_dir)
    assert prepared.eval["input_ids"] == whole[0][:5]
    held, _ = streaming.stream_rows(cfg, None, _tokenizer(tiny_model_dir))
    assert [r["input_ids"] for r in held] == whole[0][5:]
    assert prepared.train_conversations[0][0].content == rows[5]["messages"][0]["content"]


@pytest.mark.parametrize("overrides, key, words", [
    (["training.max_steps=-1"], "training.max_steps", "needs training.max_steps > 0"),
    (["data.test_size=0.1"], "data.test_size", "give a row count"),
    (["data.split=train[:10%]"], "data.split", "by row counts"),
])
def test_what_a_stream_cannot_do_is_refused_at_validate(tiny_model_dir, tmp_path, overrides, key, words):
    data = write_jsonl(tmp_path / "chat.jsonl", _rows(10))
    cfg = _config(tmp_path, tiny_model_dir, data, "data.streaming=true", *overrides)
    with pytest.raises(ConfigError) as exc:
        streaming.stream_rows(cfg, None, _tokenizer(tiny_model_dir))
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].key == key and words in exc.value.problems[0].message
    result = run_sft("validate", f"data.dataset={data}", f"model.name={tiny_model_dir}", "data.streaming=true",
                     "training.max_steps=5", *overrides, check=False)
    assert result.exit_code == 2 and key in result.output and words in result.output


def test_validate_reads_every_row_and_says_the_caveats(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", _rows(50))
    result = run_sft("validate", f"data.dataset={data}", f"model.name={tiny_model_dir}", "data.streaming=true",
                     "training.max_steps=5", "data.on_bad_row=skip", "data.max_bad_fraction=0.5",
                     "data.cache_dir=off", "model.max_seq_length=48")
    cfg = _config(tmp_path, tiny_model_dir, data)
    expected = streaming.describe_stats(_cached(cfg, tiny_model_dir)[2])
    assert f"data OK (streamed, every row read once): {expected}" in result.stdout
    for words in ("no global shuffle", "data cache is not used", "training.max_steps=5 bounds the run"):
        assert words in result.stderr


def test_a_streamed_run_trains_packed(tiny_model_dir, tmp_path):
    from sft.engine.metrics import read_metrics
    from sft.testing import train_tiny

    data = write_jsonl(tmp_path / "chat.jsonl", [r for r in _rows(60) if "robot" not in json.dumps(r)])
    run = train_tiny(tmp_path / "run", tiny_model_dir, "data.streaming=true", "training.packing=true",
                     "data.on_bad_row=skip", "data.max_bad_fraction=0.5", dataset=data)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 2 and summary["packed"] is True
    assert summary["dataset"]["streaming"] is True and summary["dataset"]["train_rows"] > 0
    assert summary["generation"]["prompt"] == "Question 0?"
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_a_streamed_run_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    """transformers' Trainer skips the batches a resumed run already trained on by reading the stream again
    (the same order: the shuffle buffer is seeded by training.seed): the run resumed from checkpoint-2 ends
    with the weights of the run that went straight through."""
    import shutil

    from safetensors.torch import load_file

    from sft.engine.run import run_training
    from sft.testing import train_tiny

    data = write_jsonl(tmp_path / "chat.jsonl", [r for r in _rows(60) if "robot" not in json.dumps(r)])
    overrides = ("data.streaming=true", "data.on_bad_row=skip", "data.max_bad_fraction=0.5", "training.save_steps=2",
                 "training.save_total_limit=3", "training.learning_rate=0.001")
    straight = train_tiny(tmp_path / "straight", tiny_model_dir, *overrides, dataset=data, steps=4)
    stopped = train_tiny(tmp_path / "stopped", tiny_model_dir, *overrides, dataset=data, steps=4)
    # As if killed just after checkpoint-2: what came later is gone.
    for later in ("adapter", "checkpoints/checkpoint-4"):
        shutil.rmtree(stopped / later)
    (stopped / "summary.json").unlink()
    run_training(tiny_config(stopped, tiny_model_dir, *overrides, dataset=data, steps=4), resume=True)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_from"].endswith("checkpoint-2")
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, stopped))
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name
