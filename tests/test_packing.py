"""Packed and padded batches (issue 14): documents stay apart, auto packing, length groups, real token counts.

The equivalence tests go through the trainer a run builds (``sft.engine.trainer.build_trainer``:
TRL's packing and collator, ``sft.engine.trainer``'s loss) on the tiny random Llama in float32.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from sft.engine.packing import decide_packing, length_grouped_sampler
from sft.testing import make_plugin_manager, tiny_config, train_tiny, write_jsonl

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
    from sft.engine.trainer import build_trainer

    return build_trainer(cfg, model, tokenizer, data, current_environment(), tmp_path / "ckpt",
                         trained_positions_loss=True)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_equals_its_documents_run_alone(attention, tiny_model_dir, chat_file, tmp_path):
    """Per-token loss and every LoRA gradient of a packed batch equal those of its documents
    run one by one; position ids restart at every document; no document sees another."""
    import torch

    from sft.engine.backends import select_backend
    from sft.engine.data import build_datasets
    from sft.core.env import current_environment
    from sft.engine.models import load_tokenizer

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


def _train_counting_passes(cfg, tiny_model_dir, tmp_path):
    """Train ``cfg`` from one fixed start (seeded LoRA init, non-zero LoRA B); return the trained
    LoRA weights, the logged losses and how many forward passes the model ran."""
    import torch

    from sft.engine.backends import select_backend
    from sft.engine.data import build_datasets
    from sft.core.env import current_environment
    from sft.engine.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg, PM, tokenizer, use_cache=False)
    backend = select_backend(cfg, PM, current_environment())
    model, _ = backend.load(cfg)
    torch.manual_seed(0)
    model = backend.prepare_for_training(model, cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    passes = []
    model.register_forward_hook(lambda module, args, output: passes.append(1))
    trainer = _trainer(cfg, model, tokenizer, data, tmp_path)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return weights, losses, len(passes), trainer.state.num_input_tokens_seen


def test_merged_micro_batches_train_exactly_like_separate_ones(tiny_model_dir, chat_file, tmp_path, capsys):
    """Unpacked rows, batch 2 x accumulation 4: merging the micro-batches of a step (while they
    hold at most 2 x 192 padded tokens) runs fewer passes and trains the same weights."""
    import torch

    common = ("training.packing=false", "model.max_seq_length=192", "training.per_device_train_batch_size=2",
              "training.gradient_accumulation_steps=4", "training.max_steps=2", "training.logging_steps=1",
              "training.warmup_steps=0")
    merged_cfg = tiny_config(tmp_path / "merged", tiny_model_dir, *common, dataset=chat_file, pm=PM)
    separate_cfg = tiny_config(tmp_path / "separate", tiny_model_dir, *common,
                               "training.merge_micro_batches=false", dataset=chat_file, pm=PM)
    merged = _train_counting_passes(merged_cfg, tiny_model_dir, tmp_path / "a")
    err = capsys.readouterr().err
    assert "the 4 micro-batches of a step run as one pass while together they hold at most 384" in err
    assert f"training.merge_micro_batches: 8 micro-batches ran as {merged[2]} passes" in err
    separate = _train_counting_passes(separate_cfg, tiny_model_dir, tmp_path / "b")

    assert separate[2] == 2 * 4
    assert 2 <= merged[2] <= separate[2] - 2  # steps merged, and at least one pass a step
    assert merged[3] == separate[3]  # the same real tokens were trained on
    assert merged[1] == pytest.approx(separate[1], rel=1e-5)
    assert merged[0].keys() == separate[0].keys()
    for name, weight in merged[0].items():
        assert torch.allclose(weight, separate[0][name], atol=1e-6, rtol=1e-5), name


def test_micro_batches_merge_within_the_budget_and_keep_their_places():
    import torch

    from sft.engine.packing import MergedAway, merge_micro_batches

    def batch(rows, width, fill):
        ids = torch.full((rows, width), fill)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    a, b, c = batch(2, 3, 1), batch(2, 5, 2), batch(2, 9, 3)
    out = merge_micro_batches([a, b, c], budget=20, pad_token_id=0)
    assert len(out) == 3 and isinstance(out[0], MergedAway) and out[2] is c
    assert out[0]["input_ids"].numel() == 0
    joined = out[1]
    assert joined["input_ids"].shape == (4, 5)  # 4 rows x 5 = 20 tokens; c would make 6 x 9
    assert joined["input_ids"][:2].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert joined["attention_mask"][:2].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert joined["labels"][:2].tolist() == [[1, 1, 1, -100, -100]] * 2
    assert torch.equal(joined["input_ids"][2:], b["input_ids"])
    # A batch with a key of its own (packed rows' position_ids) is never merged.
    packed = [dict(x, position_ids=x["input_ids"]) for x in (a, b)]
    assert merge_micro_batches(packed, budget=100, pad_token_id=0) == packed


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

    from sft.engine.backends import check_cuda_dependencies
    from sft.engine.configuration import load_config
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


def test_row_lengths_come_from_the_offsets_of_the_rows_a_dataset_selects():
    # The length-grouped sampler needs every row's length; reading the rows for it would materialise them all.
    import numpy as np
    import pyarrow as pa

    from sft.engine.data.cache import dataset_of
    from sft.engine.packing import row_lengths

    ids = [[1] * n for n in (3, 1, 4, 1, 5, 9, 2, 6)]
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "assistant_masks": pa.array(ids, pa.list_(pa.int8())),
                      "conversation": pa.array(["{}"] * len(ids), pa.large_string())})
    for index in (None, np.array([5, 0, 0, 7, 2])):
        dataset = dataset_of(table, index)
        assert dataset.column_names == ["input_ids", "assistant_masks"]
        assert row_lengths(dataset) == [len(r) for r in dataset["input_ids"]]
    assert row_lengths(dataset_of(table, np.array([5, 0, 0, 7, 2]))) == [9, 3, 3, 6, 4]
