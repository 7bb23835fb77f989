"""Sources, splits, eval sets, train_on and the content-addressed cache of the data pipeline."""

from __future__ import annotations

import shutil

import pytest

from sft.engine.data import build_datasets, read_rows
from sft.core.interfaces import Message
from sft.testing import write_jsonl

from datakit import FIXTURES, data_config, decoded_spans, fresh_tokenizer, piece_marking_tokenizer


def _build(model_dir, dataset, *overrides, tokenizer=None):
    return build_datasets(data_config(model_dir, dataset, *overrides), None, tokenizer or fresh_tokenizer(model_dir))


def _first_answers(prepared):
    return [next(m.content for m in c if m.role == "assistant") for c in prepared.train_conversations]


# -- sources ------------------------------------------------------------------------------------
def test_every_local_file_type_and_a_folder_of_them(smollm2_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, _ = read_rows(str(FIXTURES / "alpaca.jsonl"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    for source in (FIXTURES / "alpaca.jsonl", FIXTURES / "alpaca.csv", tmp_path / "alpaca.parquet"):
        prepared = _build(smollm2_dir, source)
        assert prepared.stats["format"] == "alpaca" and prepared.stats["train_rows"] == 3
    assert _first_answers(_build(smollm2_dir, tmp_path / "alpaca.parquet")) == ["Red, green and violet.",
                                                                                "The cat slept on the mat.", "Cheerful."]
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(FIXTURES / "alpaca.jsonl", folder / "part-a.jsonl")
    shutil.copy(FIXTURES / "alpaca.csv", folder / "part-b.csv")
    assert _build(smollm2_dir, folder).stats["train_rows"] == 6


def test_alpaca_input_is_appended_to_the_instruction(smollm2_dir):
    prepared = _build(smollm2_dir, FIXTURES / "alpaca.jsonl")
    assert prepared.train_conversations[1] == [
        Message("user", "Turn this sentence into the past tense.\n\nThe cat sleeps on the mat."),
        Message("assistant", "The cat slept on the mat.")]


def test_json_lines_saved_as_json_are_read(smollm2_dir, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text((FIXTURES / "messages.jsonl").read_text())
    assert _build(smollm2_dir, path).stats["format"] == "messages"


def test_the_packaged_default_dataset(smollm2_dir):
    prepared = _build(smollm2_dir, "sft:identity")
    assert prepared.stats["rows"] >= 50 and prepared.stats["format"] == "sharegpt"


def test_sharegpt_mapping_override_reads_other_keys_and_role_names(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": [{"speaker": "customer", "text": "Is it open?"},
                                                             {"speaker": "agent", "text": "Until six."}]}])
    prepared = _build(smollm2_dir, path, "data.format=sharegpt", "data.sharegpt.conversations_key=dialog",
                      "data.sharegpt.role_key=speaker", "data.sharegpt.content_key=text",
                      "data.sharegpt.user=[customer]", "data.sharegpt.assistant=[agent]")
    assert prepared.train_conversations == [[Message("user", "Is it open?"), Message("assistant", "Until six.")]]


def test_a_turns_keys_no_format_reads_are_counted_and_plain_turns_pass(smollm2_dir, tmp_path):
    """A turn with just the role and content keys is skipped quickly; any other set key is counted."""
    turns = [{"from": "human", "value": "Hi", "weight": 0}, {"value": "Hello", "from": "gpt", "note": None}]
    plain = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": turns}, {"conversations": plain},
                                                 {"conversations": [plain[0], {**plain[1], "loss": 1}]}])
    assert _build(smollm2_dir, path).stats["unread_columns"] == {"conversations[].weight (sharegpt)": 1,
                                                                 "conversations[].loss (sharegpt)": 1}


# -- splits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, answers", [
    ("train[:2]", ["Red, green and violet.", "The cat slept on the mat."]),
    ("train[1:]", ["The cat slept on the mat.", "Cheerful."]),
    ("train[-1:]", ["Cheerful."]),
    ("train[:34%]", ["Red, green and violet."]),
])
def test_split_slicing(split, answers, smollm2_dir):
    prepared = _build(smollm2_dir, FIXTURES / "alpaca.jsonl", f"data.split={split}")
    assert _first_answers(prepared) == answers and prepared.stats["rows"] == len(answers)


