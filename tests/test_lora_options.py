"""What a notebook passes to get_peft_model and the trainer (issue 28), each shown to change what trains.

Tiny Llama on CPU with the transformers backend, the real stack throughout: DoRA's magnitudes
move, PiSSA changes the starting weights and its adapter is converted for the original base,
``modules_to_save`` trains and saves the module, the optimizer's groups carry
``embedding_learning_rate`` and LoRA+'s rates, and the refusals name their key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.engine.configuration import load_config
from sft.core.errors import ConfigError, SftError
from sft.testing import make_plugin_manager, run_sft, tiny_config, tiny_overrides, train_tiny


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager()


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def base_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# -- the keys, as notebooks spell them -----------------------------------------------------
def test_flat_notebook_spellings_resolve_to_the_lora_and_training_keys(pm, capsys):
    cfg = load_config(overrides=["use_dora=true", "lora_modules_to_save=[lm_head]", "embedding_learning_rate=5e-5",
                                 "loraplus_lr_ratio=16", "init_lora_weights=gaussian", "model.method=lora"], pm=pm)
    assert cfg.lora.use_dora is True and list(cfg.lora.modules_to_save) == ["lm_head"]
    assert cfg.training.embedding_learning_rate == 5e-5 and cfg.training.loraplus_lr_ratio == 16
    assert "lora_modules_to_save=['lm_head'] read as lora.modules_to_save" in capsys.readouterr().err

    from sft.plugins.backends.common import lora_settings

    settings = lora_settings(cfg)
    assert settings["use_dora"] is True and settings["init_lora_weights"] == "gaussian"
    assert settings["modules_to_save"] == ["lm_head"] and settings["target_parameters"] is None
    # YAML's `init_lora_weights: true` is PEFT's True; a loftq_config alone is LoftQ, as before the key existed.
    assert lora_settings(load_config(overrides=["lora.init_lora_weights=true"], pm=pm))["init_lora_weights"] is True
    loftq = lora_settings(load_config(overrides=["model.method=lora", "lora.loftq_config={loftq_bits: 4}"], pm=pm))
    assert loftq["init_lora_weights"] == "loftq" and loftq["loftq_config"] == {"loftq_bits": 4}


@pytest.mark.parametrize("overrides, key, message", [
    (["lora.init_lora_weights=pisa"], "lora.init_lora_weights", "did you mean 'pissa'"),
    (["lora.init_lora_weights=pissa_niter_x"], "lora.init_lora_weights", "pissa_niter_N"),
    (["model.method=lora", "lora.init_lora_weights=eva"], "lora.init_lora_weights", "pass over the training data"),
    (["model.method=qlora", "lora.init_lora_weights=pissa_niter_4"], "lora.init_lora_weights", "4-bit QLoRA base"),
    (["model.method=qlora", "lora.loftq_config={loftq_bits: 4}"], "lora.loftq_config", "LoftQ quantizes"),
    (["model.method=full", "lora.use_dora=true"], "lora.use_dora", "model.method=full trains every weight"),
    (["model.method=full", "training.loraplus_lr_ratio=16"], "training.loraplus_lr_ratio", "applies to LoRA"),
    (["model.method=lora", "lora.use_dora=true", "lora.init_lora_weights=olora"], "lora.use_dora", "DoRA's magnitude"),
    (["lora.layers_pattern=layers"], "lora.layers_pattern", "set lora.layers_to_transform too"),
    (["lora.target_modules=[q_proj,lm_head]", "lora.modules_to_save=[lm_head]"], "lora.modules_to_save",
     "either adapted (LoRA) or trained whole"),
    (["lora.rank_pattern={down_proj: 0}"], "lora.rank_pattern.down_proj", "must be > 0"),
    (["training.embedding_learning_rate=0"], "training.embedding_learning_rate", "must be > 0"),
    (["model.add_tokens=[<a>]", "model.add_special_tokens=[<a>]"], "model.add_tokens", "twice"),
    (["model.add_tokens=[<call>]", "model.new_token_init=description"], "model.new_token_init", "missing: '<call>'"),
    (["model.add_tokens=[<call>]", "model.new_token_init=description", "model.new_token_descriptions={<cal>: x}"],
     "model.new_token_descriptions.<cal>", "did you mean '<call>'"),
])
def test_refusals_name_the_key_and_why(pm, overrides, key, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, pm=pm)
    text = str(info.value)
    # One line names the key and says why.
    assert any(f"{key}:" in line and message in line for line in text.splitlines()), text


def test_validate_refuses_what_unsloth_cannot_train_and_notes_dora(tiny_model_dir, tmp_path, sft_plugin_manager):
    """`sft validate` asks the named backend even where it cannot run (a CUDA config checked on CPU)."""
    args = [*tiny_overrides(tmp_path / "run", tiny_model_dir), "model.backend=unsloth"]
    result = run_sft("validate", *args, "lora.init_lora_weights=pissa", "lora.modules_to_save=[norm]", check=False)
    assert result.exit_code == 2, result.output
    assert "lora.init_lora_weights: pissa: Unsloth's get_peft_model accepts only true, false, gaussian, loftq" in result.output
    assert "lora.modules_to_save: norm: Unsloth trains only embed_tokens and lm_head whole" in result.output
    assert "Traceback" not in result.output
    result = run_sft("validate", *args, "lora.use_dora=true", check=False)
    assert "Unsloth's fast LoRA kernels skip DoRA layers" in result.output


def test_fsdp2_refuses_dora_and_pissa_with_the_reason(pm, tiny_model_dir, tmp_path, sft_plugin_manager):
    result = run_sft("validate", *tiny_overrides(tmp_path / "run", tiny_model_dir), "lora.use_dora=true",
                     "distributed.num_processes=2", "distributed.strategy=fsdp2", check=False)
    assert result.exit_code == 2 and "distributed.strategy: lora.use_dora under FSDP2" in result.output, result.output
    backend = pm.get("backend", "transformers")
    dora = tiny_config(tmp_path, tiny_model_dir, "lora.use_dora=true", pm=pm)
    assert "DoRA's magnitude is the norm of each whole weight matrix" in backend.distributed_reason(dora, "fsdp2")
    assert backend.distributed_reason(dora, "ddp") is None
    pissa = tiny_config(tmp_path, tiny_model_dir, "lora.init_lora_weights=pissa", pm=pm)
    assert "distributed.strategy=ddp" in backend.distributed_reason(pissa, "fsdp2")


# -- each key changes what trains ------------------------------------------------------------
def test_dora_adds_magnitude_vectors_and_they_move(tiny_model_dir, tmp_path, pm):
    import torch

    run = train_tiny(tmp_path / "run", tiny_model_dir, "lora.use_dora=true", "lora.target_modules=[q_proj,v_proj]",
                     "training.learning_rate=1e-2", "export.enabled=[merged_16bit]", steps=3, pm=pm)
    tensors = adapter_tensors(run)
    magnitudes = {k: v for k, v in tensors.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 4, sorted(tensors)  # q_proj and v_proj of 2 layers
    base = base_weights(tiny_model_dir)
    key = next(k for k in magnitudes if "layers.0.self_attn.q_proj" in k)
    # DoRA starts each magnitude at the row norms of the base weight (B = 0); training moves them.
    start = torch.linalg.norm(base["model.layers.0.self_attn.q_proj.weight"].float(), dim=1)
    assert magnitudes[key].shape == start.shape
    assert not torch.allclose(magnitudes[key], start, atol=1e-5)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    merged = json.loads((run / "summary.json").read_text())["exports"]["merged_16bit"]
    assert merged["ok"], merged  # merged into the base and verified against base + adapter
    from sft.plugins.exporters.lora import serving_note
    from sft.plugins.exporters.merging import adapter_beyond_lora

    # What vLLM and a llama.cpp LoRA GGUF cannot take (export.gguf.adapter refuses it), and the lora export's note.
    assert adapter_beyond_lora(run / "adapter") == ["DoRA magnitude vectors (lora.use_dora)"]
    assert "DoRA magnitude vectors" in serving_note(run / "adapter")["note"]


def _prepared(cfg, pm):
    backend = pm.get("backend", "transformers")
    model, tokenizer = backend.load(cfg)
    return backend.prepare_for_training(model, cfg), tokenizer


def test_pissa_changes_the_starting_weights_and_its_adapter_merges_onto_the_original_base(tiny_model_dir, tmp_path, pm):
    """PiSSA moves the weight's principal part into A and B; the saved (converted) adapter applied to the
    untouched base gives the trained model's logits, and an untrained one merges back to the base exactly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft.engine.lora_init import remember_initial_adapter, save_adapter

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "lora.init_lora_weights=pissa", pm=pm)
    model, _ = _prepared(cfg, pm)
    base = base_weights(tiny_model_dir)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(layer.base_layer.weight, base["model.layers.0.self_attn.q_proj.weight"])
    assert layer.lora_B["default"].weight.abs().max() > 0  # not LoRA's B = 0

    initial = remember_initial_adapter(model, tmp_path / "init")
    ids = torch.tensor([[1, 400, 2000, 31, 7]])

    def merged_logits(folder: Path) -> torch.Tensor:
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        merged = PeftModel.from_pretrained(plain, str(folder)).merge_and_unload()
        with torch.no_grad():
            return merged(input_ids=ids).logits

    save_adapter(model, tmp_path / "untrained", initial)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged_logits(tmp_path / "untrained"), plain(input_ids=ids).logits, atol=1e-5)

    with torch.no_grad():  # as training would: A and B move
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        trained = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "trained", initial)
    saved = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * cfg.lora.r and saved["init_lora_weights"] is True  # a plain LoRA for the original base
    assert torch.allclose(merged_logits(tmp_path / "trained"), trained, atol=1e-4)


