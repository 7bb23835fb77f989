"""Tokens a run adds (``model.add_tokens``, ``model.add_special_tokens``): learned, emitted, and carried
by the merged and GGUF exports as single tokens; their rows start as ``model.new_token_init`` says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.testing import make_plugin_manager, tiny_config, train_tiny, write_jsonl

PLAIN, SPECIAL = "<tool>", "<|act|>"
ANSWER = f"{SPECIAL}{PLAIN}"


def test_two_added_tokens_are_learned_emitted_and_survive_merged_and_gguf(tiny_model_dir, tmp_path, sft_plugin_manager):
    pytest.importorskip("llama_cpp")
    import llama_cpp
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"Call number {i}."}, {"role": "assistant", "content": ANSWER}]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "calls.jsonl", rows)
    run = train_tiny(tmp_path / "run", tiny_model_dir, f"model.add_tokens=['{PLAIN}']",
                     f"model.add_special_tokens=['{SPECIAL}']", "training.learning_rate=1e-2",
                     "training.generation_prompt=Call number 3.", "training.generation_max_new_tokens=6",
                     "export.enabled=[merged_16bit,gguf]", "export.gguf.quants=[f16]",
                     dataset=data, steps=40, pm=sft_plugin_manager)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["generation"]["text"].startswith(ANSWER), summary["generation"]  # learned: the model emits them
    from sft.engine.generate import generate_from_run

    # The saved adapter and tokenizer on the base model (sft generate) emit them too.
    assert generate_from_run(run, "Call number 3.", max_new_tokens=6, stream=False).startswith(ANSWER)

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (PLAIN, SPECIAL)]
    assert all(i >= 49152 for i in ids) and tokenizer(ANSWER, add_special_tokens=False)["input_ids"] == ids[::-1]
    merged = AutoTokenizer.from_pretrained(run / "exports" / "merged_16bit")
    assert [merged.convert_tokens_to_ids(t) for t in (PLAIN, SPECIAL)] == ids
    assert summary["exports"]["merged_16bit"]["ok"], summary["exports"]["merged_16bit"]

    gguf = summary["exports"]["gguf"]
    assert gguf["ok"] and gguf["details"]["quants"]["f16"]["verify"]["tokens_match"], gguf
    llm = llama_cpp.Llama(str(run / "exports" / "gguf" / "run-F16.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.n_vocab() == len(tokenizer)
        for token, i in zip((PLAIN, SPECIAL), ids):
            assert llm.tokenize(token.encode(), add_bos=False, special=True) == [i], token
    finally:
        llm.close()
    # ... and the GGUF in llama.cpp, greedily, after the same prompt.
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Call number 3."}], tokenize=False,
                                           add_generation_prompt=True)
    llm = llama_cpp.Llama(str(run / "exports" / "gguf" / "run-F16.gguf"), n_ctx=256, verbose=False)
    try:
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        emitted = []
        for token in llm.generate(prompt_ids, temp=0.0, top_k=1):
            emitted.append(token)
            if len(emitted) == 2:
                break
        assert emitted == ids[::-1], emitted
    finally:
        llm.close()


def test_description_init_starts_each_row_at_its_descriptions_mean(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.engine.tokens import add_configured_tokens, initialise_new_rows

    cfg = tiny_config(tmp_path, tiny_model_dir, f"model.add_tokens=['{PLAIN}']", "model.new_token_init=description",
                      f"model.new_token_descriptions={{'{PLAIN}': 'call a tool'}}", pm=make_plugin_manager())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = len(tokenizer)
    assert add_configured_tokens(tokenizer, cfg) == 1 and add_configured_tokens(tokenizer, cfg) == 0  # idempotent
    model.resize_token_embeddings(len(tokenizer))
    initialise_new_rows(model, tokenizer, cfg, base, base)
    described = tokenizer("call a tool", add_special_tokens=False)["input_ids"]
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert torch.allclose(weight[base], weight[described].mean(dim=0), atol=1e-6)


def test_a_token_the_vocabulary_already_has_is_named_not_added(tiny_tokenizer, tiny_model_dir, tmp_path, capsys):
    from sft.engine.tokens import add_configured_tokens

    cfg = tiny_config(tmp_path, tiny_model_dir, f"model.add_tokens=[hello,'{PLAIN}']", pm=make_plugin_manager())
    size = len(tiny_tokenizer)
    assert add_configured_tokens(tiny_tokenizer, cfg) == 1 and len(tiny_tokenizer) == size + 1
    assert "model.add_tokens: 'hello' is already one token of the vocabulary; not added" in capsys.readouterr().err
