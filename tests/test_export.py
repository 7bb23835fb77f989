"""Exporters: lora, merged_16bit, merged_4bit (refused on CPU), gguf, preflight, failure
isolation and ``sft export`` retries, on tiny runs trained by the real training core, plus the
SmolLM2 acceptance run (``sft run`` with the embedded default, then the exporters).

Where a test needs a property training for two steps does not give, the run is built by hand
in the same layout (:func:`build_run`): an adapter whose B matrices are large and random, so a
merge that dropped the adapter could not pass for a correct one.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from sft.core import hookimpl
from sft.core.interfaces import ExportResult, Exporter
from sft.testing import make_plugin_manager, run_sft


def build_run(run_dir: Path, model_dir: Path | str, *overrides: str, b_std: float = 0.02, seed: int = 0) -> Path:
    """A finished run directory in ``sft run``'s layout: config.yaml + adapter/ (LoRA with random B + tokenizer)."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.engine.configuration import load_config
    from sft.core.templating import prepare_tokenizer
    from sft.engine.models import resolve_model

    pm = make_plugin_manager()
    cfg = load_config(overrides=[f"model.name={model_dir}", "model.method=lora", "lora.r=4", "lora.lora_alpha=8",
                                 f"training.output_dir={run_dir}", *overrides], pm=pm)
    template = pm.get("chat_template", cfg.template.name)
    model_dir = resolve_model(str(model_dir))  # the embedded default resolves to its local folder
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    added = prepare_tokenizer(tokenizer, template, cfg)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    run_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(run_dir / "adapter"), save_embedding_layers=bool(added))
    tokenizer.save_pretrained(str(run_dir / "adapter"))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "summary.json").write_text(json.dumps({"status": "ok"}) + "\n")
    return run_dir


@pytest.fixture
def run_dir(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the test kit's tiny run (trained 2 steps by the training core, chatml)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


@pytest.fixture
def random_b_run(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return build_run(tmp_path / "run", tiny_model_dir)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def llama_cpp_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata as llama.cpp itself reads it (vocabulary only, no weights)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return {**llm.metadata, "n_vocab": str(llm.n_vocab())}
    finally:
        llm.close()


def test_lora_export_carries_adapter_and_chat_template(run_dir: Path, sft_plugin_manager) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_sft("export", run_dir, "--exporter", "lora")
    assert "export lora: ok" in result.output
    out = run_dir / "exports" / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)
    record = summary(run_dir)["exports"]["lora"]
    assert record["ok"] and record["details"]["verify"]["lora_tensors"] > 0
    assert summary(run_dir)["status"] == "ok" and summary(run_dir)["steps"] == 2  # the training summary is kept


def test_merged_16bit_matches_base_plus_adapter(random_b_run: Path, sft_plugin_manager) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_sft("export", random_b_run, "--exporter", "merged_16bit")
    out = random_b_run / "exports" / "merged_16bit"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    cfg_name = json.loads((out / ".sft-merged.json").read_text())["base_model"]
    base = AutoModelForCausalLM.from_pretrained(cfg_name, dtype=torch.float32)
    plain_base = AutoModelForCausalLM.from_pretrained(cfg_name, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, random_b_run / "adapter")
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2, 198]])
    with torch.no_grad():
        want, got, before = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, plain_base(input_ids=ids).logits
    # Close to base+adapter (bf16 storage), and the adapter really changed the model.
    assert (got - want).norm() / want.norm() < 0.02
    assert (before - want).norm() > 10 * (got - want).norm()
    details = summary(random_b_run)["exports"]["merged_16bit"]["details"]
    assert details["verify"]["ok"] and details["trained_in_4bit"] is False


def test_merged_4bit_refused_on_cpu_with_reason(run_dir: Path, sft_plugin_manager) -> None:
    result = run_sft("export", run_dir, "--exporter", "merged_4bit", check=False)
    assert result.exit_code == 1
    error = summary(run_dir)["exports"]["merged_4bit"]["error"]
    assert "needs a CUDA GPU" in error and "bitsandbytes" in error
    assert not (run_dir / "exports" / "merged_4bit").exists()


