"""Packed and padded batches (issue 14): documents stay apart, auto packing, length groups, real token counts.

The equivalence tests go through the trainer a run builds (``sft.core.run.build_trainer``:
TRL's packing and collator, ``sft.core.trainer``'s loss) on the tiny random Llama in float32.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from sft.core.packing import decide_packing, length_grouped_sampler
from sft.core.testing import make_plugin_manager, tiny_config, train_tiny, write_jsonl

PM = make_plugin_manager()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """ShareGPT rows of varied lengths (1-3 turns, sometimes a system prompt)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud paper green seven orbit lamp".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for _ in range(n):
        convo = [{"from": "system", "value": text(rng.randint(3, 12))}] if rng.random() < 0.3 else []
        for _turn in range(rng.randint(1, 3)):
            convo += [{"from": "human", "value": text(rng.randint(2, 20))},
                      {"from": "gpt", "value": text(rng.randint(2, 40))}]
        rows.append({"conversations": convo})
    return rows


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_rows(24))


def _trainer(cfg, model, tokenizer, data, tmp_path):
    from sft.core.env import current_environment
    from sft.core.run import build_trainer

    return build_trainer(cfg, model, tokenizer, data, current_environment(), tmp_path / "ckpt",
                         trained_positions_loss=True)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_equals_its_documents_run_alone(attention, tiny_model_dir, chat_file, tmp_path):
    """Per-token loss and every LoRA gradient of a packed batch equal those of its documents
    run one by one; position ids restart at every document; no document sees another."""
    import torch

    from sft.core.backends import select_backend
    from sft.core.data import build_datasets
    from sft.core.env import current_environment
    from sft.core.models import load_tokenizer

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "training.packing=true", "model.max_seq_length=256",
                      dataset=chat_file, pm=PM)
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg, PM, tokenizer, use_cache=False)
    backend = select_backend(cfg, PM, current_environment())
    model, _ = backend.load(cfg)
    model.set_attn_implementation(attention)
    model = backend.prepare_for_training(model, cfg)
    with torch.no_grad():  # a non-zero LoRA B, so the adapter is part of what is compared
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer = _trainer(cfg, model, tokenizer, data, tmp_path)
    assert trainer.args.packing and trainer.args.padding_free

    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    lengths = [n for row in rows for n in row["seq_lengths"]]
    assert len(lengths) >= 4 and batch["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in batch
    expected_positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected_positions)

    def per_token(inputs):
        features = {k: inputs[k] for k in ("input_ids", "position_ids") if k in inputs}
        logits = model(**features, use_cache=False).logits[0].float()
        return torch.nn.functional.cross_entropy(logits[:-1], inputs["input_ids"][0, 1:], reduction="none")

    def lora_grads():
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    model.train()
    # Whole packed batch through the trainer's own loss.
    trained = int((batch["labels"][0, 1:] != -100).sum())
    packed_loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=trained)
    packed_loss.backward()
    packed_grads = lora_grads()
    with torch.no_grad():
        packed_tokens = per_token(batch)

    # Each document alone, through the same collator and loss, normalised by the same count.
    alone_loss = 0.0
    starts = [0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist())
    flat_ids = batch["input_ids"][0]
    doc_rows = []
    for row in rows:
        offset = 0
        for n in row["seq_lengths"]:
            doc_rows.append({k: row[k][offset:offset + n] for k in ("input_ids", "assistant_masks") if k in row}
                            | ({"labels": row["labels"][offset:offset + n]} if "labels" in row else {}))
            offset += n
    for start, n, doc in zip(starts, lengths, doc_rows):
        assert torch.equal(torch.tensor(doc["input_ids"]), flat_ids[start:start + n])
        alone = trainer.data_collator([doc])
        loss = trainer.compute_loss(model, dict(alone), num_items_in_batch=trained)
        loss.backward()
        alone_loss += loss.item()
        with torch.no_grad():
            tokens = per_token(alone)
        # Within a document, position i predicts token i+1 exactly as in the packed row.
        assert torch.allclose(packed_tokens[start:start + n - 1], tokens, atol=1e-5, rtol=1e-5)
    alone_grads = lora_grads()

    assert math.isclose(float(packed_loss), alone_loss, rel_tol=1e-5, abs_tol=1e-6)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, alone_grads[name], atol=1e-6, rtol=1e-4), name


