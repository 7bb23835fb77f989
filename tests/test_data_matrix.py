"""The acceptance matrix: every registered dataset format × every registered chat template.

The registry is iterated (the process-wide plugin manager, entry points included), so a
third-party format or template installed next to sft-forge joins the matrix by itself. Each
pair runs the real pipeline (:func:`build_datasets`) on every source the format recognises:
the small fixtures in tests/data, and the shared sample files in ../shared/data when they
exist (a clean CI checkout may not have them). Decoding the trained tokens of every row must
give exactly that row's assistant contents, each followed by the template's EOT token; the
JSONL sources streamed (``data.streaming``) must give the same rows.
"""

from __future__ import annotations

import json

import pytest

from sft.engine.data import build_datasets, read_rows
from sft.engine.data.streaming import stream_rows
from sft.core.templating import resolve_template
from sft.core.plugins import get_plugin_manager

from datakit import FIXTURES, REAL_ALPACA, REAL_SHAREGPT, assert_rows_exact, data_config, fresh_tokenizer

PM = get_plugin_manager()
FORMATS = sorted(PM.registry("dataset_format"))
TEMPLATES = sorted(PM.registry("chat_template"))


def _real_as_messages(tmp_path):
    """The shared ShareGPT file rewritten as OpenAI messages (in tmp, never in the repo), so the
    messages format also runs on real content."""
    rows = json.loads(REAL_SHAREGPT.read_text())
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    path = tmp_path / "real_messages.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": roles[t["from"]], "content": t["value"]}
                                                      for t in r["conversations"]]}) + "\n" for r in rows))
    return path


def _samples_file(fmt, tmp_path):
    """The format's own ``sample_rows`` as a JSONL file: how a third-party format joins the matrix."""
    path = tmp_path / f"{fmt.name}-samples.jsonl"
    path.write_text("".join(json.dumps(dict(row)) + "\n" for row in fmt.sample_rows))
    return path


def _sources(tmp_path, fmt):
    sources = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".json", ".jsonl", ".csv", ".parquet"))
    if fmt.sample_rows:
        sources.append(_samples_file(fmt, tmp_path))
    for real in (REAL_SHAREGPT, REAL_ALPACA):
        if real.is_file():
            sources.append(real)
        elif real.parent.is_dir():  # the shared data is here but this file is not: renamed or lost, never ignored
            pytest.fail(f"{real.name} is missing from {real.parent}; the matrix would silently skip real data")
    if REAL_SHAREGPT.is_file():
        sources.append(_real_as_messages(tmp_path))
    return sources


def _raw_trained(fmt, cfg, source) -> list[str] | None:
    """For a raw-text format (``text``, ``completion``): each row's trained text, from its segments."""
    from sft.core.config import plugin_options

    rows, _ = read_rows(str(source))
    options = plugin_options(cfg, "dataset_format", fmt.name, PM)
    segments = [fmt.to_segments(row, options) for row in rows]
    if any(s is None for s in segments):
        return None
    return ["".join(s.text for s in row if s.trained) for row in segments]


def _columns(path) -> list[str]:
    rows, _ = read_rows(str(path))
    return sorted({k for r in rows[:100] for k in r})