def test_gguf_f16_tiny_verified_with_metadata_and_modelfile(run_dir: Path, sft_plugin_manager) -> None:
    from transformers import AutoTokenizer

    from sft.plugins.exporters.gguf.header import gguf_tensor_types

    run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[f16]", "export.gguf.name=tiny")
    path = run_dir / "exports" / "gguf" / "tiny-F16.gguf"
    fields = llama_cpp_metadata(path)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    template = sft_plugin_manager.get("chat_template", "chatml")
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.chat_template"] == template.jinja(tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == str(im_end) == fields["tokenizer.ggml.eot_token_id"]
    assert fields["tokenizer.ggml.padding_token_id"] == str(tokenizer.pad_token_id) != str(im_end)
    assert fields["llama.block_count"] == "2" and fields["llama.embedding_length"] == "64"
    assert fields["n_vocab"] == str(len(tokenizer))
    types = Counter(gguf_tensor_types(path).values())
    assert types == {"F16": 2 * 7 + 2, "F32": 2 * 2 + 1}  # 7 matrices per block + embed + output; norms F32

    record = summary(run_dir)["exports"]["gguf"]
    verify = record["details"]["quants"]["f16"]["verify"]
    assert record["ok"] and verify["ok"] and verify["prompt_ids_match"] and verify["tokens_match"]
    assert verify["tokens"] == record["details"]["verify"]["reference"] and len(verify["tokens"]) == 16

    modelfile = (run_dir / "exports" / "gguf" / "tiny-F16.Modelfile").read_text()
    assert "FROM ./tiny-F16.gguf\n" in modelfile
    assert f'TEMPLATE """{template.ollama_template(tokenizer)}"""\n' in modelfile
    assert modelfile.rstrip().endswith('PARAMETER stop "<|im_end|>"')
    # Reusing a merge: no merged_16bit was requested, so the temporary merge is gone.
    assert not (run_dir / "exports" / ".tmp").exists()


def test_gguf_python_converter_refuses_non_llama_architecture(tmp_path: Path, tiny_model_dir: Path,
                                                               sft_plugin_manager) -> None:
    # export.gguf.converter=python: sft's own converter only (auto hands a Qwen2 to llama.cpp's, test_gguf_families.py).
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    qwen.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    run = build_run(tmp_path / "run", tmp_path / "qwen")
    result = run_sft("export", run, "--exporter", "gguf", "--exporter", "lora", "export.gguf.converter=python",
                     check=False)
    assert result.exit_code == 1
    exports = summary(run)["exports"]
    assert exports["lora"]["ok"]  # the other exporter still ran
    assert "Llama family only" in exports["gguf"]["error"] and "Qwen2ForCausalLM" in exports["gguf"]["error"]
    assert "export.gguf.converter=llama.cpp" in exports["gguf"]["error"]
    assert exports["gguf"]["error"].startswith("preflight:")
    assert not (run / "exports" / "gguf").exists()  # nothing written: refused before any work


def test_preflight_reports_missing_tokenizer_and_disk(run_dir: Path, sft_plugin_manager, monkeypatch) -> None:
    import shutil as shutil_module

    (run_dir / "adapter" / "tokenizer.json").unlink()
    run_sft("export", run_dir, "--exporter", "gguf", check=False)
    assert "missing tokenizer file" in summary(run_dir)["exports"]["gguf"]["error"]

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real(p)._replace(free=1000))
    result = run_sft("export", run_dir, "--exporter", "merged_16bit", check=False)
    assert result.exit_code == 1
    error = summary(run_dir)["exports"]["merged_16bit"]["error"]
    assert "not enough free disk for the merged_16bit export" in error
    assert not (run_dir / "exports" / "merged_16bit").exists()


def test_unknown_exporter_gets_did_you_mean(run_dir: Path, sft_plugin_manager) -> None:
    result = run_sft("export", run_dir, "--exporter", "gguff", check=False)
    assert result.exit_code == 2
    assert "did you mean 'gguf'" in result.output


def test_unknown_quant_is_a_config_error(run_dir: Path, sft_plugin_manager) -> None:
    result = run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[q4_k_n]", check=False)
    assert result.exit_code == 2
    assert "export.gguf.quants" in result.output and "did you mean 'q4_k_m'" in result.output