def test_test_size_fraction_and_count_are_seeded(smollm2_dir, tmp_path):
    rows = [{"instruction": f"Say the number {i}.", "output": f"{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "numbers.jsonl", rows)
    a = _build(smollm2_dir, path, "data.test_size=0.25", "training.seed=1")
    b = _build(smollm2_dir, path, "data.test_size=5.0", "training.seed=1")
    c = _build(smollm2_dir, path, "data.test_size=5.0", "training.seed=2")
    assert (a.stats["train_rows"], a.stats["eval_rows"]) == (15, 5)
    assert a.eval_conversations == b.eval_conversations  # same seed, same rows
    assert b.eval_conversations != c.eval_conversations
    evals = {m.content for conv in b.eval_conversations for m in conv}
    assert not evals & {m.content for conv in b.train_conversations for m in conv}
    assert len(b.eval) == 5 and b.eval.column_names == ["input_ids", "assistant_masks"]


def test_eval_split_from_a_folder_or_a_file(smollm2_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": "One?", "output": "1"}, {"instruction": "Two?", "output": "2"}])
    write_jsonl(tmp_path / "test.jsonl", [{"instruction": "Three?", "output": "3"}])
    prepared = _build(smollm2_dir, tmp_path, "data.eval_split=test")
    assert (prepared.stats["train_rows"], prepared.stats["eval_rows"]) == (2, 1)
    assert prepared.eval_conversations[0][0].content == "Three?"
    other = _build(smollm2_dir, tmp_path / "train.jsonl", f"data.eval_split={tmp_path / 'test.jsonl'}")
    assert other.eval_conversations == prepared.eval_conversations


# -- masks ----------------------------------------------------------------------------------------
def test_train_on_all_trains_every_token(smollm2_dir):
    tokenizer = fresh_tokenizer(smollm2_dir)
    prepared = _build(smollm2_dir, FIXTURES / "messages.jsonl", "data.train_on=all", tokenizer=tokenizer)
    row = prepared.train[1]
    assert set(row["assistant_masks"]) == {1}
    assert decoded_spans(row["input_ids"], row["assistant_masks"], tokenizer) == [
        "<|im_start|>system\nAnswer in one short sentence.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\nAir scatters blue light more than red light.<|im_end|>\n"]
    assert prepared.stats["trained_tokens"] == prepared.stats["train_tokens"]


def test_an_answer_is_tokenized_as_it_is_generated_after_its_prompt(smollm2_dir):
    from sft.core.interfaces import Segment
    from sft.core.templating import encode_rendered

    # "x=" + "=y": BPE would make one token "==" of the prompt's "=" and the answer's "=". At
    # inference the prompt "x=" is tokenized alone and the model generates "=", "y": that is
    # what is trained, and the prompt keeps its own last token.
    tokenizer = fresh_tokenizer(smollm2_dir)
    assert [tokenizer.decode([i]) for i in tokenizer("x==y")["input_ids"]] == ["x", "==", "y"]
    [(ids, mask)] = encode_rendered(tokenizer, [[Segment("x=", False), Segment("=y", True)]])
    assert [tokenizer.decode([i]) for i in ids] == ["x", "=", "=", "y"]
    assert mask == [0, 0, 1, 1]
    # The end of an answer merging with what follows stays one token, trained: it produces answer text.
    [(ids, mask)] = encode_rendered(tokenizer, [[Segment("x", False), Segment("y=", True), Segment("=z", False)]])
    assert [tokenizer.decode([i]) for i in ids] == ["x", "y", "==", "z"]
    assert mask == [0, 1, 1, 0]


def test_straddled_answer_starts_are_found_whatever_the_order_of_the_spans():
    """The one-pass search agrees with the definition (a token's span begins before an answer's start
    and ends after it) on random rows, with spans in order or not (a tokenizer need not order them)."""
    import random

    import numpy as np

    from sft.core.templating import _straddled_answer_starts

    rng = random.Random(0)
    for _ in range(3000):
        flags = [int(rng.random() < 0.4) for _ in range(rng.randint(0, 30))]
        spans = [(a, rng.randint(a, min(len(flags), a + 5))) for a in (rng.randint(0, len(flags))
                                                                        for _ in range(rng.randint(0, 12)))]
        if rng.random() < 0.5:
            spans.sort()
        starts = [b for b in range(1, len(flags)) if flags[b] and not flags[b - 1]]
        expected = [b for b in starts if any(s < b < e for s, e in spans)]
        found = _straddled_answer_starts(np.array(flags, dtype=np.int32), np.array(spans, dtype=np.int64).reshape(-1, 2))
        assert found == expected, (flags, spans)

def test_a_tokenizer_that_marks_each_piece_keeps_the_whole_text_encoding():
    """A SentencePiece-style tokenizer prefixes every separately encoded piece with a word boundary."""
    from sft.core.interfaces import Segment
    from sft.core.templating import encode_rendered

    tokenizer = piece_marking_tokenizer()
    [(ids, mask)] = encode_rendered(tokenizer, [[Segment("x=", False), Segment("=y", True)]])
    assert tokenizer.decode(ids) == "x==y"
    # in pieces it would decode as "x= =y"; the whole text's tokens are kept, the straddling "==" trained
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids] == ["\u2581", "x", "==", "y"]
    assert mask == [0, 0, 1, 1]


# -- cache ----------------------------------------------------------------------------------------
def test_cache_hit_returns_the_same_data(smollm2_dir, tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    first = _build(smollm2_dir, FIXTURES / "sharegpt.json", cache, "data.test_size=1.0")
    second = _build(smollm2_dir, FIXTURES / "sharegpt.json", cache, "data.test_size=1.0")
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert first.train["input_ids"] == second.train["input_ids"]
    assert first.eval["assistant_masks"] == second.eval["assistant_masks"]
    assert first.train_conversations == second.train_conversations
    assert first.eval_conversations == second.eval_conversations
    assert {k: v for k, v in first.stats.items() if k != "cache"} == {k: v for k, v in second.stats.items() if k != "cache"}


def test_a_conversation_comes_back_from_storage_as_the_format_made_it(smollm2_dir, tmp_path):
    """Between the stages and in the cache a conversation is JSON text; plain turns are read back by a
    shortcut, the others (tool calls, a result's id and name, reasoning, the row's tools) field by field."""
    from sft.plugins.datasets.messages import Messages

    tool = {"type": "function", "function": {"name": "weather", "description": "d", "parameters": {"type": "object"}}}
    row = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Ask the tool.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1", "name": "weather"},
        {"role": "assistant", "content": "Sunny."}], "tools": [tool]}
    expected = Messages().to_conversation(row)
    path = write_jsonl(tmp_path / "tools.jsonl", [row])
    for cache in ("off", str(tmp_path / "cache"), str(tmp_path / "cache")):  # stages only; cache miss; cache hit
        prepared = _build(smollm2_dir, path, "template.name=qwen3", f"data.cache_dir={cache}", "data.test_size=0")
        assert prepared.train_conversations == [expected] and prepared.train_conversations[0].tools == [tool]
    assert prepared.stats["cache"] == "hit"

def _key(model_dir, dataset, *overrides, tokenizer=None):
    return _build(model_dir, dataset, *overrides, tokenizer=tokenizer).stats["cache_key"]


def test_cache_key_changes_with_the_data_file_contents(smollm2_dir, tmp_path):
    path = tmp_path / "chat.json"
    shutil.copy(FIXTURES / "sharegpt.json", path)
    before = _key(smollm2_dir, path)
    path.write_text(path.read_text().replace("About 5 ml.", "About 5 millilitres."))
    assert _key(smollm2_dir, path) != before


def test_cache_key_changes_with_the_format_name_version_and_options(smollm2_dir, monkeypatch, sft_plugin_manager):
    from sft.core import hookimpl
    from sft.plugins.datasets.sharegpt import ShareGPT

    class Renamed(ShareGPT):
        name = "sharegpt_copy"  # the same reader under another name

    class Plugin:
        @hookimpl
        def register_dataset_formats(self, register):
            register(Renamed())

    sft_plugin_manager.register(Plugin(), "renamed-format")
    base = _key(smollm2_dir, FIXTURES / "sharegpt.json", "data.format=sharegpt")
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json", "data.format=sharegpt_copy") != base
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json", "data.format=sharegpt",
                "data.sharegpt.system=[system,sys]") != base
    monkeypatch.setattr(ShareGPT, "version", ShareGPT.version + ".next")
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json", "data.format=sharegpt") != base