@pytest.mark.parametrize("template_name", TEMPLATES)
@pytest.mark.parametrize("format_name", FORMATS)
def test_every_format_with_every_template_trains_exactly_the_answers(format_name, template_name, smollm2_dir, tmp_path):
    fmt = PM.get("dataset_format", format_name)
    sources = [p for p in _sources(tmp_path, fmt) if fmt.detect(_columns(p))]
    if not sources:
        pytest.fail(f"no fixture or shared file is in the '{format_name}' format, and it declares no sample_rows")
    if fmt.row_kind != "conversation":
        assert _preference_rows_exact(fmt, template_name, smollm2_dir, sources) > 0
        return
    checked = 0
    for source in sources:
        cfg = data_config(smollm2_dir, source, f"data.format={format_name}", f"template.name={template_name}", pm=PM)
        tokenizer = fresh_tokenizer(smollm2_dir)
        template = resolve_template(cfg, PM)
        prepared = build_datasets(cfg, PM, tokenizer)
        assert prepared.stats["skipped"]["count"] == 0, prepared.stats["skipped"]
        assert prepared.stats["train_rows"] == prepared.stats["rows"]
        checked += assert_rows_exact(prepared, tokenizer, template, _raw_trained(fmt, cfg, source))
        if source.suffix in (".jsonl", ".parquet"):  # streamed (data.streaming), the same rows: exact there too
            streamed, _stats = stream_rows(cfg, PM, fresh_tokenizer(smollm2_dir))
            assert [(r["input_ids"], r["assistant_masks"]) for r in streamed] == list(
                zip(prepared.train["input_ids"], prepared.train["assistant_masks"]))
    assert checked > 0


def _preference_rows_exact(fmt, template_name, model_dir, sources) -> int:
    """A preference format's rows, prepared for an objective of their kind: each completion's scored
    tokens decode to exactly what the template's own Jinja renders for that answer (its span up to
    and including the end-of-turn token, :func:`sft.testing.expected_spans`), after exactly the
    tokens of the template's generation prompt. Returns the number of completions checked."""
    from sft.core.config import plugin_options
    from sft.testing import expected_spans

    objective = {"pair": "dpo", "labelled": "kto"}[fmt.row_kind]
    checked = 0
    for source in sources:
        # Long enough for every real row: the matrix checks rendering, not the length policy.
        cfg = data_config(model_dir, source, f"data.format={fmt.name}", f"template.name={template_name}",
                          f"objective.name={objective}", "model.max_seq_length=16384", pm=PM)
        tokenizer = fresh_tokenizer(model_dir)
        template = resolve_template(cfg, PM)
        prepared = build_datasets(cfg, PM, tokenizer)
        assert prepared.stats["skipped"]["count"] == 0, prepared.stats["skipped"]
        assert prepared.stats["train_rows"] == prepared.stats["rows"]
        rows, _ = read_rows(str(source))
        options = plugin_options(cfg, "dataset_format", fmt.name, PM)
        for row, pref in zip(prepared.train, (fmt.to_preference(r, options) for r in rows)):
            prompt = tokenizer.decode(row["prompt_ids"])
            assert prompt == template.generation_prompt(pref.prompt, tokenizer) or \
                row["prompt_ids"] == tokenizer(template.generation_prompt(pref.prompt, tokenizer),
                                               add_special_tokens=False)["input_ids"]
            for key, completion in zip(("chosen_ids", "rejected_ids") if pref.rejected else ("completion_ids",),
                                       pref.completions()):
                want = expected_spans(template, tokenizer, [*pref.prompt, completion])[-1]
                got = tokenizer.decode(row[key])
                assert got == want or (got.startswith(" ") and got[1:] == want), (
                    f"template '{template.name}' scores {got!r} for {key}, expected {want!r}")
                checked += 1
    return checked


def test_the_shared_files_are_in_the_matrix_when_present(tmp_path):
    if not REAL_SHAREGPT.parent.is_dir():
        # The folder's name, not its path: a skip reason is read on other machines too.
        pytest.skip(f"the shared {REAL_SHAREGPT.parent.name}/ folder is absent (a clean checkout): the matrix ran on the in-repo fixtures only")
    assert {"sharegpt", "alpaca", "messages"} <= set(FORMATS)
    used = {name: [p.name for p in _sources(tmp_path, PM.get("dataset_format", name))
                   if PM.get("dataset_format", name).detect(_columns(p))] for name in ("sharegpt", "alpaca", "messages")}
    assert REAL_SHAREGPT.name in used["sharegpt"], used
    assert REAL_ALPACA.name in used["alpaca"], used
    assert "real_messages.jsonl" in used["messages"], used