def test_a_pissa_run_saves_the_converted_adapter_and_its_merged_export_verifies(tiny_model_dir, tmp_path,
                                                                                 sft_plugin_manager):
    run = train_tiny(tmp_path / "run", tiny_model_dir, "lora.init_lora_weights=pissa_niter_2",
                     "export.enabled=[merged_16bit]", pm=sft_plugin_manager)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert not (run / "initial_adapter").exists()
    record = json.loads((run / "summary.json").read_text())["exports"]["merged_16bit"]
    assert record["ok"], record


def test_modules_to_save_trains_and_saves_the_module_and_the_lora_export_says_where_it_loads(
        tiny_model_dir, tmp_path, sft_plugin_manager):
    import torch

    run = train_tiny(tmp_path / "run", tiny_model_dir, "lora.modules_to_save=[lm_head]", "training.learning_rate=1e-2",
                     "training.embedding_learning_rate=5e-3", "export.enabled=[lora,merged_16bit]", steps=3,
                     pm=sft_plugin_manager)
    from sft.engine.metrics import read_metrics

    first = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r][0]
    assert first["learning_rate"] == pytest.approx(1e-2) and first["learning_rate_embeddings"] == pytest.approx(5e-3)
    tensors = adapter_tensors(run)
    [head] = [k for k in tensors if "lm_head" in k]
    assert tensors[head].shape == base_weights(tiny_model_dir)["lm_head.weight"].shape
    assert not torch.allclose(tensors[head], base_weights(tiny_model_dir)["lm_head.weight"])
    record = json.loads((run / "summary.json").read_text())["exports"]["lora"]
    note = record["details"]["servers"]["note"]
    assert "whole modules lm_head" in note and "not in vLLM (vllm#9280)" in note and "merged_16bit" in note
    assert record["details"]["servers"]["vllm"] is False
    from sft.core.interfaces import ExportResult

    card = sft_plugin_manager.get("exporter", "lora").hub_card(None, ExportResult.from_summary("lora", record),
                                                               "me/run-lora", "me")
    assert note in card.usage  # the model card says the same
    merged = json.loads((run / "summary.json").read_text())["exports"]["merged_16bit"]
    assert merged["ok"], merged  # what the note offers instead works