def test_cache_key_changes_with_the_template_name_and_version(smollm2_dir, monkeypatch):
    from sft.plugins.templates.chatml import ChatML

    base = _key(smollm2_dir, FIXTURES / "sharegpt.json")
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json", "template.name=phi3") != base
    monkeypatch.setattr(ChatML, "version", ChatML.version + ".next")
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json") != base


def test_cache_key_changes_with_the_tokenizer(smollm2_dir):
    base = _key(smollm2_dir, FIXTURES / "sharegpt.json")
    tokenizer = fresh_tokenizer(smollm2_dir)
    tokenizer.add_tokens(["<|new_token|>"], special_tokens=True)
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json", tokenizer=tokenizer) != base


@pytest.mark.parametrize("override", ["model.max_seq_length=64", "data.train_on=all", "data.on_bad_row=skip",
                                      "data.test_size=1.0", "data.split=train[:2]"])
def test_cache_key_changes_with_length_masking_and_split_options(override, smollm2_dir):
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json", override) != _key(smollm2_dir, FIXTURES / "sharegpt.json")


def test_cache_key_is_stable(smollm2_dir, tmp_path):
    copy = tmp_path / "same.json"
    copy.write_text((FIXTURES / "sharegpt.json").read_text())
    assert _key(smollm2_dir, FIXTURES / "sharegpt.json") == _key(smollm2_dir, copy)  # contents, not paths


