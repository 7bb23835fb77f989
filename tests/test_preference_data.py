"""Preference data: the shapes practitioners bring, read into pairs and labelled rows, with exact
completion spans; the refusals of rows, formats and objectives that do not fit. Tokenizer only."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from sft.engine.configuration import load_config
from sft.core.errors import DataError
from sft.engine.data import build_datasets
from sft.testing import tiny_overrides, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DPO_DEMO = SHARED / "llamafactory_dpo_en_demo.json"
KTO_DEMO = SHARED / "llamafactory_kto_en_demo.json"

needs_shared = pytest.mark.skipif(not DPO_DEMO.is_file(), reason="../shared/data is not here")


def _cfg(tmp_path, model_dir, dataset, *overrides):
    return load_config(overrides=[*tiny_overrides(tmp_path / "run", model_dir, dataset), "data.cache_dir=off",
                                  *overrides])


def _prepare(tmp_path, model_dir, tokenizer, rows, *overrides, name="pairs.jsonl"):
    path = write_jsonl(tmp_path / name, rows)
    return build_datasets(_cfg(tmp_path, model_dir, path, *overrides), None, tokenizer, quiet=True)


PAIRS = [
    # TRL's standard form with strings
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Purple."},
    # ... with messages
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is ice cold?"}],
     "chosen": [{"role": "assistant", "content": "Yes."}], "rejected": [{"role": "assistant", "content": "No."}]},
    # the implicit-prompt form: whole conversations sharing every turn but the last
    {"chosen": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
     "rejected": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Five."}]},
]


def test_pairs_of_every_trl_shape_become_exact_token_columns(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, PAIRS, "objective.name=dpo")
    assert data.stats["kind"] == "pair" and data.stats["format"] == "preference"
    assert data.stats["unread_columns"] == {}
    assert data.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    decode = lambda ids: tiny_tokenizer.decode(ids)  # noqa: E731
    rows = list(data.train)
    # The prompt is the template's generation prompt; each completion is the answer and its
    # end-of-turn token, nothing after it (ChatML's trailing newline is not something the model writes).
    assert decode(rows[0]["prompt_ids"]) == "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n"
    assert [decode(rows[0]["chosen_ids"]), decode(rows[0]["rejected_ids"])] == ["Red.<|im_end|>", "Purple.<|im_end|>"]
    assert decode(rows[1]["prompt_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert [decode(rows[2]["chosen_ids"]), decode(rows[2]["rejected_ids"])] == ["Four.<|im_end|>", "Five.<|im_end|>"]
    # The quick generation reads the prompt back from the conversations kept with the rows.
    assert data.train_conversations[2][0].content == "Two plus two?"


def test_tokens_equal_trls_own_tokenization_but_the_newline_after_the_turn(tmp_path, tiny_model_dir, tiny_tokenizer):
    """TRL's DPOTrainer tokenizes the same pair with ``apply_chat_template``: the prompt is the same
    token for token, and so is each completion, except that TRL also scores the newline ChatML
    writes after ``<|im_end|>`` (the model stops at ``<|im_end|>``: that newline is never generated)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    data = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, PAIRS[1:], "objective.name=dpo")
    ours = list(data.train)
    conversational = [
        {"prompt": PAIRS[1]["prompt"], "chosen": PAIRS[1]["chosen"], "rejected": PAIRS[1]["rejected"]},
        {"prompt": PAIRS[2]["chosen"][:1], "chosen": PAIRS[2]["chosen"][1:], "rejected": PAIRS[2]["rejected"][1:]},
    ]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none")
    # tiny_tokenizer carries the chatml template now (the pipeline installed it): TRL renders with it.
    theirs = list(DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tiny_tokenizer),
                                             datasets.Dataset.from_list(conversational), tiny_tokenizer, args, "train"))
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    for mine, trl in zip(ours, theirs):
        assert mine["prompt_ids"] == trl["prompt_ids"]
        assert mine["chosen_ids"] + newline == trl["chosen_ids"]
        assert mine["rejected_ids"] + newline == trl["rejected_ids"]


