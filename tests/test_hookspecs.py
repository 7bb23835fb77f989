"""Every hook spec is documented and tested: a plugin registered through it is used by the real code path.

The meta-tests (as in datasette) require a docstring on each spec and a ``test_hook_<name>``
test somewhere under tests/. Each ``test_hook_*`` registers an in-test plugin through its
hook on ``sft_plugin_manager`` and checks that the code that reads that registry (data
pipeline, trainer, exporters) uses it.
"""

from __future__ import annotations

import inspect
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest

from sft.core import (
    ChatTemplate,
    DataError,
    DatasetFormat,
    Exporter,
    ExportResult,
    Logger,
    Message,
    RunInfo,
    Segment,
    TrainingBackend,
    hookimpl,
    hookspecs,
)
from sft.core.config import opt
from sft.core.interfaces import KINDS
from sft.core.templating import Turn, TurnTemplate, trained_text
from sft.core.testing import tiny_config, train_tiny, trained_spans, write_jsonl

TESTS = Path(__file__).parent
HOOKS = sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "sft_spec"))


def test_every_kind_has_a_hook_spec():
    assert HOOKS == sorted(hook for hook, _iface, _section in KINDS.values())


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_has_a_docstring(hook: str):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc.splitlines()[0]) > 20, f"{hook}: needs a one-line summary"
    for arg in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f":param {arg}:" in doc, f"{hook}: the docstring does not describe its argument '{arg}'"
    assert "Called" in doc, f"{hook}: the docstring must say when the hook is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_spec_has_a_test(hook: str):
    pattern = re.compile(rf"^def test_hook_{hook}\b", re.M)
    assert any(pattern.search(p.read_text()) for p in TESTS.rglob("test_*.py")), f"no test_hook_{hook} under tests/"


# -- register_dataset_formats ---------------------------------------------------------------
class PipeFormat(DatasetFormat):
    """``{"dialogue": "question|answer"}``: a format no bundled plugin reads."""

    name = "pipe"
    version = "1"
    description = "question|answer in one column"
    columns = ("dialogue",)

    def to_conversation(self, row: Mapping[str, Any], options: Any = None) -> list[Message]:
        question, sep, answer = str(row.get("dialogue", "")).partition("|")
        if not sep:
            raise DataError("expected 'question|answer'", field="dialogue")
        return [Message("user", question), Message("assistant", answer)]


class PipePlugin:
    @hookimpl
    def register_dataset_formats(self, register):
        register(PipeFormat())


def test_hook_register_dataset_formats(sft_plugin_manager, tiny_model_dir, tiny_tokenizer, tmp_path: Path):
    from sft.core.data import build_datasets

    sft_plugin_manager.register(PipePlugin(), "pipe-plugin")
    rows = [{"dialogue": f"What is {n}+{n}?|{2 * n}"} for n in range(5)] + [{"dialogue": "no separator"}]
    data = write_jsonl(tmp_path / "pipe.jsonl", rows)
    # format: auto detects it from the columns; the bad row is located by file:line and field.
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "data.on_bad_row=skip", "data.max_bad_fraction=0.5", dataset=data)
    prepared = build_datasets(cfg, None, tiny_tokenizer, use_cache=False, quiet=True)
    assert prepared.stats["format"] == "pipe" and prepared.stats["train_rows"] == 5
    assert prepared.train_conversations[1] == [Message("user", "What is 1+1?"), Message("assistant", "2")]
    assert f"{data}:6" in prepared.stats["skipped"]["examples"][0] and "dialogue" in prepared.stats["skipped"]["examples"][0]


# -- register_chat_templates ----------------------------------------------------------------
@dataclass
class BracketOptions:
    answer_tag: str = opt("[A]", "What starts an answer.")


class BracketTemplate(TurnTemplate):
    """``[Q] question\\n[A]\\nanswer<|im_end|>\\n``, with the answer tag configurable."""

    name = "brackets"
    version = "1"
    description = "[Q]/[A] lines"
    options = BracketOptions
    user = Turn("[Q] ", "\n")
    assistant = Turn("[A]\n", "\n")
    eot = "<|im_end|>"

    def configure(self, options: BracketOptions) -> "BracketTemplate":
        configured = BracketTemplate()
        configured.assistant = Turn(options.answer_tag + "\n", "\n")
        return configured


class BracketPlugin:
    @hookimpl
    def register_chat_templates(self, register):
        register(BracketTemplate())


def test_hook_register_chat_templates(sft_plugin_manager, tiny_model_dir, tiny_tokenizer, tmp_path: Path):
    from sft.core.data import build_datasets

    sft_plugin_manager.register(BracketPlugin(), "bracket-plugin")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "template.name=brackets", "template.brackets.answer_tag=<ANS>")
    prepared = build_datasets(cfg, None, tiny_tokenizer, use_cache=False, quiet=True)
    assert prepared.stats["template"] == "brackets"
    row = prepared.train[0]
    conversation = prepared.train_conversations[0]
    text = tiny_tokenizer.decode(row["input_ids"])
    assert text.startswith("[Q] ") and "\n<ANS>\n" in text  # rendered by the template, with its options
    answers = [m.content + "<|im_end|>" for m in conversation if m.role == "assistant"]
    assert trained_spans(row["input_ids"], row["assistant_masks"], tiny_tokenizer) == answers
    assert tiny_tokenizer.chat_template == BracketTemplate().configure(BracketOptions("<ANS>")).jinja(tiny_tokenizer)