def test_the_backend_fast_path_tokenizes_like_the_tokenizer_call(smollm2_dir):
    from sft.core.templating import resolve_template
    from sft.core.templating import encode_rendered, segments_text

    tokenizer = fresh_tokenizer(smollm2_dir)
    prepared = _build(smollm2_dir, FIXTURES / "sharegpt.json", tokenizer=tokenizer)
    template = resolve_template(data_config(smollm2_dir, FIXTURES / "sharegpt.json"))
    rendered = [template.render(c, tokenizer) for c in prepared.train_conversations]
    fast = encode_rendered(tokenizer, rendered)
    assert [ids for ids, _ in fast] == tokenizer([segments_text(r) for r in rendered],
                                                 add_special_tokens=False)["input_ids"]
    tokenizer.backend_tokenizer.enable_truncation(100_000)  # any backend state sends it through tokenizer(...)
    assert encode_rendered(tokenizer, rendered) == fast


def test_an_unwritable_cache_is_reported_and_the_run_goes_on(smollm2_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    prepared = _build(smollm2_dir, FIXTURES / "sharegpt.json", f"data.cache_dir={blocker / 'cache'}")
    assert prepared.stats["train_rows"] == 3
    assert "data: not caching the tokenized dataset" in capsys.readouterr().err


def test_a_damaged_cache_entry_is_rebuilt(smollm2_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _build(smollm2_dir, FIXTURES / "sharegpt.json", f"data.cache_dir={cache}")
    entry = cache / first.stats["cache_key"]
    (entry / "meta.json").write_text("{truncated")
    again = _build(smollm2_dir, FIXTURES / "sharegpt.json", f"data.cache_dir={cache}")
    assert again.stats["cache"] == "miss" and again.train["input_ids"] == first.train["input_ids"]
    assert _build(smollm2_dir, FIXTURES / "sharegpt.json", f"data.cache_dir={cache}").stats["cache"] == "hit"


KILLED_WRITER = """
import sys, time
from transformers import AutoTokenizer
from sft.engine.configuration import load_config
from sft.engine.data import build_datasets
from sft.engine.data import spool

copy_to = spool.Spool.copy_to

def copy_and_hang(self, dest):
    copy_to(self, dest)  # the rows are in the staging folder: the entry is half written from here on
    open(sys.argv[2], "w").close()
    time.sleep(600)

spool.Spool.copy_to = copy_and_hang
cfg = load_config(overrides=[f"data.dataset={sys.argv[1]}", f"model.name={sys.argv[3]}", f"data.cache_dir={sys.argv[4]}"])
build_datasets(cfg, None, AutoTokenizer.from_pretrained(sys.argv[3]), quiet=True)
"""


def test_a_writer_killed_during_the_cache_write_leaves_no_half_entry(smollm2_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    cache, hanging = tmp_path / "cache", tmp_path / "hanging"
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": f"Q{i}?"},
                                                               {"role": "assistant", "content": f"A{i}."}]}
                                                 for i in range(50)])
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(data), str(hanging), str(smollm2_dir), str(cache)],
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not hanging.exists():
            if writer.poll() is not None or time.monotonic() > deadline:
                writer.kill()
                pytest.fail(f"the writer never reached the cache write: {writer.communicate()[1][-2000:]}")
            time.sleep(0.2)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    left = list(cache.iterdir())
    assert len(left) == 1 and left[0].name.endswith(".partial")  # the staging folder, never an entry
    prepared = _build(smollm2_dir, data, f"data.cache_dir={cache}")
    assert prepared.stats["cache"] == "miss"  # nothing half-written was read
    assert [p.name for p in cache.iterdir()] == [prepared.stats["cache_key"]]  # the dead writer's folder is gone
    again = _build(smollm2_dir, data, f"data.cache_dir={cache}")
    assert again.stats["cache"] == "hit" and again.train["input_ids"] == prepared.train["input_ids"]
    assert list(again.train_conversations) == list(prepared.train_conversations)
