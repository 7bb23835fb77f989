"""What the bundled training backends share: the ``lora`` config section as PEFT and Unsloth name it."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["lora_settings", "embedding_module_names", "new_token_targets", "load_trainable_adapter"]


def _plain(value: Any) -> Any:
    """An OmegaConf list or mapping as plain Python (PEFT checks ``isinstance(x, dict)``)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def lora_settings(cfg: Any) -> dict[str, Any]:
    """The LoRA settings from the ``lora`` section, as PEFT's ``LoraConfig`` and Unsloth name them.

    ``target_modules: [all-linear]`` stays the string ``"all-linear"`` (PEFT's own shortcut);
    a backend that lacks it expands it itself. ``init_lora_weights`` is PEFT's value: a bool
    for ``true``/``false``, else the string; a ``loftq_config`` alone means ``loftq``, as before
    the key existed. Empty lists and mappings are None: PEFT's "not set".
    """
    lora = cfg.lora
    targets = [str(t) for t in lora.target_modules]
    loftq = _plain(lora.loftq_config)
    init: Any = {"true": True, "false": False}.get(str(lora.init_lora_weights), str(lora.init_lora_weights))
    if loftq is not None and init is True:
        init = "loftq"
    return {
        "r": int(lora.r),
        "lora_alpha": int(lora.lora_alpha),
        "lora_dropout": float(lora.lora_dropout),
        "target_modules": "all-linear" if targets == ["all-linear"] else targets,
        "use_rslora": bool(lora.use_rslora),
        "bias": str(lora.bias),
        "loftq_config": dict(loftq) if loftq else ({} if init == "loftq" else None),
        "use_dora": bool(lora.use_dora),
        "init_lora_weights": init,
        "modules_to_save": [str(m) for m in lora.modules_to_save] or None,
        "target_parameters": [str(p) for p in lora.target_parameters] or None,
        "layers_to_transform": [int(i) for i in lora.layers_to_transform] or None,
        "layers_pattern": lora.layers_pattern,
        "rank_pattern": _plain(lora.rank_pattern) or {},
        "alpha_pattern": _plain(lora.alpha_pattern) or {},
    }


def load_trainable_adapter(model: Any, adapter_dir: Any) -> Any:
    """A finished run's PEFT adapter on ``model``, trainable (what ``model.from_run`` continues).

    The adapter keeps everything it was trained with (its rank, targets and any trained token
    rows), so training goes on from exactly that model. PEFT names it ``default``: the
    preference trainers' reference copy of it (TRL's ``ref`` adapter) is made from that one.
    """
    from peft import PeftModel

    from sft.engine.model_files import check_model_folder

    check_model_folder(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def embedding_module_names(model: Any) -> tuple[str, str | None]:
    """The short names PEFT matches (``embed_tokens``, ``lm_head``) of ``model``'s input embedding
    and of its output head; None for the head when it shares the embedding's weight (tied)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    tied = out is None or out.weight is inp.weight
    return names[id(inp)], None if tied else names[id(out)]


def new_token_targets(model: Any, rows: Sequence[int], modules_to_save: Sequence[str] | None) -> dict[str, list[int]]:
    """PEFT's ``trainable_token_indices`` for tokens added to the vocabulary: their rows of the
    embedding and of an untied output head (the model must learn to read and to emit them), except
    in a module ``lora.modules_to_save`` already trains whole."""
    rows = list(rows)
    whole = set(modules_to_save or ())
    return {name: rows for name in embedding_module_names(model) if rows and name and name not in whole}
