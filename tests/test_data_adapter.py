"""A custom dataset format in ~20 lines: the plugin in docs/writing-a-dataset-adapter.md, registered in-test."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from sft.engine.data import build_datasets
from sft.core.errors import DataError
from sft.core.interfaces import Message
from sft.testing import write_jsonl

from datakit import data_config, decoded_spans, fresh_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-dataset-adapter.md"


def _plugin_from_the_docs(monkeypatch) -> types.ModuleType:
    """The first Python block of the guide, executed as a module (so the guide cannot rot)."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 35
    module = types.ModuleType("qa_plugin_from_docs")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # @dataclass looks its module up
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


@pytest.fixture
def qa(sft_plugin_manager, monkeypatch):
    sft_plugin_manager.register(_plugin_from_the_docs(monkeypatch), "qa-plugin")
    return sft_plugin_manager


def test_the_guides_adapter_is_detected_and_trains_the_answers(qa, smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 2 + 2?", "answer": "4", "topic": "arithmetic"},
                                               {"question": "Capital of France?", "answer": "Paris."}])
    tokenizer = fresh_tokenizer(smollm2_dir)
    prepared = build_datasets(data_config(smollm2_dir, path, "data.qa.system_prompt=Answer briefly.", pm=qa), qa, tokenizer)
    assert prepared.stats["format"] == "qa"
    assert prepared.train_conversations[1] == [Message("system", "Answer briefly."), Message("user", "Capital of France?"),
                                               Message("assistant", "Paris.")]
    row = prepared.train[1]
    assert decoded_spans(row["input_ids"], row["assistant_masks"], tokenizer) == ["Paris.<|im_end|>"]


def test_the_guides_adapter_reports_a_bad_row_with_its_place(qa, smollm2_dir, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 2 + 2?", "answer": None}])
    with pytest.raises(DataError, match=rf"^{path}:1, row 0, field 'answer': null value"):
        build_datasets(data_config(smollm2_dir, path, pm=qa), qa, fresh_tokenizer(smollm2_dir))


def test_an_unknown_option_of_the_adapter_is_a_config_error(qa, smollm2_dir, tmp_path):
    from sft.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.qa.system_promt: unknown key \(did you mean 'system_prompt'\?\)"):
        data_config(smollm2_dir, tmp_path / "x.jsonl", "data.qa.system_promt=x", pm=qa)
