"""The columns of peer data files (LLaMA-Factory, ms-swift) are read, refused clearly, or counted: never dropped silently.

Real files from the shared peer data (see its SOURCES.md): ms-swift's ``query/response/history/system``
rows, LLaMA-Factory's vision demo (``images``) and its v1 demo (content parts), FastChat's
ShareGPT rows (an ``id`` column no format reads).
"""

from __future__ import annotations

import json

import pytest

from sft.core.errors import DataError
from sft.engine.data import build_datasets
from sft.testing import write_jsonl

from datakit import REAL_SHAREGPT, SHARED, data_config, decoded_spans, fresh_tokenizer

PEER = SHARED / "peerdata"
pytestmark = pytest.mark.skipif(not PEER.is_dir(), reason="the shared peer data is absent")


def _build(model_dir, dataset, *overrides):
    tokenizer = fresh_tokenizer(model_dir)
    return build_datasets(data_config(model_dir, dataset, *overrides), None, tokenizer), tokenizer


def test_alpaca_history_and_system_are_read_and_every_answer_is_trained(tiny_model_dir, capsys):
    """ms-swift's rows, mapped with LLaMA-Factory's column names: the history's answers train too."""
    source = PEER / "msswift" / "train.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    prepared, tokenizer = _build(tiny_model_dir, source, "data.format=alpaca", "data.alpaca.prompt=query",
                                 "data.alpaca.response=response")
    first = prepared.train_conversations[0]
    assert [m.role for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[0].content == rows[0]["system"] and first[1].content == rows[0]["history"][0][0]
    spans = decoded_spans(prepared.train[0]["input_ids"], prepared.train[0]["assistant_masks"], tokenizer)
    assert spans == [rows[0]["history"][0][1] + "<|im_end|>", rows[0]["response"] + "<|im_end|>"]
    assert prepared.stats["unread_columns"] == {}
    assert "does not read" not in capsys.readouterr().err


def test_a_sharegpt_system_column_is_the_system_prompt(tiny_model_dir, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
             "system": "You are Forge."}]
    prepared, _ = _build(tiny_model_dir, write_jsonl(tmp_path / "chat.jsonl", rows))
    assert [(m.role, m.content) for m in prepared.train_conversations[0]][0] == ("system", "You are Forge.")
    both = [{**rows[0], "conversations": [{"from": "system", "value": "S"}, *rows[0]["conversations"]]}]
    with pytest.raises(DataError, match=r"row 0, field 'system': the row has both a 'system' column and a system turn"):
        _build(tiny_model_dir, write_jsonl(tmp_path / "both.jsonl", both))


def test_rows_with_images_are_refused_clearly(tiny_model_dir, tmp_path):
    """LLaMA-Factory's mllm_demo: the <image> marker would otherwise be trained as text."""
    source = PEER / "llamafactory" / "mllm_demo.json"
    with pytest.raises(DataError, match=r"row 0, field 'images': this row carries images .* text-only"):
        _build(tiny_model_dir, source)
    alpaca = [{"instruction": "Describe <image>", "output": "A cat.", "images": ["cat.jpg"]}]
    with pytest.raises(DataError, match=r"field 'images': this row carries images"):
        _build(tiny_model_dir, write_jsonl(tmp_path / "vision.jsonl", alpaca))


def test_content_part_lists_are_read_and_non_text_parts_refused(tiny_model_dir, tmp_path):
    """LLaMA-Factory's v1 demo writes every content as parts ({"type": "text", "value": ...}); OpenAI uses "text"."""
    source = PEER / "llamafactory" / "v1_sft_demo.jsonl"
    first = json.loads(source.read_text(encoding="utf-8").splitlines()[0])
    prepared, tokenizer = _build(tiny_model_dir, source, "data.test_size=0")
    assert prepared.train_conversations[0][0].content == first["messages"][0]["content"][0]["value"]
    # Its per-message loss_weight is not read: counted, not dropped silently.
    assert prepared.stats["unread_columns"] == {"messages[].loss_weight (messages)": 500}
    openai = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}]
    prepared, tokenizer = _build(tiny_model_dir, write_jsonl(tmp_path / "parts.jsonl", openai))
    assert [m.content for m in prepared.train_conversations[0]] == ["Hi there", "Hello!"]
    image = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                           {"role": "assistant", "content": "A cat."}]}]
    with pytest.raises(DataError, match=r"field 'messages\[0\].content\[0\]': a content part of type 'image_url'"):
        _build(tiny_model_dir, write_jsonl(tmp_path / "image.jsonl", image))
    # A misspelt key or type is named as such, not as a part sft cannot read.
    for part, said in (({"type": "text", "txt": "Hi"}, r"a text part has no text under 'text' or 'value' \(present: type, txt\)"),
                       ({"type": "txt", "text": "Hi"}, r"a content part of type 'txt' \(did you mean 'text'\?\)")):
        rows = [{"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "A cat."}]}]
        with pytest.raises(DataError, match=said):
            _build(tiny_model_dir, write_jsonl(tmp_path / "typo.jsonl", rows))


def test_a_speakers_name_is_counted_as_unread_and_a_tool_results_is_read(tiny_model_dir, tmp_path):
    """No template renders a user's `name` (OpenAI's multi-user field); a tool result's names its call."""
    rows = [{"messages": [{"role": "user", "content": "Hi", "name": "bob"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "name": ""}]}]
    prepared, _ = _build(tiny_model_dir, write_jsonl(tmp_path / "named.jsonl", rows))
    assert prepared.stats["unread_columns"] == {"messages[].name (messages)": 1}


def test_a_column_no_format_reads_is_counted_and_named(tiny_model_dir, capsys):
    """FastChat's ShareGPT rows carry an `id`; it is not trained, and the run says so."""
    if not REAL_SHAREGPT.exists():
        pytest.skip("the shared data is absent")
    rows = json.loads(REAL_SHAREGPT.read_text(encoding="utf-8"))
    prepared, _ = _build(tiny_model_dir, REAL_SHAREGPT)
    assert prepared.stats["unread_columns"] == {"id (sharegpt)": sum(1 for r in rows if r.get("id"))}
    err = capsys.readouterr().err
    assert "column(s) the format does not read, not trained: 'id (sharegpt)' in" in err


def test_llamafactory_v1_parts_carry_reasoning_and_tool_calls(tiny_model_dir):
    """reason_tool_use_demo_50: assistant turns are reasoning, text and tool_call parts."""
    from sft.core.plugins import get_plugin_manager

    source = PEER / "llamafactory" / "reason_tool_use_demo_50.jsonl"
    row = json.loads(source.read_text(encoding="utf-8").splitlines()[1])
    conversation = get_plugin_manager().get("dataset_format", "messages").to_conversation(row)
    answer = conversation[2]
    parts = row["messages"][2]["content"]
    assert answer.reasoning == parts[0]["value"] and answer.content == ""
    assert [(c.name, c.arguments) for c in answer.tool_calls] == [("get_movie_details", {"title": "Inception"})]
    assert conversation.tools and conversation[3].role == "tool"