def test_bad_pairs_are_located_and_counted(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [
        *PAIRS,
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # line 4: identical
        {"prompt": "Empty?", "chosen": "", "rejected": "No."},  # line 5: empty completion
        {"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"}],  # line 6: prompts differ
         "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "b"}]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as info:
        build_datasets(_cfg(tmp_path, tiny_model_dir, path, "objective.name=dpo"), None, tiny_tokenizer)
    assert f"{path}:4" in str(info.value) and "chosen and rejected are the same" in str(info.value)
    data = build_datasets(_cfg(tmp_path, tiny_model_dir, path, "objective.name=dpo", "data.on_bad_row=skip",
                               "data.max_bad_fraction=0.6"), None, tiny_tokenizer, quiet=True)
    skipped = data.stats["skipped"]
    assert skipped["count"] == 3 and data.stats["train_rows"] == 3
    examples = "\n".join(skipped["examples"])
    assert f"{path}:5" in examples and "field 'chosen': empty text" in examples
    assert f"{path}:6" in examples and "share every turn but the last" in examples


def test_an_answer_that_merges_with_its_prompt_keeps_the_prompts_tokens(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The alpaca template's generation prompt ends in a newline that BPE would merge with an answer
    starting with newlines: the prompt keeps the generation prompt's tokens (what the model is
    given), and the answer is scored from its own first token, in chosen and rejected alike."""
    rows = [{"prompt": "Hi", "chosen": "\n\nHello", "rejected": "Bye."}]
    data = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, rows, "objective.name=dpo", "template.name=alpaca")
    row = data.train[0]
    generation = tiny_tokenizer(data.train_conversations and _generation_prompt(data, tiny_tokenizer),
                                add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"] == generation
    assert tiny_tokenizer.decode(row["chosen_ids"]).startswith("\n\nHello")
    assert tiny_tokenizer.decode(row["rejected_ids"]).startswith("Bye.")


def _generation_prompt(data, tokenizer):
    from sft.core.templating import resolve_template

    cfg = load_config(overrides=["template.name=alpaca"])
    return resolve_template(cfg).generation_prompt(data.train_conversations[0][:-1], tokenizer)


@needs_shared
def test_llamafactory_ranking_and_kto_files_are_read_as_they_are(tmp_path, tiny_model_dir, tiny_tokenizer):
    pairs = build_datasets(_cfg(tmp_path, tiny_model_dir, DPO_DEMO, "objective.name=dpo", "model.max_seq_length=1024",
                                "data.split=train[:30]"), None, tiny_tokenizer, quiet=True)
    assert pairs.stats["format"] == "sharegpt_pairs"
    assert pairs.stats["train_rows"] + pairs.stats["truncated_dropped"] == 30
    first = json.loads(DPO_DEMO.read_text())[0]
    row = pairs.train[0]
    assert tiny_tokenizer.decode(row["chosen_ids"]) == first["chosen"]["value"] + "<|im_end|>"
    assert first["conversations"][0]["value"] in tiny_tokenizer.decode(row["prompt_ids"])
    labelled = build_datasets(_cfg(tmp_path, tiny_model_dir, KTO_DEMO, "objective.name=kto", "model.max_seq_length=1024",
                                   "data.split=train[:40]"), None, tiny_tokenizer, quiet=True)
    assert labelled.stats["format"] == "kto" and labelled.train.column_names == ["prompt_ids", "completion_ids", "label"]
    kept = labelled.stats["labels"]
    assert kept["desirable"] > 0 and kept["undesirable"] > 0
    assert kept["desirable"] + kept["undesirable"] == labelled.stats["train_rows"]


def test_unpaired_rows_in_both_shapes(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"prompt": "Name a primary colour.", "completion": "Red.", "label": True},
            {"messages": [{"role": "user", "content": "Is ice cold?"}, {"role": "assistant", "content": "No."}],
             "label": False},
            {"prompt": "Hi", "completion": "Hello", "label": "yes"}]  # line 3: not a boolean
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=r"kto.jsonl:3.*label.*expected true or false"):
        build_datasets(_cfg(tmp_path, tiny_model_dir, path, "objective.name=kto"), None, tiny_tokenizer)
    write_jsonl(path, rows[:2])
    data = build_datasets(_cfg(tmp_path, tiny_model_dir, path, "objective.name=kto"), None, tiny_tokenizer, quiet=True)
    assert list(data.train["label"]) == [True, False]
    assert tiny_tokenizer.decode(data.train[1]["completion_ids"]) == "No.<|im_end|>"


@pytest.mark.parametrize("objective, rows, message", [
    ("dpo", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
     "objective 'dpo' trains on preference pairs.*'messages' reads conversations"),
    ("sft", PAIRS[:1], "objective 'sft' trains on conversations.*'preference' reads preference pairs"),
    ("kto", PAIRS[:1], "objective 'kto' trains on completions labelled.*'preference' reads preference pairs"),
])
def test_data_of_another_kind_is_refused_naming_both(tmp_path, tiny_model_dir, tiny_tokenizer, objective, rows, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=message):
        build_datasets(_cfg(tmp_path, tiny_model_dir, path, f"objective.name={objective}"), None, tiny_tokenizer)


@pytest.mark.parametrize("demo, found", [
    (KTO_DEMO, r"\(messages, label\) hold completions labelled desirable or not .* read by 'kto', as well as "
               r"conversations, read by 'messages'; train them with --objective kto .* or set data.format=messages"),
    (DPO_DEMO, r"\(conversations, chosen, rejected\) hold preference pairs .* read by "
     r"'sharegpt_pairs', .* --objective dpo, orpo or simpo .* or set data.format=sharegpt to train"),
])
def test_preference_files_are_not_read_as_conversations_unasked(tmp_path, tiny_model_dir, tiny_tokenizer, demo, found):
    """LLaMA-Factory's KTO rows are OpenAI messages plus a label: read as conversations, the undesirable
    answers would train as targets; its DPO rows would be refused for the wrong reason ("no assistant turn")."""
    if not demo.exists():
        pytest.skip("the shared data is absent")
    with pytest.raises(DataError, match=found):
        build_datasets(_cfg(tmp_path, tiny_model_dir, demo), None, tiny_tokenizer)
    fmt = "messages" if demo == KTO_DEMO else "sharegpt"
    if fmt == "messages":  # asked for by name, the conversations train (the label column is named as unread)
        data = build_datasets(_cfg(tmp_path, tiny_model_dir, demo, f"data.format={fmt}"), None, tiny_tokenizer,
                              quiet=True)
        assert data.stats["train_rows"] > 50  # the rest are longer than the tiny run's 256 tokens


def test_preview_shows_each_completion_with_its_scored_tokens(tmp_path, tiny_model_dir):
    from sft.engine.preview import preview_data

    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:1])
    data = preview_data(_cfg(tmp_path, tiny_model_dir, path, "objective.name=dpo"), samples=1)
    [chosen, rejected] = data["samples"]
    assert (chosen["completion"], rejected["completion"]) == ("chosen", "rejected")
    assert chosen["trained_text"] == ["Red.<|im_end|>"] and rejected["trained_text"] == ["Purple.<|im_end|>"]
    assert "Name a primary colour." in chosen["text"] and not chosen["segments"][0]["trained"]


def test_mixed_preference_sources_are_cached_like_conversations(tmp_path, tiny_model_dir, tiny_tokenizer):
    ranking = [{"conversations": [{"from": "human", "value": "Say hi."}],
                "chosen": {"from": "gpt", "value": "Hi!"}, "rejected": {"from": "gpt", "value": "No."}}]
    trl_file = write_jsonl(tmp_path / "trl.jsonl", PAIRS)
    ranking_file = write_jsonl(tmp_path / "ranking.jsonl", ranking)
    overrides = [*tiny_overrides(tmp_path / "run", tiny_model_dir), "objective.name=dpo",
                 f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.datasets=[{{path: {trl_file}}}, {{path: {ranking_file}, weight: 2}}]"]
    first = build_datasets(load_config(overrides=overrides), None, tiny_tokenizer, quiet=True)
    assert first.stats["cache"] == "miss" and first.stats["format"] == "preference+sharegpt_pairs"
    assert first.stats["train_rows"] == len(PAIRS) + 2
    again = build_datasets(load_config(overrides=overrides), None, tiny_tokenizer, quiet=True)
    assert again.stats["cache"] == "hit" and again.train[:] == first.train[:]
    # The objective is part of what the rows are: the same files under kto are not these rows.
    with pytest.raises(DataError, match="objective 'kto' trains on completions labelled"):
        build_datasets(load_config(overrides=[*overrides, "objective.name=kto"]), None, tiny_tokenizer, quiet=True)


def test_a_column_a_preference_format_does_not_read_is_counted(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{**pair, "id": f"p{i}", "score": 3} for i, pair in enumerate(PAIRS)]
    data = _prepare(tmp_path, tiny_model_dir, tiny_tokenizer, rows, "objective.name=dpo")
    assert data.stats["unread_columns"] == {"id (preference)": 3, "score (preference)": 3}
