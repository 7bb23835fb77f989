"""The training core end to end on the tiny random Llama: config → data → train → adapter → reload → generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft.engine.metrics import read_metrics
from sft.core.rundir import RunDir
from sft.testing import make_plugin_manager, tiny_config, train_tiny

PM = make_plugin_manager()


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, tmp_path_factory) -> Path:
    """4 steps with a held-out eval split evaluated every 2 steps and a checkpoint every 2."""
    out = tmp_path_factory.mktemp("train") / "run"
    return train_tiny(out, tiny_model_dir, "data.test_size=6", "training.eval_steps=2", "training.save_steps=2",
                      "training.generation_max_new_tokens=6", steps=4, pm=PM)


def test_run_directory_layout(eval_run):
    run = RunDir.of(eval_run)
    for path in (run.config, run.metrics, run.summary_path, run.adapter / "adapter_config.json",
                 run.adapter / "adapter_model.safetensors", run.adapter / "tokenizer_config.json"):
        assert path.is_file(), path
    # The resolved config reloads as a valid config.
    from sft.engine.configuration import load_config

    assert load_config(str(run.config), pm=PM).training.max_steps == 4
    # save_total_limit=2 keeps both complete checkpoints (steps 2 and 4).
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert all((p / "COMPLETE").is_file() for p in run.checkpoints.iterdir())


def test_metrics_every_logging_step(eval_run):
    records = read_metrics(eval_run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert set(r) >= {"loss", "learning_rate", "grad_norm", "epoch", "tokens", "tokens_per_second"}
        assert r["tokens_per_second"] > 0
    tokens = [r["tokens"] for r in train]
    assert tokens == sorted(tokens) and tokens[0] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]


def test_summary(eval_run):
    summary = json.loads((eval_run / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["steps"] == 4
    assert summary["dataset"]["train_rows"] == 54 and summary["dataset"]["eval_rows"] == 6
    # The last record is an evaluation (no token count): compare with the last training record.
    assert summary["tokens"] == [r for r in read_metrics(eval_run) if "tokens" in r][-1]["tokens"] > 0
    assert summary["tokens_per_second"] > 0
    assert isinstance(summary["train_loss"], float) and isinstance(summary["eval_loss"], float)
    assert set(summary["durations"]) >= {"data", "load", "train", "save", "generation", "total"}
    generation = summary["generation"]
    assert generation["prompt"]  # the first eval row's user turn
    assert isinstance(generation["text"], str)


def test_adapter_reloads_and_generates_the_same_text(eval_run, capsys):
    """Greedy decoding from the saved adapter reproduces the quick generation made in memory."""
    from sft.engine.generate import generate_from_run

    summary = json.loads((eval_run / "summary.json").read_text())
    text = generate_from_run(eval_run, summary["generation"]["prompt"], max_new_tokens=6)
    assert text == summary["generation"]["text"]
    assert capsys.readouterr().out.strip() != ""  # streamed


def test_saved_tokenizer_carries_the_template(eval_run):
    from transformers import AutoTokenizer

    from sft.core.templating import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(eval_run / "adapter")
    cfg = tiny_config(eval_run, eval_run)
    assert tokenizer.chat_template == resolve_template(cfg, PM).jinja(tokenizer)


def test_only_trained_tokens_get_labels_and_the_loss_is_the_standard_one(tiny_model_dir, tmp_path):
    """TRL turns ``assistant_masks`` into labels; our trained-positions loss equals the model's own loss."""
    import torch

    from sft.engine.backends import select_backend
    from sft.engine.data import build_datasets
    from sft.core.env import current_environment
    from sft.engine.models import load_tokenizer
    from sft.engine.trainer import build_trainer

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, pm=PM)
    env = current_environment()
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg, PM, tokenizer, use_cache=False)
    backend = select_backend(cfg, PM, env)
    model, _ = backend.load(cfg)
    model = backend.prepare_for_training(model, cfg)
    # Make LoRA non-trivial so the comparison exercises the adapter too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    trainer = build_trainer(cfg, model, tokenizer, data, env, tmp_path / "ckpt", trained_positions_loss=True)

    prepared = trainer.train_dataset
    for i in range(5):
        row = data.train[i]
        labels = prepared[i]["labels"]
        assert prepared[i]["input_ids"] == row["input_ids"]
        assert labels == [t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"])]

    batch = trainer.data_collator([prepared[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        reference = model(**batch, use_cache=False).loss
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_packing_keeps_rows_apart(tiny_model_dir, tmp_path):
    """Padding-free packed batches give the same loss as padded ones (no attention across rows)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft.engine.backends import select_backend
    from sft.core.env import current_environment
    from sft.engine.trainer import trainer_class

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, pm=PM)
    model, tokenizer = select_backend(cfg, PM, current_environment()).load(cfg)
    rows = [{"input_ids": ids, "labels": ids} for ids in ([5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17])]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    trainer = trainer_class().__new__(trainer_class())
    trainer.trained_positions_loss = True
    model.eval()
    with torch.no_grad():
        a = trainer.compute_loss(model, padded)
        b = trainer.compute_loss(model, packed)
    assert torch.allclose(a, b, atol=1e-5), (a, b)


def test_a_packed_run_trains(tiny_model_dir, tmp_path):
    run = train_tiny(tmp_path / "run", tiny_model_dir, "training.packing=true", steps=2, pm=PM)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 2


def test_a_finished_run_is_not_overwritten(tiny_model_dir, eval_run):
    from sft.core.errors import SftError

    # A finished run is never continued (issue 13), so the message points elsewhere, not at --resume.
    with pytest.raises(SftError, match="already holds a finished run.*choose another directory"):
        train_tiny(eval_run, tiny_model_dir, pm=PM)


def test_an_epoch_run_announces_the_steps_it_takes(tiny_model_dir, tmp_path, capsys):
    """5 rows, batch 2, accumulation 2, 2 epochs: 3 batches make 2 optimizer steps per epoch
    (a short last batch and a short last accumulation still count), so 4 steps in all."""
    from sft.testing import write_jsonl

    rows = [{"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}
            for i in range(5)]
    data = write_jsonl(tmp_path / "five.jsonl", rows)
    run = train_tiny(tmp_path / "run", tiny_model_dir, "training.max_steps=-1", "training.num_train_epochs=2",
                     "training.gradient_accumulation_steps=2", "loggers.enabled=[console]", dataset=data, pm=PM)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    out = capsys.readouterr().out
    assert "step 4/4 " in out and "step 5/" not in out, out


def test_generation_max_new_tokens_0_skips_the_quick_generation(tiny_model_dir, tiny_run, tmp_path, capsys):
    import subprocess
    import sys

    run = train_tiny(tmp_path / "run", tiny_model_dir, "training.generation_max_new_tokens=0", steps=1, pm=PM)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["generation"]["prompt"] is None
    assert "quick generation" not in capsys.readouterr().out
    # `sft generate` has nothing to skip: 0 is refused before any model loads.
    result = subprocess.run([sys.executable, "-m", "sft.cli", "generate", str(tiny_run), "Hi", "--max-new-tokens", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Invalid value for '--max-new-tokens': 0 is not in the range x>=1" in result.stderr
