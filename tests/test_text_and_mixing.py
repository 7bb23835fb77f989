"""Raw-text data (the ``text`` and ``completion`` formats) and several datasets in one run (``data.datasets``)."""

from __future__ import annotations

import json

import pytest

from sft.engine.data import build_datasets, describe_stats
from sft.engine.configuration import load_config
from sft.core.errors import ConfigError
from sft.testing import train_tiny, write_jsonl

from datakit import FIXTURES, SHARED, data_config, decoded_spans, fresh_tokenizer

COMPLETIONS = [{"prompt": "The capital of France is", "completion": " Paris."},
               {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}]


def _texts(prepared, tokenizer, i=0):
    row = prepared.train[i]
    return tokenizer.decode(row["input_ids"]), decoded_spans(row["input_ids"], row["assistant_masks"], tokenizer)


def test_text_rows_train_every_token_with_no_chat_template(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Iron glows in the forge.\nThe smith shapes it."}])
    tokenizer = fresh_tokenizer(tiny_model_dir)
    prepared = build_datasets(data_config(tiny_model_dir, path), None, tokenizer)  # format auto finds `text`
    assert prepared.stats["format"] == "text"
    text, trained = _texts(prepared, tokenizer)
    assert text == "Iron glows in the forge.\nThe smith shapes it.<|im_end|>"  # no <|im_start|>: no template
    assert trained == [text]
    assert prepared.train_conversations == [[]]  # no conversation: the quick generation skips raw rows


def test_a_text_row_longer_than_max_seq_length_is_split_into_windows_not_dropped(tiny_model_dir, tmp_path, capsys):
    """LLaMA-Factory's c4 demo (continued pre-training): its long documents are read whole, window by window."""
    source = SHARED / "peerdata" / "llamafactory" / "c4_demo.jsonl"
    if not source.exists():
        pytest.skip("the shared peer data is absent")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()[:40]]
    path = write_jsonl(tmp_path / "c4.jsonl", rows)
    tokenizer = fresh_tokenizer(tiny_model_dir)
    prepared = build_datasets(data_config(tiny_model_dir, path, "model.max_seq_length=256"), None, tokenizer)
    lengths = [len(tokenizer(r["text"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]) for r in rows]
    long_docs = sum(n > 256 for n in lengths)
    assert long_docs and prepared.stats["chunked"] == long_docs and prepared.stats["truncated_dropped"] == 0
    assert prepared.stats["max_tokens"] <= 256
    # Every token of every document is trained once, in order: the windows put together are the documents.
    ids = [t for row in prepared.train["input_ids"] for t in row]
    assert len(ids) == sum(n - (n % 256 == 1) for n in lengths)
    assert all(all(m) for m in prepared.train["assistant_masks"])
    assert tokenizer.decode(ids).startswith(rows[0]["text"])
    assert f"split {long_docs} text row(s) longer than model.max_seq_length" in capsys.readouterr().err


@pytest.mark.parametrize("train_on, expected", [("assistant", [" Paris.<|im_end|>"]),
                                                ("all", ["The capital of France is Paris.<|im_end|>"])])
def test_completion_rows_train_the_completion_or_everything(tiny_model_dir, tmp_path, train_on, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", COMPLETIONS)
    tokenizer = fresh_tokenizer(tiny_model_dir)
    prepared = build_datasets(data_config(tiny_model_dir, path, f"data.train_on={train_on}"), None, tokenizer)
    assert prepared.stats["format"] == "completion"
    text, trained = _texts(prepared, tokenizer)
    assert text == "The capital of France is Paris.<|im_end|>" and trained == expected
    # Indentation and newlines of a completion survive as they are. BPE would make one token of
    # the prompt's newline and the completion's indentation ("\n    "); the row is encoded split at
    # the completion's start, as it is generated after its prompt, so exactly the completion trains.
    second = _texts(prepared, tokenizer, 1)
    assert second[0] == "def add(a, b):\n    return a + b\n<|im_end|>"
    assert second[1] == ([second[0]] if train_on == "all" else ["    return a + b\n<|im_end|>"])


def test_a_bad_raw_row_is_located(tiny_model_dir, tmp_path):
    from sft.core.errors import DataError

    path = write_jsonl(tmp_path / "pairs.jsonl", [COMPLETIONS[0], {"prompt": "x", "completion": None}])
    with pytest.raises(DataError, match=rf"{path}:2, row 1, field 'completion': null value"):
        build_datasets(data_config(tiny_model_dir, path), None, fresh_tokenizer(tiny_model_dir))


def _mixed(tiny_model_dir, tmp_path, *overrides):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", COMPLETIONS * 5)  # 10 rows
    sources = [{"path": str(FIXTURES / "alpaca.jsonl"), "format": "alpaca"},
               {"path": str(pairs), "weight": 0.5},
               {"path": "sft:identity", "split": "train[:4]", "weight": 2}]
    return data_config(tiny_model_dir, None, f"data.datasets={json.dumps(sources)}", *overrides)


def test_several_datasets_mix_with_their_own_formats_weights_and_a_stated_seed(tiny_model_dir, tmp_path):
    cfg = _mixed(tiny_model_dir, tmp_path)
    tokenizer = fresh_tokenizer(tiny_model_dir)
    prepared = build_datasets(cfg, None, tokenizer)
    sources = prepared.stats["sources"]
    assert [(s["format"], s["weight"], s["used"]) for s in sources] == [
        ("alpaca", 1.0, sources[0]["rows"]), ("completion", 0.5, 5), ("sharegpt", 2.0, 8)]
    assert prepared.stats["train_rows"] == sources[0]["rows"] + 5 + 8 and prepared.stats["mix_seed"] == 3407
    lines = describe_stats(prepared.stats).splitlines()
    assert lines[0] == "3 datasets mixed with seed 3407 (training.seed):"
    assert "pairs.jsonl (completion, train): 10 rows, skipped 0, weight 0.5 → 5 used" in lines[2]
    # The same seed draws the same rows; another seed may not, and changes the cache key.
    again = build_datasets(_mixed(tiny_model_dir, tmp_path), None, fresh_tokenizer(tiny_model_dir))
    assert again.train["input_ids"] == prepared.train["input_ids"]
    other = build_datasets(_mixed(tiny_model_dir, tmp_path, "training.seed=1"), None, fresh_tokenizer(tiny_model_dir))
    assert other.stats["cache_key"] != prepared.stats["cache_key"]


def test_a_mixed_source_with_a_bad_format_or_weight_is_a_config_error(tiny_model_dir):
    sources = [{"path": "a.jsonl", "format": "alpacca"}, {"path": "b.jsonl", "weight": 0}]
    with pytest.raises(ConfigError) as err:
        data_config(tiny_model_dir, None, f"data.datasets={json.dumps(sources)}", "data.eval_split=test")
    text = str(err.value)
    assert "data.datasets[0].format: unknown dataset format 'alpacca' (did you mean 'alpaca'?)" in text
    assert "data.datasets[1].weight: must be a number > 0 and <= 1000, got 0.0" in text and "data.eval_split: is for data.dataset" in text


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "-1", "1e9"])
def test_a_weight_that_is_not_a_finite_bounded_number_is_a_config_error(tiny_model_dir, weight):
    with pytest.raises(ConfigError) as err:
        data_config(tiny_model_dir, None, f"data.datasets=[{{path: a.jsonl}}, {{path: b.jsonl, weight: {weight}}}]")
    assert str(err.value).splitlines()[1:] == [
        f"  - data.datasets[1].weight: must be a number > 0 and <= 1000, got {float(weight)}"]


