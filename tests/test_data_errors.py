"""Every bad input stops before any model loads, with a message that names the place."""

from __future__ import annotations

import json

import pytest

from sft.engine.data import build_datasets
from sft.core.errors import ConfigError, DataError
from sft.testing import write_jsonl

from datakit import FIXTURES, data_config, fresh_tokenizer

GOOD = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}


def _build(model_dir, dataset, *overrides):
    return build_datasets(data_config(model_dir, dataset, *overrides), None, fresh_tokenizer(model_dir))


def _sharegpt(*turns):
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def test_json_syntax_error_names_file_and_line(smollm2_dir, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d",}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        _build(smollm2_dir, path)


def test_jsonl_syntax_error_names_file_and_line(smollm2_dir, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"conversations": [}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        _build(smollm2_dir, path)


def test_a_format_option_naming_a_column_no_row_has_gets_a_notice(smollm2_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 2.", "input": "", "output": "4"}])
    _build(smollm2_dir, path, "data.alpaca.query=inptu", "data.alpaca.system=sys_prompt")
    err = capsys.readouterr().err
    assert f"data.alpaca.query=inptu: {path} has no column 'inptu' (did you mean 'input'?), so that option reads nothing" in err
    assert f"data.alpaca.system=sys_prompt: {path} has no column 'sys_prompt', so that option reads nothing" in err
    _build(smollm2_dir, path, "data.alpaca.query=input")
    assert "reads nothing" not in capsys.readouterr().err


def test_a_json_array_saved_as_jsonl_is_named_as_such(smollm2_dir, tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    with pytest.raises(DataError, match=rf"^{path}:1: invalid JSON: .*; the file looks like one JSON array, which a "
                                        rf"\.json file holds"):
        _build(smollm2_dir, path)
    path.write_text(json.dumps([GOOD, GOOD]) + "\n")  # one line holding an array is a row that is a list
    with pytest.raises(DataError) as err:
        _build(smollm2_dir, path)
    assert "looks like one JSON array" not in str(err.value)


def test_csv_with_a_missing_value_names_the_line_row_and_field(smollm2_dir, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,input,output\nSay hi,,hi\n"Two\nlines",,\n')
    with pytest.raises(DataError, match=rf"^{path}:3, row 1, field 'output': empty text"):
        _build(smollm2_dir, path)


@pytest.mark.parametrize("row, field, message", [
    ({"instruction": "Say hi"}, "output", "missing field"),
    ({"instruction": "Say hi", "output": None}, "output", "null value"),
    ({"instruction": "  ", "output": "hi"}, "instruction", "empty text"),
    ({"instruction": "Say hi", "output": 3}, "output", "expected text, got int"),
])
def test_missing_null_or_empty_field_names_file_line_row_and_field(row, field, message, smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}, row])
    with pytest.raises(DataError, match=rf"^{path}:2, row 1, field '{field}': {message}"):
        _build(smollm2_dir, path, "data.format=alpaca")


def test_json_array_rows_are_located_by_the_line_their_object_starts_on(smollm2_dir, tmp_path):
    path = tmp_path / "sharegpt.json"
    rows = [GOOD, GOOD, _sharegpt(("human", "Hi"), ("gpt", ""))]
    path.write_text(json.dumps(rows, indent=2))
    starts = [i + 1 for i, text in enumerate(path.read_text().splitlines()) if text == "  {"]  # each object's first line
    assert len(starts) == 3
    with pytest.raises(DataError, match=rf"^{path}:{starts[2]}, row 2, field 'conversations\[1\].value': empty text"):
        _build(smollm2_dir, path)


@pytest.mark.parametrize("turns, message", [
    ((("human", "Hi"), ("gpt", "Hello"), ("human", "More?")), "turn 2: the conversation ends with an unanswered user turn"),
    ((("system", "Be brief."), ("human", "Hi")), "no assistant turn"),
    ((("gpt", "Hello"),), "turn 0: roles must alternate user/assistant: an assistant turn follows the start"),
    ((("human", "Hi"), ("human", "Hi?"), ("gpt", "Hello")), "turn 1: roles must alternate user/assistant: a user turn follows a user turn"),
    ((("human", "Hi"), ("gpt", "Hello"), ("system", "late")), "turn 2: a system turn may only come first"),
])
def test_conversations_with_bad_roles_are_named(turns, message, smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, _sharegpt(*turns)])
    with pytest.raises(DataError, match=rf"^{path}:2, row 1: .*{message}"):
        _build(smollm2_dir, path)


def test_no_assistant_turn_is_named(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}]}])
    with pytest.raises(DataError, match=rf"^{path}:1, row 0: no assistant turn"):
        _build(smollm2_dir, path)


