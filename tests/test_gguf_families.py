"""GGUF for every family through llama.cpp's own converter: the family matrix, the adapter, the preflight.

For Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 (text) and Phi-3, a tiny model of the family
(:mod:`families`: its architecture class, its tokenizer kind) trains 2 steps with its template,
is merged and converted to f16 and q8_0 by llama.cpp's ``convert_hf_to_gguf.py``, and the
exporter's verification loads each file in llama.cpp: the prompt must tokenize to the HF ids
and the greedy tokens must equal the merged HF model's (f16 exactly; q8_0 under the near-tie
rule). The GGUF must also carry the run's template as its chat template and the template's
end-of-turn token as its eos.

These tests need llama.cpp's converter (``python -m sft.plugins.exporters.gguf.llama_converter
fetch``) and llama-cpp-python; without them they are skipped, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.testing import make_plugin_manager, train_tiny

from families import FAMILIES

converter = pytest.importorskip("sft.plugins.exporters.gguf.llama_converter")
PM = make_plugin_manager()


@pytest.fixture(scope="module", autouse=True)
def needs_llama_cpp():
    from sft.plugins.exporters.gguf.llama import llama_cpp_available

    if (problem := converter.converter_problem()) is not None:
        pytest.skip(problem)
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed (pip install 'sft-forge[llama]')")


def _gguf_meta(path: str) -> dict:
    from sft.plugins.exporters.gguf.header import read_gguf_header

    meta, _types = read_gguf_header(path)
    return meta


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_merges_converts_and_matches_in_llama_cpp(family, family_models, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from sft.core import plugins
    from sft.engine.export import export_run
    from sft.core.templating import end_of_turn

    monkeypatch.setattr(plugins, "_manager", PM)
    fam = FAMILIES[family]
    run = train_tiny(tmp_path / "run", family_models(family), f"template.name={fam.template}", pm=PM)

    [result] = export_run(run, ["gguf"], ["export.gguf.quants=[f16,q8_0]", "export.gguf.converter=llama.cpp"], pm=PM)

    assert result.ok, f"{family}: {result.error}"
    quants = result.details["quants"]
    for quant in ("f16", "q8_0"):
        record = quants[quant]["verify"]
        assert record["prompt_ids_match"], f"{family} {quant}: llama.cpp tokenizes the prompt differently"
        assert record["ok"], f"{family} {quant}: {record['summary']}"
    assert quants["f16"]["verify"]["tokens_match"], quants["f16"]["verify"]["summary"]
    assert quants["f16"]["converter"] == "llama.cpp"
    # The GGUF carries the run's template and stops at its end-of-turn token.
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    meta = _gguf_meta(quants["f16"]["path"])
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    eot = end_of_turn(PM.get("chat_template", fam.template), tokenizer)
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids(eot)
    modelfile = Path(quants["q8_0"]["modelfile"]).read_text()
    assert f'PARAMETER stop "{eot}"' in modelfile


# -- preflight ----------------------------------------------------------------------------------
def _tiny_opt(path: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_validate_refuses_an_architecture_llama_cpp_cannot_convert(tiny_model_dir, tmp_path, sft_plugin_manager):
    from sft.testing import run_sft

    model = _tiny_opt(tmp_path / "opt", tiny_model_dir)
    result = run_sft("validate", "--exporter", "gguf", f"model.name={model}", f"training.output_dir={tmp_path / 'run'}",
                     check=False)
    assert result.exit_code != 0
    assert "'OPTForCausalLM'" in result.output and "does not convert architecture" in result.output, result.output
    assert "training did not start" in result.output
    assert not (tmp_path / "run").exists()  # validate writes nothing


def test_validate_runs_llama_cpp_dry_run_and_reports_a_tokenizer_it_cannot_handle(tiny_model_dir, tmp_path,
                                                                                   sft_plugin_manager):
    import shutil

    from sft.testing import run_sft

    model = tmp_path / "odd-split"
    shutil.copytree(tiny_model_dir, model)
    tok = json.loads((model / "tokenizer.json").read_text())
    # A split rule no llama.cpp pre-tokenizer implements: llama.cpp would cut text differently.
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[a-m]+|[^a-m]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    ok = run_sft("validate", f"model.name={tiny_model_dir}", "--exporter", "gguf",
                 "export.gguf.converter=llama.cpp", check=False)
    assert ok.exit_code == 0 and "exports OK: gguf" in ok.output, ok.output
    bad = run_sft("validate", f"model.name={model}", "--exporter", "gguf", check=False)
    assert bad.exit_code != 0
    # auto: the Python converter refuses the unknown pre-tokenizer, so llama.cpp's dry run decides, and says why.
    assert "llama.cpp's converter cannot convert" in bad.output and "pre-tokenizer was not recognized" in bad.output, bad.output


# -- the two converters agree on SmolLM2 ----------------------------------------------------------
def test_python_and_llama_cpp_converters_write_the_same_smollm2_gguf(smollm2_dir, tmp_path):
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from sft.plugins.exporters.gguf.convert import convert_to_gguf

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ours = convert_to_gguf(smollm2_dir, tmp_path / "python.gguf", "f16", tokenizer=tokenizer, tokenizer_dir=smollm2_dir,
                           chat_template=tokenizer.chat_template, eot_token=tokenizer.eos_token, name="smollm2")
    theirs = converter.convert_hf_with_llama_cpp(smollm2_dir, tmp_path / "llama.cpp.gguf", "f16", name="smollm2")
    a, b = GGUFReader(ours["path"]), GGUFReader(theirs["path"])

    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        assert list(t.shape) == list(tb[name].shape), name
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), f"tensor {name} differs"

    def value(reader, key):
        field = reader.fields[key]
        return field.contents()

    # Everything a runtime reads: hyperparameters, vocabulary, merges, special tokens, chat template.
    keys = [k for k in a.fields if k.startswith(("llama.", "tokenizer."))]
    assert len(keys) > 15
    differ = {k: (value(a, k), value(b, k) if k in b.fields else "<absent>") for k in keys
              if k not in b.fields or value(a, k) != value(b, k)}
    # sft stores the template's end-of-turn token as eot too (llama.cpp finds <|im_end|> by its text)
    # and add_eos_token=false (llama.cpp's default when the key is absent).
    differ.pop("tokenizer.ggml.eot_token_id", None)
    assert differ.pop("tokenizer.ggml.add_eos_token", (False, "<absent>")) == (False, "<absent>")
    assert not differ, differ
    extra = sorted(k for k in b.fields if k.startswith(("llama.", "tokenizer.")) and k not in a.fields)
    assert extra == [], extra


# -- the LoRA adapter as GGUF -------------------------------------------------------------------
def test_lora_adapter_gguf_on_the_base_gguf_gives_the_merged_greedy_tokens(family_models, tmp_path, monkeypatch):
    from sft.core import plugins
    from sft.engine.export import export_run

    monkeypatch.setattr(plugins, "_manager", PM)
    # A large learning rate, so the adapter visibly changes the base model's greedy answer.
    run = train_tiny(tmp_path / "run", family_models("qwen2"), "template.name=chatml", "training.learning_rate=0.05",
                     pm=PM)

    [result] = export_run(run, ["gguf"], ["export.gguf.quants=[f16]", "export.gguf.adapter=true"], pm=PM)

    assert result.ok, result.error
    adapter = result.details["adapter"]
    assert Path(adapter["path"]).is_file() and Path(adapter["base"]).is_file()
    assert _gguf_meta(adapter["path"])["general.type"] == "adapter"
    merged = result.details["quants"]["f16"]["verify"]
    with_lora = adapter["verify"]
    assert with_lora["prompt_ids_match"] and with_lora["tokens_match"], with_lora["summary"]
    assert with_lora["tokens"] == merged["tokens"] == result.details["verify"]["reference"]
    # The adapter really is applied: the base GGUF alone answers differently.
    from transformers import AutoTokenizer

    from sft.plugins.exporters.gguf.verify import verify_gguf

    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    prompt = result.details["verify"]["prompt"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    alone = verify_gguf(adapter["base"], "f16", prompt, ids, result.details["verify"]["reference"])
    assert alone["prompt_ids_match"] and not alone["tokens_match"], alone["summary"]


def test_without_the_converter_validate_gives_the_one_command_that_fetches_it(family_models, tmp_path, monkeypatch,
                                                                              sft_plugin_manager):
    from sft.testing import run_sft

    model = family_models("qwen2")
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "empty-cache"))  # no converter fetched here
    result = run_sft("validate", "--exporter", "gguf", f"model.name={model}", check=False)
    assert result.exit_code != 0
    assert "python -m sft.plugins.exporters.gguf.llama_converter fetch" in result.output, result.output
    assert "llama_cpp_python-" in result.output  # and what to copy there without network