def test_export_needs_a_finished_run(tmp_path: Path, sft_plugin_manager) -> None:
    (tmp_path / "config.yaml").write_text("{}\n")
    result = run_sft("export", tmp_path, "--exporter", "lora", check=False)
    assert result.exit_code == 1 and "adapter" in result.output


def test_sft_run_checks_exports_before_training(tmp_path: Path, tiny_model_dir: Path, sft_plugin_manager) -> None:
    """An export that cannot work stops ``sft run`` before the model loads, with every reason."""
    from sft.testing import tiny_overrides

    out = tmp_path / "run"
    result = run_sft("run", *tiny_overrides(out, tiny_model_dir), "export.enabled=[lora,merged_4bit,gguf]",
                     "export.gguf.quants=[q8_0]", check=False)
    assert result.exit_code == 1
    assert "training did not start" in result.output and "merged_4bit needs a CUDA GPU" in result.output
    assert "lora:" not in result.output and "gguf:" not in result.output  # those two can work
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists()


# -- failure isolation and retries ----------------------------------------------------------------
class FlakyExporter(Exporter):
    """Fails while the run folder holds a FAIL file, then writes one file."""

    name = "flaky"
    description = "test exporter that fails on demand"

    def export(self, context, options=None) -> ExportResult:
        if (context.run_dir.root / "FAIL").exists():
            raise RuntimeError("injected failure")
        out = context.output_dir(self.name) / "done.txt"
        out.write_text("ok\n")
        return ExportResult(self.name, ok=True, paths=[str(out)])


class FlakyPlugin:
    @hookimpl
    def register_exporters(self, register):
        register(FlakyExporter())


