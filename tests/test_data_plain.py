"""Plain rows (engine/data/plain.py): the shortcut for turns of plain text gives what the general path gives.

The general path is what a format or template without the optional parts gets (``DatasetFormat.plain_turns``
and ``ChatTemplate.render_plain`` return None by default): a ``Message`` per turn, checked by
``validate_conversation``, ``Segment`` objects, and every token's offsets (``encode_rendered``). The tokens,
masks, stored conversations, counts and bad rows (their messages, in order) must be the same byte for byte.
"""

from __future__ import annotations

import json
import random

import pytest

from sft.core.interfaces import ChatTemplate, DatasetFormat, Message
from sft.core.plugins import get_plugin_manager
from sft.core.templating import TurnTemplate, encode_rendered, resolve_template
from sft.engine.data import pipeline, plain
from sft.engine.data.longrows import LongRows
from sft.engine.data.plain import Pieces
from sft.engine.data.readers import RowRef

from datakit import REAL_SHAREGPT, data_config, fresh_tokenizer, piece_marking_tokenizer

PM = get_plugin_manager()
ROLES = {"human": "user", "gpt": "assistant", "system": "system", "observation": "tool"}


class OnlyConversations(DatasetFormat):
    """A third-party format: ``to_conversation`` (and ``unread``) only, as ``inner`` reads a row, under its name."""

    def __init__(self, inner: DatasetFormat):
        self.inner, self.name = inner, inner.name

    def to_conversation(self, row, options=None):
        return self.inner.to_conversation(row, options)

    def unread(self, row, options=None):
        return self.inner.unread(row, options)


class OnlyRender(ChatTemplate):
    """A third-party template with only the required parts, rendering as ``inner`` does, under its name."""

    def __init__(self, inner: ChatTemplate):
        self.inner, self.name = inner, inner.name

    def render(self, messages, tokenizer=None):
        return self.inner.render(messages, tokenizer)

    def generation_prompt(self, messages, tokenizer=None):
        return self.inner.generation_prompt(messages, tokenizer)

    def stop_tokens(self, tokenizer=None):
        return self.inner.stop_tokens(tokenizer)

    def jinja(self, tokenizer=None):
        return self.inner.jinja(tokenizer)

    def ollama_template(self, tokenizer=None):
        return self.inner.ollama_template(tokenizer)


def _sharegpt_rows() -> list[dict]:
    """The real ShareGPT file, with rows of every kind the two paths could treat differently spread through it."""
    real = json.loads(REAL_SHAREGPT.read_text())

    def turns(i: int) -> list[dict]:
        return [dict(t) for t in real[i]["conversations"]]

    def qa(question: str, answer: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    odd = [
        {"conversations": turns(0), "system": "Answer briefly."},  # a system column
        {"conversations": [{"from": "system", "value": "Be kind."}, *turns(1)]},  # a system turn
        {"conversations": qa("Hi", " Hello, after a space")},
        {"conversations": qa("Hi", "\n\nAfter a blank line")},
        {"conversations": qa("Hi  ", "trailing spaces   ")},
        {"conversations": qa("¿Qué tal? 😀", "Très bien, 你好 😀")},
        {"conversations": qa("x=", "=y")},
        {"conversations": qa("Say it", "<|im_end|> in the text")},
        {"conversations": qa("Think", "<think>hm</think>Yes")},  # reasoning: chatml and friends refuse it
        {"conversations": qa("Think", "<think>never closed")},
        {"conversations": qa("Hi", "  ")},  # an empty answer
        {"conversations": qa("Hi", "")},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},  # unknown speaker
        {"conversations": [{"from": "human", "value": "Hi"}]},  # unanswered
        {"conversations": [{"from": "gpt", "value": "Hi"}, *qa("x", "y")]},  # starts with an answer
        {"conversations": [*qa("a", "b"), {"from": "gpt", "value": "again"}]},  # two answers in a row
        {"conversations": [*qa("a", "b"), {"from": "system", "value": "late"}, *qa("c", "d")]},  # a late system turn
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "42"},
                           {"from": "gpt", "value": "y"}]},  # a tool result with no call
        {"conversations": turns(2), "system": "  "},  # a blank system column
        {"conversations": turns(3), "system": 7},  # a system column that is not text
        {"conversations": [{"from": "system", "value": "a"}, *turns(4)], "system": "b"},  # both
        {"conversations": turns(5) * 60},  # longer than model.max_seq_length
        {"conversations": "not a list"},
        {"conversations": []},
        {"conversations": turns(6), "images": ["a.png"]},
        {"conversations": turns(7), "tools": "[]"},
        {"conversations": [{"from": "human", "value": "Hi", "weight": 0}, {"from": "gpt", "value": "Hello"}]},
    ]
    rows = [dict(r) for r in real]
    for i, row in enumerate(odd):
        rows.insert(7 + 13 * i, row)
    return rows


