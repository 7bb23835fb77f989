"""The dolly format: rows become conversations, options place the context, bad rows name their field."""

import pytest
from sft.core import DataError, Message

from sft_plugin_example.dolly import DollyFormat, DollyOptions

ROW = {"instruction": "Summarize.", "context": "Forge is small.", "response": "Small.", "category": "summarization"}


def test_dolly_row_becomes_a_conversation():
    assert DollyFormat().to_conversation(ROW) == [
        Message("user", "Summarize.\n\nContext:\nForge is small."),
        Message("assistant", "Small."),
    ]


def test_dolly_context_can_go_first_or_into_the_system_turn():
    before = DollyFormat().to_conversation(ROW, DollyOptions(context_position="before", context_header=""))
    assert before[0] == Message("user", "Forge is small.\n\nSummarize.")
    system = DollyFormat().to_conversation(ROW, DollyOptions(context_position="system", system_prompt="Be brief."))
    assert system[0] == Message("system", "Be brief.\n\nForge is small.") and system[1] == Message("user", "Summarize.")


@pytest.mark.parametrize("context", [None, "", "   "])
def test_dolly_empty_context_is_left_out(context):
    row = {**ROW, "context": context}
    assert DollyFormat().to_conversation(row)[0] == Message("user", "Summarize.")


@pytest.mark.parametrize(("change", "field"), [
    ({"response": None}, "response"),
    ({"instruction": "  "}, "instruction"),
    ({"context": ["a"]}, "context"),
])
def test_dolly_bad_rows_name_the_field(change, field):
    with pytest.raises(DataError) as info:
        DollyFormat().to_conversation({**ROW, **change})
    assert info.value.field == field


def test_dolly_is_detected_from_its_columns():
    assert DollyFormat().detect(["instruction", "context", "response", "category"])
    assert not DollyFormat().detect(["instruction", "input", "output"])  # that is alpaca
