"""data.num_proc: the per-row stages in worker processes give what one process gives.

Equality, not speed: the tokenized rows, masks, counts, skipped rows (in order), warnings,
the eval split and the first error are the same with 1, 2 and 3 workers, on a file large
enough to be cut into chunks for several processes.
"""

from __future__ import annotations

import json

import pytest

from sft.core.errors import DataError
from sft.engine.data import build_datasets
from sft.engine.data.workers import MIN_ROWS_FOR_WORKERS
from sft.testing import tiny_config, write_jsonl

from datakit import faulty_rows



def _rows(n: int) -> list[dict]:
    """Messages rows of every kind the stages treat differently, spread over the whole file."""
    return faulty_rows(n, words=97, empty=101, robot=89, unread=61, undeclared_tool=53)


def _prepare(tiny_model_dir, tmp_path, data, workers: int, *extra: str, notices: list | None = None):
    from transformers import AutoTokenizer

    cfg = tiny_config(tmp_path / f"run{workers}", tiny_model_dir, "data.on_bad_row=skip", "data.max_bad_fraction=0.5",
                      "data.cache_dir=off", "data.test_size=0.1", "model.max_seq_length=64", f"data.num_proc={workers}",
                      *extra, dataset=data)
    return build_datasets(cfg, None, AutoTokenizer.from_pretrained(tiny_model_dir), quiet=True)


def _columns(dataset) -> dict:
    return {name: dataset[name] for name in ("input_ids", "assistant_masks")}


def test_workers_give_the_rows_masks_counts_and_skips_of_one_process(tiny_model_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "chat.jsonl", _rows(3 * MIN_ROWS_FOR_WORKERS))
    one = _prepare(tiny_model_dir, tmp_path, data, 1)
    one_err = capfd.readouterr().err
    assert one.stats["skipped"]["count"] > 10 and one.stats["truncated_dropped"] > 10  # the file exercises both
    assert one.stats["unread_columns"] == {"source (messages)": len(range(5, 3 * MIN_ROWS_FOR_WORKERS, 61))}
    assert "does not declare" in one_err or "get_time" in one_err  # the first warnings are printed
    for workers in (2, 3):
        many = _prepare(tiny_model_dir, tmp_path, data, workers)
        assert capfd.readouterr().err == one_err  # the same warnings, in the same order
        assert many.stats == one.stats  # counts, skip reasons and examples (in row order), tokens
        assert _columns(many.train) == _columns(one.train)
        assert _columns(many.eval) == _columns(one.eval)
        assert many.train_conversations == one.train_conversations
        assert many.eval_conversations == one.eval_conversations


def test_workers_stop_at_the_first_bad_row_of_the_file(tiny_model_dir, tmp_path):
    rows = _rows(3 * MIN_ROWS_FOR_WORKERS)
    # Bad rows only past the first chunk of every worker count: the error names the first of them, in file
    # order whatever the stage that finds it (row 700 fails to render, row 900 and 1300 fail their checks).
    rows = [r for r in rows if not any(bad in json.dumps(r) for bad in ("robot", "   ", "tool_calls"))]
    rows[700] = _rows(12)[11]  # a call of a tool: ChatML cannot render it
    rows[900]["messages"][1]["content"] = ""
    rows[1300]["messages"][0]["role"] = "robot"
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    messages = {}
    for first_bad in (700, 900):
        if first_bad == 900:
            rows[700] = rows[699]
            data = write_jsonl(tmp_path / "chat.jsonl", rows)
        for workers in (1, 2, 3):
            with pytest.raises(DataError) as info:
                _prepare(tiny_model_dir, tmp_path, data, workers, "data.on_bad_row=error", "data.test_size=0")
            messages[first_bad, workers] = str(info.value)
        assert messages[first_bad, 1] == messages[first_bad, 2] == messages[first_bad, 3]
    assert ":701, row 700" in messages[700, 1] and "cannot render" in messages[700, 1]
    assert ":901, row 900" in messages[900, 1] and "empty text" in messages[900, 1]


def test_a_template_that_never_finishes_in_a_worker_is_stopped(tmp_path, monkeypatch):
    # A forked worker has none of its parent's threads: it must start its own render watchdog.
    import time

    from sft.core import timelimit
    from sft.core.timelimit import TemplateTooSlow
    from sft.testing import make_tiny_llama

    monkeypatch.setattr(timelimit, "RENDER_SECONDS", 1.0)
    model = make_tiny_llama(tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m.content == 'LOOP' %}{% for i in range(100000) %}"
                               "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                               "<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    rows = _rows(2 * MIN_ROWS_FOR_WORKERS)
    rows[-3]["messages"][0]["content"] = "LOOP"  # in the last chunk, rendered by a worker
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    started = time.monotonic()
    with pytest.raises(TemplateTooSlow, match="took more than 1 s to render one conversation"):
        _prepare(model, tmp_path, data, 2, "template.name=tokenizer")
    assert time.monotonic() - started < 60