def test_unknown_speaker_gets_a_did_you_mean(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [_sharegpt(("humam", "Hi"), ("gpt", "Hello"))])
    with pytest.raises(DataError, match=r"field 'conversations\[0\].from': unknown speaker 'humam' \(did you mean 'human'\?\)"):
        _build(smollm2_dir, path)


def test_unknown_messages_role_gets_a_did_you_mean(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "usr", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(DataError, match=r"row 0, field 'messages\[0\].role': unknown role 'usr' \(did you mean 'user'\?\)"):
        _build(smollm2_dir, path)


def test_skip_policy_counts_prints_and_records_bad_rows(smollm2_dir, tmp_path, capsys):
    rows = [GOOD] * 18 + [_sharegpt(("human", "Hi"), ("gpt", "")), _sharegpt(("gpt", "Hello"))]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared = _build(smollm2_dir, path, "data.on_bad_row=skip", "data.max_bad_fraction=0.2")
    skipped = prepared.stats["skipped"]
    assert skipped["count"] == 2 and prepared.stats["train_rows"] == 18 and prepared.stats["rows"] == 20
    assert skipped["reasons"] == {"conversations[N].value: empty text": 1,
                                  "turn N: roles must alternate user/assistant: an assistant turn follows the start (expected user)": 1}
    assert skipped["examples"][0].startswith(f"{path}:19, row 18, field 'conversations[1].value'")
    err = capsys.readouterr().err
    assert "skipped 2 of 20 rows (data.on_bad_row=skip)" in err and f"{path}:19" in err


def test_too_many_bad_rows_is_an_error_even_when_skipping(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD] * 9 + [_sharegpt(("gpt", "Hello"))])
    with pytest.raises(DataError, match=r"1 of 10 rows are bad \(10.0%\), more than data.max_bad_fraction=0.05; "
                                        rf"the first: {path}:10, row 9"):
        _build(smollm2_dir, path, "data.on_bad_row=skip")


def test_a_prompt_longer_than_max_seq_length_is_left_out_and_counted_like_a_cut_answer(smollm2_dir, tmp_path, capsys):
    long_question = "Please answer this question after reading it slowly. " * 4
    rows = [GOOD, _sharegpt(("human", long_question), ("gpt", "Yes."))]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared = _build(smollm2_dir, path, "model.max_seq_length=16")  # data.on_bad_row=error: not a bad row
    stats = prepared.stats
    assert stats["truncated"] == 1 and stats["truncated_dropped"] == 1 and stats["long_prompts"] == 1
    assert stats["train_rows"] == 1 and stats["skipped"]["count"] == 0 and stats["fully_masked"] == 0
    assert stats["max_tokens"] <= 16
    assert "left out 1 row(s) whose prompt alone is longer than model.max_seq_length" in capsys.readouterr().err


def test_every_row_fully_masked_is_an_error_whatever_the_policy(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [_sharegpt(("human", "word " * 40), ("gpt", "Yes."))] * 3)
    with pytest.raises(DataError, match="no training row has a trained token"):
        _build(smollm2_dir, path, "model.max_seq_length=16", "data.on_bad_row=skip", "data.max_bad_fraction=1.0")


