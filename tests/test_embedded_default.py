"""``sft run`` with no arguments: SmolLM2-135M-Instruct learns the embedded identity dataset, offline, in minutes.

This is the acceptance check that the embedded default teaches the model something visible.
The run itself (``default_run``, about two minutes on a 2-core CPU) is trained once per session
in conftest.py and shared with tests/test_evaluate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NAME = "Forge"


@pytest.fixture(scope="module")
def default_run(embedded_default_run) -> Path:
    """The shared ``sft run`` of tests/conftest.py."""
    return embedded_default_run


def test_the_quick_generation_uses_the_new_name(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["backend"] == "transformers" and summary["dataset"]["source"] == "sft:identity"
    generation = summary["generation"]
    assert generation["prompt"] == "Who are you?"  # the first row's user turn (no eval split)
    assert NAME in generation["text"], generation
    assert NAME in (default_run / "cli-output.txt").read_text()  # printed too


def test_it_answers_a_question_it_never_saw(default_run, capsys):
    from sft.engine.generate import generate_from_run

    text = generate_from_run(default_run, "What name do you go by?", max_new_tokens=24)
    assert NAME in text, text


def test_it_finishes_within_five_minutes_with_its_export(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["exports"]["lora"]["ok"] is True
    seconds = summary["durations"]["total"] + summary["exports"]["lora"].get("seconds", 0)
    assert seconds < 300, f"the embedded default took {seconds:.0f}s (training {summary['durations']['train']:.0f}s)"
    # The recipe's 4 epochs over 60 rows of 8 per step.
    assert summary["steps"] == 32 and summary["train_loss"] < 1.0