# -- optimizer groups, read from the optimizer -----------------------------------------------
def _trainer(cfg, pm, tmp_path):
    from sft.core.env import current_environment
    from sft.core.templating import resolve_template
    from sft.engine.data import build_datasets
    from sft.engine.trainer import build_trainer

    model, tokenizer = _prepared(cfg, pm)
    template = resolve_template(cfg, pm, tokenizer)
    data = build_datasets(cfg, pm, tokenizer, template=template, use_cache=False)
    return build_trainer(cfg, model, tokenizer, data, current_environment(), tmp_path / "ckpt",
                         trained_positions_loss=True)


def test_embedding_learning_rate_and_loraplus_put_their_rates_in_the_optimizer(tiny_model_dir, tmp_path, pm, capsys):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "lora.modules_to_save=[embed_tokens,lm_head]",
                      "training.learning_rate=2e-4", "training.embedding_learning_rate=5e-5",
                      "training.loraplus_lr_ratio=16", "training.lr_scheduler_type=constant", pm=pm)
    trainer = _trainer(cfg, pm, tmp_path)
    optimizer = trainer.create_optimizer()
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    by_kind: dict[str, set] = {"lora_A": set(), "lora_B": set(), "embeddings": set()}
    for name, param in trained.items():
        kind = "embeddings" if "modules_to_save" in name else ("lora_B" if "lora_B" in name else "lora_A")
        by_kind[kind].add(round(rate[id(param)], 12))
    assert by_kind == {"lora_A": {2e-4}, "lora_B": {3.2e-3}, "embeddings": {5e-5}}, by_kind
    assert len([n for n in trained if "modules_to_save" in n]) == 2
    assert set(rate) == {id(p) for p in trained.values()}  # every trained tensor, nothing frozen
    err = capsys.readouterr().err
    assert "2 embedding tensor(s) at 5e-05 (training.embedding_learning_rate)" in err
    assert "LoRA B matrices at 0.0032 (training.loraplus_lr_ratio=16)" in err
    trainer.train()  # the rates stay apart through the schedule, and each logging step records them
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["lora_B"] == pytest.approx(16 * lrs["other"]) and lrs["embeddings"] == pytest.approx(5e-5)
    logged = [r for r in trainer.state.log_history if "loss" in r][-1]
    assert logged["learning_rate"] == pytest.approx(2e-4)  # the base rate, not another group's
    assert logged["learning_rate_lora_B"] == pytest.approx(3.2e-3) and logged["learning_rate_embeddings"] == pytest.approx(5e-5)


