"""Rows far longer than model.max_seq_length: cut by characters before tokenizing, with the outcome the
whole text would have had (engine/data/longrows.py); a multi-MB answer validates in bounded memory."""

from __future__ import annotations

import random
import sys

import pytest

from sft.engine.data import build_datasets
from sft.engine.data.pipeline import describe_stats
from sft.testing import write_jsonl

from datakit import data_config, fresh_tokenizer, peak_rss

MAX_LEN = 64
SHORT = [{"instruction": f"Say hello {i}.", "output": f"Hello {i}."} for i in range(4)]


def _prose(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "red", "green", "the", "of", "and", "x1", "Hello,", "world."]
    text = ""
    while len(text) < chars:
        text += " ".join(rng.choice(words) for _ in range(1000)) + "\n"
    return text[:chars]


def _rows_of(prepared):
    split = prepared.train
    return sorted(zip(split["input_ids"], split["assistant_masks"]))


def _build(model_dir, tmp_path, name, rows, *overrides):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    cfg = data_config(model_dir, path, f"model.max_seq_length={MAX_LEN}", *overrides)
    return build_datasets(cfg, None, fresh_tokenizer(model_dir), quiet=True)


def _same_outcome(model_dir, tmp_path, long_rows, policy_overrides=()):
    """The pipeline's rows for ``long_rows`` (far too long: cut by characters) and for the same rows ending after
    3,000 characters (well over MAX_LEN tokens, under the cut's bound: tokenized whole, the path before the cut)."""
    tokenizer = fresh_tokenizer(model_dir)
    longest = max(map(len, tokenizer.get_vocab()))
    assert 3000 < (MAX_LEN + 1) * longest < 20_000, "the rows below must straddle the cut's bound"

    def shortened(row):
        return {k: v[:3000] if isinstance(v, str) else v for k, v in row.items()}

    cut = _build(model_dir, tmp_path, "long", SHORT + long_rows, *policy_overrides)
    whole = _build(model_dir, tmp_path, "whole", SHORT + [shortened(r) for r in long_rows], *policy_overrides)
    return cut, whole


@pytest.mark.parametrize("policy", ["drop", "keep_eot", "truncate"])
def test_a_far_too_long_answer_is_cut_before_tokenizing_with_the_outcome_of_the_whole_text(policy, smollm2_dir,
                                                                                         tmp_path):
    long_answer = {"instruction": "Write a lot.", "output": _prose(60_000)}
    long_prompt = {"instruction": _prose(60_000, seed=1), "output": "Done."}
    cut, whole = _same_outcome(smollm2_dir, tmp_path, [long_answer, long_prompt], [f"data.on_truncate={policy}"])
    assert cut.stats["precut"] == 2 and whole.stats["precut"] == 0
    for key in ("truncated", "truncated_dropped", "truncated_eot_added", "long_prompts", "train_rows",
                "trained_tokens", "skipped"):
        assert cut.stats[key] == whole.stats[key], key
    assert cut.stats["truncated"] == 2 and cut.stats["long_prompts"] == 1
    assert _rows_of(cut) == _rows_of(whole)
    assert cut.stats["train_rows"] == (4 if policy == "drop" else 5)
    assert "2 cut by characters before tokenizing" in describe_stats(cut.stats)


def test_rows_under_the_bound_are_tokenized_whole_as_before(smollm2_dir, tmp_path):
    """A row long in tokens but short of the bound in characters takes the unchanged path: its tokens are the
    whole text's, cut at MAX_LEN."""
    from sft.core.templating import encode_rendered, resolve_template

    row = {"instruction": "Write.", "output": _prose(3000)}
    prepared = _build(smollm2_dir, tmp_path, "mid", SHORT + [row], "data.on_truncate=truncate")
    assert prepared.stats["precut"] == 0 and prepared.stats["truncated"] == 1
    tokenizer = fresh_tokenizer(smollm2_dir)
    cfg = data_config(smollm2_dir, tmp_path / "mid.jsonl")
    template = resolve_template(cfg, None, tokenizer)
    conversation = next(c for c in prepared.train_conversations if len(c[-1].content) == 3000)
    (ids, mask), = encode_rendered(tokenizer, [template.render(conversation, tokenizer)])
    assert (ids[:MAX_LEN], mask[:MAX_LEN]) in _rows_of(prepared)


def test_a_long_text_document_is_tokenized_in_blocks_into_the_same_windows(smollm2_dir, tmp_path, monkeypatch):
    from sft.engine.data import longrows

    rows = [{"text": _prose(40_000)}, {"text": "A short text of a few words."}]
    whole = _build(smollm2_dir, tmp_path, "text", rows, "data.format=text")
    monkeypatch.setattr(longrows, "BLOCK", 5_000)  # blocks of 5,000 characters instead of a million
    blocks = _build(smollm2_dir, tmp_path, "text", rows, "data.format=text")
    assert whole.stats["chunked"] == blocks.stats["chunked"] == 1
    assert _rows_of(blocks) == _rows_of(whole)


def test_a_far_too_long_preference_row_is_cut_or_left_out_before_tokenizing(tiny_model_dir, tmp_path):
    pairs = [{"prompt": f"Name colour {i}.", "chosen": "Red.", "rejected": "Purple."} for i in range(3)]
    huge_chosen = {"prompt": "Write a lot.", "chosen": _prose(60_000), "rejected": "No."}
    huge_prompt = {"prompt": _prose(60_000, seed=2), "chosen": "Yes.", "rejected": "No."}
    common = ["objective.name=dpo", "data.on_truncate=truncate"]
    cut = _build(tiny_model_dir, tmp_path, "pairs", pairs + [huge_chosen, huge_prompt], *common)
    whole = _build(tiny_model_dir, tmp_path, "pairs_whole", pairs + [dict(huge_chosen, chosen=huge_chosen["chosen"][:3000]),
                                                                     dict(huge_prompt, prompt=huge_prompt["prompt"][:3000])],
                   *common)
    assert cut.stats["precut"] == 2 and whole.stats["precut"] == 0
    assert cut.stats["truncated"] == whole.stats["truncated"] == 2
    assert cut.stats["truncated_dropped"] == whole.stats["truncated_dropped"] == 1  # the prompt alone is too long
    room = MAX_LEN - len(cut.train["prompt_ids"][-1])
    cut_row, whole_row = cut.train[-1], whole.train[-1]
    assert cut_row["prompt_ids"] == whole_row["prompt_ids"]
    assert cut_row["chosen_ids"][:room] == whole_row["chosen_ids"][:room] and len(cut_row["chosen_ids"]) > room


def test_a_multi_megabyte_answer_validates_in_bounded_memory(smollm2_dir, tmp_path):
    """`sft validate` on a file with one 10 MB answer (before the cut: 1.7 GB of memory; now well under 1 GB)."""
    rows = SHORT + [{"instruction": "Write a lot.", "output": _prose(10_000_000)}]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    rc, peak_kb, report = peak_rss(sys.executable, "-m", "sft.cli", "validate", "--model", str(smollm2_dir),
                                   "--dataset", str(path), "data.cache_dir=off")
    assert rc == 0, report
    assert peak_kb < 1_000_000, f"peak RSS {peak_kb / 1024:.0f} MB"
    assert "1 dropped" in report and "1 cut by characters before tokenizing" in report, report
