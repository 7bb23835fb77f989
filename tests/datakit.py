"""Shared helpers for the data-pipeline tests (imported by tests/test_data_*.py and test_templates*.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sft.engine.configuration import load_config

FIXTURES = Path(__file__).parent / "data"
#: The project's shared sample data: ../shared/data next to the checkout (absent on a clean CI checkout).
SHARED = Path(os.environ.get("SFT_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
REAL_SHAREGPT = SHARED / "fastchat_dummy_conversation.json"
REAL_ALPACA = SHARED / "fastchat_alpaca_cleaned_1000.json"


def data_config(model_dir: Any, dataset: Any, *overrides: str, pm: Any = None):
    """A validated config that reads ``dataset`` with ``model_dir``'s tokenizer; caching off unless overridden.
    ``dataset`` None: the overrides give the data (``data.datasets``)."""
    given = [] if dataset is None else [f"data.dataset={dataset}"]
    return load_config(overrides=[f"model.name={model_dir}", *given, "data.cache_dir='off'", *overrides], pm=pm)


def fresh_tokenizer(model_dir: Any):
    """A new tokenizer object: the pipeline adapts the one it is given, so tests never share one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def decoded_spans(ids: list[int], mask: list[int], tokenizer: Any) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    from sft.engine.preview import token_runs

    return [tokenizer.decode(run, skip_special_tokens=False) for trained, run in token_runs(ids, mask) if trained]


def assert_rows_exact(prepared: Any, tokenizer: Any, template: Any, raw_trained: Any = None) -> int:
    """Every training row trains exactly its assistant turns, each followed by the EOT (:func:`expected_spans`).

    A raw-text row (no conversation) trains ``raw_trained[i]``, its trained segments' text,
    followed by the end-of-sequence token. One leading space is tolerated, as in
    :func:`sft.testing.assert_exact_masking`: in ``ASSISTANT: answer`` layouts the
    separating space is part of the answer's first token. Returns the number of rows checked.
    """
    from sft.testing import expected_spans

    ids_col, mask_col = prepared.train["input_ids"], prepared.train["assistant_masks"]
    assert len(ids_col) == len(prepared.train_conversations)
    for i, (ids, mask, conversation) in enumerate(zip(ids_col, mask_col, prepared.train_conversations)):
        got = decoded_spans(ids, mask, tokenizer)
        if conversation:
            # content + EOT for the plain templates; the model's own turn text (Qwen3's empty think block) otherwise
            want = expected_spans(template, tokenizer, conversation)
        else:
            want = [raw_trained[i] + tokenizer.eos_token]
        ok = len(got) == len(want) and all(g == w or (g.startswith(" ") and g[1:] == w) for g, w in zip(got, want))
        assert ok, f"row {i} with template '{template.name}': trained {got!r}, expected {want!r}"
    return len(ids_col)


#: Run argv[1:] in a child and print its exit code and peak RSS (RUSAGE_CHILDREN: the largest child waited for,
#: its data workers included), then its output.
_PROBE = ("import resource, subprocess, sys\n"
          "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
          "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
          "print(p.stdout + p.stderr)\n")


def peak_rss(*command: str) -> tuple[int, int, str]:
    """``(exit code, peak resident memory in kB, output)`` of ``command`` run in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PROBE, *command], capture_output=True, text=True, check=True).stdout
    head, report = out.split("\n", 1)
    rc, peak_kb = map(int, head.split())
    return rc, peak_kb, report


_GET_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def faulty_rows(n: int, *, words: int, empty: int, robot: int, unread: int, undeclared_tool: int = 0) -> list[dict]:
    """``n`` OpenAI-messages rows with answers of 1 to ``words`` words, and faults spread over the file: every
    ``empty``-th row (from 7) an empty answer and every ``robot``-th (from 3) an unknown role (bad rows), every
    ``unread``-th (from 5) a column no format reads, every ``undeclared_tool``-th (from 11) a call of a tool
    the row does not declare (a warning; ChatML cannot render it)."""
    rows = []
    for i in range(n):
        answer = " ".join(f"word{j}" for j in range(i % words))
        row: dict = {"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"Answer {i}. {answer}"}]}
        if i % empty == 7:
            row["messages"][1]["content"] = "   "
        if i % robot == 3:
            row["messages"].insert(0, {"role": "robot", "content": "?"})
        if undeclared_tool and i % undeclared_tool == 11:
            row["tools"] = [_GET_WEATHER]
            row["messages"][1:1] = [
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "noon"}]
        if i % unread == 5:
            row["source"] = "unread column"
        rows.append(row)
    return rows


def piece_marking_tokenizer() -> Any:
    """A SentencePiece-style tokenizer that prefixes every separately encoded piece with a word boundary and
    merges ``==``: ``x=`` + ``=y`` is ``▁ x == y`` whole, ``▁x = ▁= y`` in pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581x": 1, "=": 2, "==": 3, "y": 4, "\u2581": 5, "x": 6, "\u2581=": 7}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("=", "=")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    backend.decoder = decoders.Metaspace(prepend_scheme="always", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