def test_auto_packs_short_rows_when_enough_remain():
    chat = {"train_rows": 3000, "train_tokens": 3000 * 363}
    decision = decide_packing("auto", chat, 2048, 8, 2)
    assert decision.pack and "363 tokens" in decision.reason
    long_rows = {"train_rows": 3000, "train_tokens": 3000 * 1500}
    assert not decide_packing("auto", long_rows, 2048, 8, 2).pack
    # The embedded default: 60 short rows would pack into one sequence, a 4-epoch run into 4 steps.
    identity = {"train_rows": 60, "train_tokens": 60 * 40}
    few = decide_packing("auto", identity, 2048, 8, 1)
    assert not few.pack and "optimizer steps" in few.reason
    assert decide_packing("true", identity, 2048, 8, 1).pack
    assert not decide_packing("false", chat, 2048, 8, 2).pack


def test_length_groups_pad_under_a_tenth_and_are_seeded():
    """Chat-like lengths (log-normal, long tail): each micro-batch of 8 pads to its longest row."""
    rng = random.Random(0)
    lengths = [min(2048, max(8, int(rng.lognormvariate(math.log(300), 0.7)))) for _ in range(3000)]
    batch, accumulation = 8, 2
    sampler = length_grouped_sampler(lengths, batch * accumulation, seed=3407)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    slots = sum(batch * max(lengths[i] for i in b) for b in batches)
    assert 1 - sum(lengths) / slots <= 0.10, 1 - sum(lengths) / slots
    # Random order pads far more: the sampler is what keeps it low.
    shuffled = list(range(len(lengths)))
    random.Random(1).shuffle(shuffled)
    random_slots = sum(batch * max(lengths[i] for i in shuffled[j:j + batch]) for j in range(0, len(shuffled), batch))
    assert 1 - sum(lengths) / random_slots > 0.4
    assert list(length_grouped_sampler(lengths, 16, seed=3407)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


@pytest.mark.parametrize("packing", ["auto", "true"])
def test_tokens_are_the_real_tokens(packing, tiny_model_dir, chat_file, tmp_path, capsys):
    """One epoch counts every row's tokens once, packed or padded; no padding is counted.
    ``auto`` does not pack these 24 rows (packed, they would not make one step) and says so."""
    run = train_tiny(tmp_path / "run", tiny_model_dir, f"training.packing={packing}", "training.max_steps=-1",
                     "training.num_train_epochs=1", "training.per_device_train_batch_size=4",
                     "loggers.enabled=[console]", dataset=chat_file, pm=PM)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == summary["dataset"]["train_tokens"]
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens"] / summary["durations"]["train"], rel=0.05)
    captured = capsys.readouterr()
    assert "tok/s" in captured.out
    if packing == "auto":
        assert "training.packing: not packing (auto: rows average" in captured.err
        assert "optimizer steps" in captured.err
    else:
        assert "training.packing:" not in captured.err


def test_qlora_on_cuda_without_bitsandbytes_stops_before_the_data(tmp_path):
    import importlib.util

    from sft.core.backends import check_cuda_dependencies
    from sft.core.config import load_config
    from sft.core.env import Environment
    from sft.core.errors import ConfigError

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    cuda = Environment(cuda=True, bf16=True, device_name="a CUDA GPU")
    cfg = load_config(None, ["training.optim=adamw_8bit"], pm=PM)  # model.method defaults to qlora
    with pytest.raises(ConfigError) as info:
        check_cuda_dependencies(cfg, cuda)
    text = str(info.value)
    assert "model.method" in text and "training.optim" in text and "pip install 'sft-forge[gpu]'" in text
    check_cuda_dependencies(load_config(None, ["model.method=lora", "training.optim=adamw_torch"], pm=PM), cuda)
    check_cuda_dependencies(cfg, Environment(cuda=False, bf16=False, device_name="cpu"))  # CPU falls back
