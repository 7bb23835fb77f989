"""``sft generate/chat RUN --gguf``: the exported GGUF answers through llama.cpp, in the worker process."""

from __future__ import annotations

import shutil

import pytest

from sft.testing import run_sft

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf_run(tiny_run, tmp_path_factory):
    from sft.engine.export import export_run

    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("gguf-chat") / "run")
    [result] = export_run(run, ["gguf"], ["export.gguf.quants=[f16]"])
    assert result.ok, result.error
    return run


def test_generate_with_the_gguf_answers_like_the_adapter(gguf_run):
    """f16 keeps the weights, and the GGUF carries the run's chat template: greedy answers agree."""
    from_adapter = run_sft("generate", gguf_run, "Who are you?", "--max-new-tokens", "6").stdout.strip()
    from_gguf = run_sft("generate", gguf_run, "Who are you?", "--max-new-tokens", "6", "--gguf").stdout.strip()
    assert from_gguf and from_gguf == from_adapter


def test_chat_with_the_gguf_samples_with_a_seed(gguf_run):
    args = ["chat", gguf_run, "--gguf", "--max-new-tokens", "5", "--temperature", "0.9", "--seed", "3", "--system", "Be brief."]
    first = run_sft(*args, input="hello\n\n").stdout
    assert first.count("bot> ") == 1 and first == run_sft(*args, input="hello\n\n").stdout


def test_a_run_without_that_export_says_how_to_make_it(tiny_run):
    result = run_sft("chat", tiny_run, "--gguf", input="hi\n", check=False)
    assert result.exit_code == 1 and f"has no gguf export yet; make one with: sft export {tiny_run} --exporter gguf" in result.output
    lora = run_sft("generate", tiny_run, "hi", "--export", "lora", check=False)
    assert lora.exit_code == 1