def test_injected_failure_keeps_other_outputs_and_sft_export_retries(run_dir: Path, sft_plugin_manager) -> None:
    sft_plugin_manager.register(FlakyPlugin(), "flaky-plugin")
    (run_dir / "FAIL").write_text("")
    result = run_sft("export", run_dir, "--exporter", "lora", "--exporter", "flaky", "--exporter", "gguf",
                     "export.gguf.quants=[f16]", check=False)
    assert result.exit_code == 1
    exports = summary(run_dir)["exports"]
    assert exports["lora"]["ok"] and exports["gguf"]["ok"]  # before and after the failure
    assert not exports["flaky"]["ok"] and "injected failure" in exports["flaky"]["error"]
    kept = {p: p.stat().st_mtime_ns for p in (run_dir / "exports").rglob("*") if p.is_file()}
    assert any(p.suffix == ".gguf" for p in kept) and any(p.name == "adapter_model.safetensors" for p in kept)

    (run_dir / "FAIL").unlink()
    run_sft("export", run_dir, "--exporter", "flaky")
    exports = summary(run_dir)["exports"]
    assert exports["flaky"]["ok"] and exports["lora"]["ok"] and exports["gguf"]["ok"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # untouched by the retry


class AlwaysFailsExporter(FlakyExporter):
    name = "always_fails"

    def export(self, context, options=None) -> ExportResult:
        raise RuntimeError("injected failure")


class AlwaysFailsPlugin:
    @hookimpl
    def register_exporters(self, register):
        register(AlwaysFailsExporter())


def test_sft_run_exits_1_when_an_export_fails_and_says_how_to_retry(tmp_path: Path, tiny_model_dir: Path,
                                                                     sft_plugin_manager) -> None:
    from sft.testing import tiny_overrides

    sft_plugin_manager.register(AlwaysFailsPlugin(), "always-fails-plugin")
    out = tmp_path / "run"
    result = run_sft("run", *tiny_overrides(out, tiny_model_dir), "export.enabled=[lora,always_fails]", check=False)
    assert result.exit_code == 1
    assert f"sft export {out} --exporter always_fails" in result.output
    assert summary(out)["status"] == "ok" and summary(out)["exports"]["lora"]["ok"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_k_quant_without_llama_cpp_fails_clearly_then_retry_succeeds(run_dir: Path, sft_plugin_manager, monkeypatch) -> None:
    # A real failure: llama-cpp-python missing (an import of it fails, as on a machine without it).
    run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[f16]")
    f16 = run_dir / "exports" / "gguf" / f"{run_dir.name}-F16.gguf"
    before = f16.stat().st_mtime_ns
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "llama_cpp", None)
        result = run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[q4_k_m]", check=False)
    assert result.exit_code == 1
    error = summary(run_dir)["exports"]["gguf"]["error"]
    assert "pip install 'sft-forge[llama]'" in error and "q4_k_m" in error
    assert f16.stat().st_mtime_ns == before  # the earlier GGUF is intact

    run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[q4_k_m]", "export.gguf.verify_tokens=4")
    record = summary(run_dir)["exports"]["gguf"]
    q4 = record["details"]["quants"]["q4_k_m"]
    # hidden_size 64 is not a multiple of 256: llama.cpp falls back (q5_0, q8_0) for every matrix.
    assert q4["fallback_tensors"] > 0 and not any(t.endswith("_K") for t in q4["tensor_types"])
    # q5_0/q8_0 fallbacks of a tiny model: most teacher-forced tokens still agree with the HF model.
    assert record["ok"] and q4["verify"]["agreement"] >= 0.5 and q4["verify"]["prompt_ids_match"]
    assert f16.exists() and not list((run_dir / "exports").rglob("*F16-intermediate*"))


def test_gguf_with_added_eot_token(tmp_path: Path, tiny_model_dir: Path, sft_plugin_manager) -> None:
    """llama3 on SmolLM2's vocabulary: training adds the EOT and resizes the embeddings; the GGUF carries it."""
    from transformers import AutoTokenizer

    from sft.testing import train_tiny

    run = train_tiny(tmp_path / "run", tiny_model_dir, "template.name=llama3", pm=sft_plugin_manager)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    assert len(tokenizer) > 49152
    run_sft("export", run, "--exporter", "gguf", "export.gguf.quants=[f16]")
    fields = llama_cpp_metadata(run / "exports" / "gguf" / "run-F16.gguf")
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert fields["tokenizer.ggml.eot_token_id"] == fields["tokenizer.ggml.eos_token_id"] == str(eot)
    assert fields["llama.vocab_size"] == fields["n_vocab"] == str(len(tokenizer))
    assert summary(run)["exports"]["gguf"]["details"]["quants"]["f16"]["verify"]["tokens_match"]
    modelfile = (run / "exports" / "gguf" / "run-F16.Modelfile").read_text()
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "<|start_header_id|>" in modelfile


def test_export_context_reuses_merged_export(run_dir: Path, sft_plugin_manager) -> None:
    """gguf after merged_16bit converts from the merged export instead of merging again."""
    run_sft("export", run_dir, "--exporter", "merged_16bit", "--exporter", "gguf", "export.gguf.quants=[f16]", "export.verify=false")
    details = summary(run_dir)["exports"]["gguf"]["details"]
    assert details["merged_from"] == str(run_dir / "exports" / "merged_16bit")
    assert "verify" not in details


def test_exporter_options_listed_with_choices() -> None:
    from sft.core.config import build_schema, iter_schema_fields

    fields = {k: f for k, f, _ in iter_schema_fields(build_schema(make_plugin_manager()))}
    assert fields["export.gguf.quants"].metadata["choices"] == ("f16", "bf16", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")
    assert "export.merged_16bit.dtype" in fields and "export.merged_4bit.quant_type" in fields


def test_merge_dtype_auto_follows_base(run_dir: Path) -> None:
    from sft.engine.configuration import load_config
    from sft.core.templating import resolve_template
    from sft.engine.export import RunExportContext
    from sft.plugins.exporters.merging import merging_for

    pm = make_plugin_manager()
    cfg = load_config(str(run_dir / "config.yaml"), pm=pm)
    merging = merging_for(RunExportContext(run_dir, cfg, pm, resolve_template(cfg, pm)))
    assert merging.resolve_merge_dtype("auto") == "bfloat16"  # the tiny base is stored in float32
    assert merging.resolve_merge_dtype("float16") == "float16"
    (run_dir / "adapter" / "adapter_config.json").unlink()
    assert any("no adapter_config.json" in p for p in merging.merge_problems())


# -- acceptance on SmolLM2 (the embedded default model) -------------------------------------------
@pytest.mark.slow
def test_smollm2_default_run_exports_lora_merged_and_verified_gguf(tmp_path: Path, smollm2_dir: Path,
                                                                   sft_plugin_manager) -> None:
    """``sft run`` on the embedded default (SmolLM2-135M-Instruct, chatml), a short run, exporting
    lora, merged_16bit and gguf f16 + q8_0 + q4_k_m as part of the run."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft.core.config import DEFAULT_MODEL
    from sft.plugins.exporters.gguf.header import gguf_tensor_types
    from sft.testing import train_tiny

    run = train_tiny(tmp_path / "smol", DEFAULT_MODEL, "training.run_name=smol", "training.learning_rate=1e-3",
                     "export.enabled=[lora,merged_16bit,gguf]", "export.gguf.quants=[f16,q8_0,q4_k_m]",
                     pm=sft_plugin_manager)
    assert summary(run)["status"] == "ok"
    exports = summary(run)["exports"]
    assert all(exports[name]["ok"] for name in ("lora", "merged_16bit", "gguf")), exports

    # The merged folder, reloaded with plain transformers, gives logits close to base + adapter.
    merged = AutoModelForCausalLM.from_pretrained(run / "exports" / "merged_16bit", dtype=torch.float32)
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                                        run / "adapter")
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9

    gguf = exports["gguf"]["details"]
    assert gguf["merged_from"] == str(run / "exports" / "merged_16bit")  # reused, not merged twice
    reference = gguf["verify"]["reference"]
    f16 = gguf["quants"]["f16"]["verify"]
    assert f16["prompt_ids_match"] and f16["tokens_match"] and f16["tokens"] == reference, f16
    # q8_0 rounds every weight: its tokens equal the HF model's wherever the HF model is sure
    # (here a near-tie at one position may go the other way; the record names it).
    q8 = gguf["quants"]["q8_0"]["verify"]
    assert q8["ok"] and q8["prompt_ids_match"], q8
    flips = [i for i, (a, b) in enumerate(zip(q8["forced_tokens"], reference)) if a != b]
    assert flips == [t["position"] for t in q8["near_ties"]] and all(t["hf_gap"] < 0.5 for t in q8["near_ties"])
    assert len(flips) <= 2 and (q8["tokens_match"] or flips[0] == q8["prefix_match"])
    q4 = gguf["quants"]["q4_k_m"]
    assert q4["verify"]["prompt_ids_match"] and q4["verify"]["agreement"] >= 0.5
    # hidden_size 576 is not a multiple of 256: llama.cpp keeps K-quants for the 1536-wide
    # ffn_down rows and falls back to q5_0 (and q8_0) for the 576-wide ones.
    types = gguf_tensor_types(run / "exports" / "gguf" / "smol-Q4_K_M.gguf")
    assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K") and types["blk.0.attn_q.weight"] == "Q5_0"
    assert q4["fallback_tensors"] > 100

    modelfile = (run / "exports" / "gguf" / "smol-Q4_K_M.Modelfile").read_text()
    assert modelfile.splitlines()[2:] == [
        "FROM ./smol-Q4_K_M.gguf",
        *'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
         '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
         '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
         '{{ if $last }}<|im_start|>assistant\n{{ end }}'
         '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}'
         '{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}{{ end }}"""'.split("\n"),
        'PARAMETER stop "<|im_end|>"',
    ]
    assert sorted(p.name for p in (run / "exports" / "gguf").iterdir()) == [
        "smol-F16.Modelfile", "smol-F16.gguf", "smol-Q4_K_M.Modelfile", "smol-Q4_K_M.gguf",
        "smol-Q8_0.Modelfile", "smol-Q8_0.gguf"]


# -- conversion against transformers, logit by logit ----------------------------------------------
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 500000.0}