def test_data_dataset_format_and_split_are_refused_beside_data_datasets(tiny_model_dir, tmp_path):
    """--dataset given with a YAML that lists data.datasets would be silently unread; so would data.format/split."""
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text("data:\n  datasets: [{path: a.jsonl}, {path: b.jsonl, weight: 0.5}]\n  format: alpaca\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(yaml_file), ["data.split=train[:10]"], {"data.dataset": "c.jsonl"})
    assert sorted(str(err.value).splitlines()[1:]) == [
        f"  - data.{key}: is replaced by data.datasets, which is given too: give each source its own "
        f"{'path' if key == 'dataset' else key} there, or leave data.datasets out" for key in ("dataset", "format", "split")]
    assert load_config(str(yaml_file), ["data.format=auto"]).data.datasets[1].weight == 0.5
    # A run saved before this was refused stays usable (sft export, eval): the keys were unread then.
    from sft.engine.configuration import load_run_config

    assert load_run_config(yaml_file, loads_model=False).data.format == "auto"


def test_a_float_setting_that_is_not_finite_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError) as err:
        data_config(tiny_model_dir, "unused", "training.learning_rate=nan", "training.warmup_ratio=inf")
    text = str(err.value)
    assert "training.learning_rate: must be a finite number, got nan" in text
    assert "training.warmup_ratio: must be a finite number, got inf" in text


def test_a_run_trains_on_completion_data(tiny_model_dir, tmp_path):
    run = train_tiny(tmp_path / "run", tiny_model_dir, dataset=write_jsonl(tmp_path / "p.jsonl", COMPLETIONS * 2))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["dataset"]["format"] == "completion"
    assert summary["generation"]["prompt"] is None  # raw rows have no user turn to ask