def test_auto_format_that_is_ambiguous_lists_the_candidates(smollm2_dir, tmp_path):
    row = dict(GOOD, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    path = write_jsonl(tmp_path / "both.jsonl", [row])
    with pytest.raises(DataError, match=r"data.format=auto is ambiguous: .* match the formats messages, sharegpt; "
                                        r"set data.format to one of them"):
        _build(smollm2_dir, path)


def test_auto_format_with_no_match_lists_the_formats(smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Hi", "answer": "Hello"}])
    with pytest.raises(DataError, match=r"no dataset format recognises the columns \(question, answer\); "
                                        r"set data.format to one of: .*alpaca.*messages.*sharegpt"):
        _build(smollm2_dir, path)


def test_hub_dataset_offline_names_the_dataset_and_the_hub(smollm2_dir, monkeypatch):
    import datasets  # noqa: F401 - imported so its offline flag exists to be set
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what an offline machine has
    with pytest.raises(DataError, match=r"cannot load hub dataset 'sft-forge-tests/no-such-dataset': "
                                        r"the Hugging Face Hub cannot be reached"):
        _build(smollm2_dir, "sft-forge-tests/no-such-dataset")


@pytest.mark.parametrize("dataset, error, message", [
    ("sft:identty", ConfigError, r"data.dataset: no packaged dataset 'sft:identty' \(did you mean 'identity'\?\)"),
    ("./no/such/file.jsonl", DataError, r"^./no/such/file.jsonl: no such file or folder"),
])
def test_unknown_sources_are_named(dataset, error, message, smollm2_dir):
    with pytest.raises(error, match=message):
        _build(smollm2_dir, dataset)


@pytest.mark.parametrize("overrides, message", [
    (["data.split=test"], r"data.split: a single file has only the split 'train', not 'test'"),
    (["data.split=trian"], r"data.split: a single file has only the split 'train', not 'trian' \(did you mean 'train'\?\)$"),
    (["data.split=train[x:]"], r"data.split: 'train\[x:\]' is not a split like"),
    (["data.test_size=3.0"], r"data.test_size: 3.0 leaves no training rows out of 3"),
])
def test_bad_split_settings_name_the_key(overrides, message, smollm2_dir):
    with pytest.raises(ConfigError, match=message):
        _build(smollm2_dir, FIXTURES / "sharegpt.json", *overrides)


def test_a_missing_eval_file_and_an_empty_slice_are_named_as_such(smollm2_dir, tmp_path):
    """Not "a single file has only the split 'train', not 'nope.jsonl'" nor "the file is empty"."""
    with pytest.raises(DataError, match=r"^nope.jsonl: no such file or folder$"):
        _build(smollm2_dir, FIXTURES / "sharegpt.json", "data.eval_split=nope.jsonl")
    with pytest.raises(DataError, match=r"sharegpt.json: data.split=train\[:0\] selects no rows$"):
        _build(smollm2_dir, FIXTURES / "sharegpt.json", "data.split=train[:0]")


def test_a_folder_without_the_split_lists_the_splits(smollm2_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "validation.jsonl", [GOOD])
    with pytest.raises(ConfigError, match=r"data.eval_split: the folder .* has no split 'valid' \(did you mean "
                                          r"'validation'\?\); splits: train, validation"):
        _build(smollm2_dir, tmp_path, "data.eval_split=valid")


def test_a_folder_file_of_no_split_is_an_error_and_other_files_are_named(smollm2_dir, tmp_path, capsys):
    """Beside train.jsonl, tset.jsonl would be read by no split; a README is named as not read."""
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "tset.jsonl", [GOOD])
    (tmp_path / "README.md").write_text("about the data")
    with pytest.raises(DataError, match=r"tset.jsonl belongs to no split \(did you mean 'test'\?\): beside train "
                                        r"files, a file is read only when its name"):
        _build(smollm2_dir, tmp_path)
    (tmp_path / "tset.jsonl").rename(tmp_path / "test.jsonl")
    assert len(_build(smollm2_dir, tmp_path, "data.eval_split=test").train) == 1
    notices = [line for line in capsys.readouterr().err.splitlines() if "not read" in line]
    assert notices and all(line.startswith(f"[sft] {tmp_path}: 1 file(s) not read, not .json/") and
                           line.endswith(": README.md") for line in notices)


def test_a_row_the_template_cannot_render_is_a_bad_row(smollm2_dir, tmp_path, sft_plugin_manager):
    from sft.core import hookimpl
    from sft.core.templating import Turn, TurnTemplate

    class NoSystem(TurnTemplate):
        """A format without a system role (like Gemma's), refusing system turns."""

        name = "nosystem"
        user = Turn("U: ", "\n")
        assistant = Turn("A: ", "\n")
        eot = "<|im_end|>"

        def render(self, messages, tokenizer=None):
            if messages[0].role == "system":
                raise DataError("this template has no system role")
            return super().render(messages, tokenizer)

    class Plugin:
        @hookimpl
        def register_chat_templates(self, register):
            register(NoSystem())

    sft_plugin_manager.register(Plugin(), "nosystem")
    path = FIXTURES / "sharegpt.json"  # its second conversation has a system turn
    with pytest.raises(DataError, match=rf"^{path}:\d+, row 1: template 'nosystem' cannot render this row: "
                                        r"this template has no system role"):
        _build(smollm2_dir, path, "template.name=nosystem")
    prepared = _build(smollm2_dir, path, "template.name=nosystem", "data.on_bad_row=skip", "data.max_bad_fraction=0.5")
    assert prepared.stats["skipped"]["count"] == 1 and prepared.stats["train_rows"] == 2


def test_skip_reasons_fold_numbers_but_not_the_digits_of_names(smollm2_dir, tmp_path):
    """Rows with the same problem share one reason; `template 'qwen3'` stays itself (it was folded to 'qwenN')."""
    rows = [GOOD] * 18 + [_sharegpt(("human", "Hi"), ("gpt", "Hello"), ("function_call", '{"name": "f", "arguments": {}}'),
                                    ("observation", "1"), ("gpt", "Done."))] * 2
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prepared = _build(smollm2_dir, path, "template.name=llama3", "data.on_bad_row=skip", "data.max_bad_fraction=0.5")
    [(reason, n)] = prepared.stats["skipped"]["reasons"].items()
    assert n == 2 and "template 'llama3' cannot render this row" in reason and "llamaN" not in reason