@pytest.mark.parametrize("shape", ["gqa", "llama3-rope"])
def test_f16_gguf_logits_match_transformers(shape: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """llama.cpp's logits of the converted F16 file equal transformers' on 100 positions.

    Larger initial weights (0.1) make attention depend on position, so a wrong q/k permutation
    (relative error ~2%) or missing llama3 rope factors (~50% at later positions) fail this.
    """
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.plugins.exporters.gguf.convert import convert_to_gguf
    from sft.plugins.exporters.gguf.header import gguf_tensor_types
    from sft.testing import make_tiny_llama

    extra = {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 2048} if shape == "llama3-rope" else {}
    model_dir = make_tiny_llama(tmp_path / "model", tokenizer_dir=tiny_model_dir, initializer_range=0.1, **extra)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = tmp_path / "model.gguf"
    info = convert_to_gguf(model_dir, out, "f16", tokenizer=tokenizer, tokenizer_dir=model_dir,
                           chat_template=None, eot_token="<|im_end|>", name="tiny")
    assert ("rope_freqs.weight" in gguf_tensor_types(out)) == (shape == "llama3-rope")
    assert info["tokenizer_pre"] == "smollm" and not out.with_name("model.gguf.partial").exists()

    ids = list(range(100, 400, 3))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(out), n_ctx=256, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    error = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert error.max() < 0.005, f"relative logit error up to {error.max():.4f} (position {error.argmax()})"


def test_verification_forgives_a_flip_only_at_a_near_tie() -> None:
    """The rule for f16/bf16/q8_0 (what llama.cpp did, judged against the HF logit gaps)."""
    from sft.plugins.exporters.gguf.verify import judge

    reference = [5, 6, 7, 8]
    raw = {"prompt_ids_match": True, "tokens": [5, 9, 1, 2], "forced_tokens": [5, 9, 7, 8], "text": "", "seconds": 0}
    tie = judge(raw, reference, True, lambda forced: [0.0, 0.2, 0.0, 0.0], 0.5)
    assert tie["ok"] and tie["near_ties"] == [{"position": 1, "hf_gap": 0.2}] and "near-ties" in tie["summary"]
    sure = judge(raw, reference, True, lambda forced: [0.0, 3.0, 0.0, 0.0], 0.5)
    assert not sure["ok"] and "at position 1, HF logit gap 3.00 >= 0.5" in sure["summary"]
    assert not judge(raw, reference, True, None, 0.5)["ok"]  # no gaps known: every flip fails
    assert judge(raw, reference, False, None, 0.5)["ok"]  # K-quants: agreement reported only
    assert judge(raw, reference, False, None, 0.5)["agreement"] == 0.75
    assert not judge({**raw, "prompt_ids_match": False}, reference, False, None, 0.5)["ok"]


def test_without_llama_cpp_the_default_writes_an_unverified_gguf_and_says_so(run_dir: Path, sft_plugin_manager,
                                                                             monkeypatch) -> None:
    """The README's first install has no llama-cpp-python: ``--exporter gguf`` still works out of
    the box (q8_0 in pure Python), marked unverified; ``export.verify=true`` refuses instead."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as on a machine without it
    result = run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[q8_0]")
    record = summary(run_dir)["exports"]["gguf"]
    assert record["ok"] and record["details"]["verify"]["skipped"] is True
    assert "quants" in record["details"] and "verify" not in record["details"]["quants"]["q8_0"]
    assert result.output.count("NOT verified") == 1 and "pip install 'sft-forge[llama]'" in result.output
    assert (run_dir / "exports" / "gguf" / f"{run_dir.name}-Q8_0.gguf").is_file()

    strict = run_sft("export", run_dir, "--exporter", "gguf", "export.gguf.quants=[q8_0]", "export.verify=true",
                     check=False)
    assert strict.exit_code == 1 and "export.verify=true: GGUF verification loads each file in llama.cpp" in strict.output


def test_a_llama_cpp_child_dead_of_an_illegal_instruction_says_how_to_rebuild() -> None:
    """A llama.cpp built for instructions the CPU refuses (a native AMX build on a VM that advertises
    AMX) kills the verification's child with SIGILL: the error says so and gives the rebuild command,
    not a bare exit status. The child here raises SIGILL itself (its request is the signal number)."""
    import signal

    from sft.core.errors import SftError
    from sft.plugins.exporters.gguf.worker import run_in_worker

    with pytest.raises(SftError, match=r"stopped \(SIGILL: .*-DGGML_NATIVE=OFF .*--force-reinstall"):
        run_in_worker("signal:raise_signal", int(signal.SIGILL))
    with pytest.raises(SftError, match=r"stopped \(killed by SIGABRT\)"):
        run_in_worker("signal:raise_signal", int(signal.SIGABRT))