def _messages_rows() -> list[dict]:
    """The same rows in the messages format, some turns carrying every key as a Hub dataset's rows do (None)."""
    rows = []
    for i, row in enumerate(_sharegpt_rows()):
        turns = row["conversations"]
        if not isinstance(turns, list):
            rows.append({"messages": turns})
            continue
        messages = [{"role": ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in turns]
        if i % 3 == 0:
            messages = [{**m, "tool_calls": None, "tool_call_id": None, "name": None, "reasoning_content": None}
                        for m in messages]
        rows.append({"messages": messages, **{k: v for k, v in row.items() if k in ("images", "tools")}})
    rows.insert(40, {"messages": [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello"}]})
    rows.insert(80, {"messages": [{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello", "reasoning_content": ""}]})
    rows.insert(120, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                   {"role": "assistant", "content": "Hello"}]})
    return rows


def _prepared(rows, fmt, template, tokenizer, cfg) -> dict:
    """Everything the per-row stages hand on for ``rows``: tokens, masks, stored conversations, counts, bad rows."""
    refs = [RowRef("rows.jsonl", i + 1, i) for i in range(len(rows))]
    encoded, bad = pipeline._prepare(rows, refs, fmt, None, template, tokenizer, cfg)
    counts = {k: v for k, v in vars(encoded).items() if k not in ("input_ids", "masks", "conversations")}
    return {"ids": [a.to_pylist() for a in encoded.input_ids], "masks": [a.to_pylist() for a in encoded.masks],
            "types": [(a.type, b.type) for a, b in zip(encoded.input_ids, encoded.masks)],
            "conversations": [a.to_pylist() for a in encoded.conversations], "counts": counts,
            "events": [(is_bad, str(e)) for is_bad, e in bad.events], "unread": dict(bad.unread)}


@pytest.mark.parametrize("template_name", ["chatml", "llama3", "phi3", "alpaca", "mistral"])
@pytest.mark.parametrize("format_name", ["sharegpt", "messages"])
def test_plain_rows_give_what_the_general_path_gives_on_real_data(smollm2_dir, monkeypatch, format_name, template_name):
    cfg = data_config(smollm2_dir, REAL_SHAREGPT, f"template.name={template_name}", "model.max_seq_length=256")
    tokenizer = fresh_tokenizer(smollm2_dir)
    template = resolve_template(cfg, PM, tokenizer)
    fmt = PM.get("dataset_format", format_name)
    rows = _sharegpt_rows() if format_name == "sharegpt" else _messages_rows()
    masked = []  # rows the shortcut masked at their boundaries (None: left to the general path)
    real_masked = plain._masked
    monkeypatch.setattr(plain, "_masked", lambda e, p: masked.append(real_masked(e, p)) or masked[-1])
    fast = _prepared(rows, fmt, template, tokenizer, cfg)
    # The general path from end to end: the bundled format's own general reading too (its to_conversation takes
    # the plain turns first), a format and a template that declare neither optional part.
    monkeypatch.setattr(type(fmt), "plain_turns", DatasetFormat.plain_turns)
    general = _prepared(rows, OnlyConversations(fmt), OnlyRender(template), tokenizer, cfg)
    assert fast == general
    assert fast["counts"]["truncated"] and len([e for e in fast["events"] if e[0]]) >= 12  # the odd rows are there
    if template_name == "mistral":  # a TurnTemplate with its own render keeps the general path (the default)
        assert not masked
    else:
        assert sum(m is not None for m in masked) > 480


def test_masks_read_at_the_boundaries_are_those_of_every_offset(smollm2_dir):
    """Random plain renders (spaces, line breaks, special tokens, multi-byte text, empty texts): the shortcut's
    tokens and masks are encode_rendered's, whether it masks a row itself or leaves it to the general path."""
    tokenizer = fresh_tokenizer(smollm2_dir)
    rng = random.Random(0)
    words = ["a", " b", "\n", "  ", " ", "<|im_end|>", "<|im_start|>", "é", "😀", "12", "=", "==", ".", "\t", "Hello",
             " world", "", "'s", "\n\n"]
    rows = [Pieces("".join(rng.choice(words) for _ in range(rng.randint(0, 4))) for _ in range(rng.choice([1, 3, 4, 7])))
            for _ in range(3000)]
    for train_on in ("assistant", "all"):
        assert LongRows(tokenizer, 100_000, train_on).encode(rows) == \
            encode_rendered(tokenizer, [r.segments() for r in rows], train_on)
    shortcut = plain.encode_plain(tokenizer, rows, "assistant")
    assert 1000 < sum(r is not None for r in shortcut) < len(rows)  # both ways taken


def test_a_straddled_answer_start_is_left_to_the_general_path():
    """A SentencePiece-style tokenizer merges "x=" + "=y" into "==": the general path decides (the whole text kept)."""
    tokenizer = piece_marking_tokenizer()
    rows = [Pieces(["x=", "=y", ""]), Pieces(["x", "y", "x"])]
    assert plain.encode_plain(tokenizer, rows, "assistant")[0] is None
    assert LongRows(tokenizer, 100, "assistant").encode(rows) == encode_rendered(tokenizer, [r.segments() for r in rows])


def test_turn_templates_render_plain_turns_as_their_segments(smollm2_dir):
    """render_plain's texts are render's segments (text and trained characters), for every bundled TurnTemplate that
    renders as TurnTemplate does, and None from those that render otherwise (their own render)."""
    tokenizer = fresh_tokenizer(smollm2_dir)
    turns = [("system", "Be brief. "), ("user", " Hi "), ("assistant", " Hello "), ("user", "More?"), ("assistant", "No.")]
    checked = 0
    for name, template in sorted(PM.registry("chat_template").items()):
        if not isinstance(template, TurnTemplate):
            assert template.render_plain(turns, tokenizer) is None  # the interface's default
            continue
        pieces = template.render_plain(turns, tokenizer)
        if type(template).render is not TurnTemplate.render:
            assert pieces is None, name
            continue
        segments = template.render([Message(*t) for t in turns], tokenizer)
        flags = "".join(("1" if s.trained else "0") * len(s.text) for s in segments)
        assert "".join(pieces) == "".join(s.text for s in segments), name
        assert "".join(str(i % 2) * len(p) for i, p in enumerate(pieces)) == flags, name
        checked += 1
    assert checked >= 4  # chatml, llama3, phi3, alpaca