def test_an_embedding_rate_with_no_embedding_trained_is_refused(tiny_model_dir, tmp_path, pm):
    from sft.engine.optimizer import parameter_groups

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "training.embedding_learning_rate=5e-5", pm=pm)
    model, _ = _prepared(cfg, pm)
    with pytest.raises(SftError, match=r"training.embedding_learning_rate: no embedding .* lora.modules_to_save"):
        parameter_groups(model, cfg, 2e-4, 0.0, set())
    assert parameter_groups(model, tiny_config(tmp_path / "run", tiny_model_dir, pm=pm), 2e-4, 0.0, set()) is None


def test_layers_to_transform_and_rank_pattern_shape_the_adapter(tiny_model_dir, tmp_path, pm):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "lora.target_modules=[q_proj,v_proj]", "lora.layers_to_transform=[1]",
                      "lora.rank_pattern={v_proj: 2}", "lora.alpha_pattern={v_proj: 4}", pm=pm)
    model, _ = _prepared(cfg, pm)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if "lora_A" in name}
    assert all(".layers.1." in name for name in shapes), sorted(shapes)
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"][0] == 4
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"][0] == 2


def test_target_parameters_adapt_and_train_moe_expert_weights(tmp_path, sft_plugin_manager):
    """transformers 5 stores a Mixtral layer's experts as 3-D tensors, not Linear layers: only PEFT's
    target_parameters reaches them."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from sft.engine.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=2, num_experts_per_tok=1, tie_word_embeddings=False,
                                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    moe.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    run = train_tiny(tmp_path / "run", tmp_path / "moe", "lora.target_modules=[q_proj]",
                     "lora.target_parameters=[experts.gate_up_proj,experts.down_proj]", "training.learning_rate=1e-2",
                     pm=sft_plugin_manager)
    b = {k: v for k, v in adapter_tensors(run).items() if "experts" in k and "lora_B" in k}
    # PEFT nests one wrapper per parameter on `experts`: gate_up_proj's B has 2 x intermediate rows, down_proj's hidden.
    assert sorted(v.shape[0] for v in b.values()) == [64, 64, 128, 128], {k: v.shape for k, v in b.items()}
    assert all(v.abs().max() > 0 for v in b.values())  # B starts at 0: the expert adapters trained


def test_a_plain_lora_adapter_gets_no_serving_note(tiny_run):
    from sft.plugins.exporters.lora import serving_note

    assert serving_note(tiny_run / "adapter") is None
