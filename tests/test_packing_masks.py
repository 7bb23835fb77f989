"""Packing through the real trainer: the batches `sft run` trains on keep documents and masks apart.

Built with :func:`sft.engine.trainer.build_trainer` (TRL's collator as the run configures it, never
one made by hand), on the tiny model with ``training.packing=true``: every packed row is
cut into its documents by ``position_ids`` (each restarts at 0), each document is one
prepared row, token for token, and its labels are exactly that row's trained tokens.
"""

from __future__ import annotations

from sft.testing import tiny_config


def test_packed_batches_have_per_document_positions_and_the_rows_masks(tiny_model_dir, tmp_path):
    import torch

    from sft.engine.backends import select_backend
    from sft.engine.data import build_datasets
    from sft.core.env import current_environment
    from sft.engine.models import load_tokenizer
    from sft.core.plugins import get_plugin_manager
    from sft.engine.trainer import build_trainer
    from sft.core.templating import resolve_template

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "training.packing=true", "model.max_seq_length=256",
                      "training.per_device_train_batch_size=2", "data.cache_dir=none")
    pm, env = get_plugin_manager(), current_environment()
    tokenizer = load_tokenizer(cfg.model)
    resolve_template(cfg, pm, tokenizer)
    data = build_datasets(cfg, pm, tokenizer, quiet=True)
    backend = select_backend(cfg, pm, env)
    model, _ = backend.load(cfg)
    model = backend.prepare_for_training(model, cfg)
    trainer = build_trainer(cfg, model, tokenizer, data, env, tmp_path / "checkpoints",
                            trained_positions_loss=backend.trained_positions_loss)

    rows = {tuple(ids): mask for ids, mask in zip(data.train["input_ids"], data.train["assistant_masks"])}
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch, "packed batches must carry per-document position_ids"
    documents = 0
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        assert len(starts) > 2, "a packed row should hold several documents"
        for lo, hi in zip(starts, starts[1:]):
            assert positions[lo:hi].tolist() == list(range(hi - lo)), "positions restart at every document"
            doc = tuple(ids[lo:hi].tolist())
            assert doc in rows, "a packed document is not one of the prepared rows"
            expected = [t if m else -100 for t, m in zip(doc, rows[doc])]
            got = labels[lo:hi].tolist()
            # A document's first token predicts nothing from the document before it.
            assert got[0] == -100 and got[1:] == expected[1:], "labels are not exactly the row's trained tokens"
            documents += 1
    assert documents > 2 and int((batch["labels"] != -100).sum()) > 0
    assert not torch.is_floating_point(batch["position_ids"])
