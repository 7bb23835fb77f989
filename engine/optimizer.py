"""Optimizer parameter groups with their own learning rates: the embeddings' and LoRA+'s.

- ``training.embedding_learning_rate`` (Unsloth's continued-pretraining recipe): every trained
  parameter of the input embedding and of the output head (a ``lora.modules_to_save`` copy, the
  rows of added tokens, the whole matrix under ``model.method=full``) trains at that rate.
- ``training.loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024, as PEFT's
  ``create_loraplus_optimizer``): the LoRA B matrices train at ratio x ``learning_rate``, the A
  matrices (and DoRA's magnitudes) at ``learning_rate``.

Each group keeps transformers' weight-decay split (no decay for biases and norms), and the
scheduler scales every group from its own starting rate. Each logging step records the groups'
rates too (``learning_rate_embeddings``, ``learning_rate_lora_B`` in ``metrics.jsonl``; :func:`group_rates`).

:func:`create_optimizer` is what any ``transformers.Trainer`` subclass calls from its ``create_optimizer`` (``SftTrainer`` does, and
so can the preference-tuning trainers): it returns None when neither key is set, and the
Trainer then builds its usual optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sft.core.errors import SftError
from sft.core.notices import notice

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["parameter_groups", "create_optimizer", "group_rates", "EMBEDDINGS", "LORA_B", "OTHER"]

#: The ``name`` of each parameter group (kept in the optimizer's ``param_groups``).
EMBEDDINGS, LORA_B, OTHER = "embeddings", "lora_B", "other"


def _embedding_parameters(model: Any) -> set[int]:
    """ids of every parameter under the input embedding and the output head (PEFT's wrappers included)."""
    ids: set[int] = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            ids.update(id(p) for p in module.parameters())
    return ids


def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def parameter_groups(model: Any, cfg: "DictConfig", learning_rate: float, weight_decay: float,
                     decay_names: set[str]) -> tuple[list[dict[str, Any]], str] | None:
    """The optimizer's parameter groups for ``cfg.training``'s rates, and one line saying what they are;
    None when neither ``embedding_learning_rate`` nor ``loraplus_lr_ratio`` is set.

    ``decay_names``: the parameter names that take weight decay (the Trainer's
    ``get_decay_parameter_names``). Raises :class:`SftError` when a rate is set for parameters
    that do not train (an embedding rate with no embedding trained).
    """
    t = cfg.training
    embedding_lr, ratio = t.embedding_learning_rate, t.loraplus_lr_ratio
    if embedding_lr is None and ratio is None:
        return None
    rates = {OTHER: float(learning_rate), LORA_B: float(learning_rate) * float(ratio or 1.0),
             EMBEDDINGS: float(embedding_lr if embedding_lr is not None else learning_rate)}
    embeddings = _embedding_parameters(model)
    members: dict[tuple[str, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if embedding_lr is not None and id(param) in embeddings:
            kind = EMBEDDINGS
        elif ratio is not None and _is_lora_b(name):
            kind = LORA_B
        else:
            kind = OTHER
        members.setdefault((kind, name in decay_names), []).append(param)
    counts = {kind: sum(len(ps) for (k, _), ps in members.items() if k == kind) for kind in rates}
    if embedding_lr is not None and not counts[EMBEDDINGS]:
        raise SftError("training.embedding_learning_rate: no embedding or output-head weight trains in this run; "
                       "train them with lora.modules_to_save=[embed_tokens, lm_head] (Unsloth's continued-pretraining "
                       "recipe) or drop the key")
    if ratio is not None and not counts[LORA_B]:
        raise SftError("training.loraplus_lr_ratio: this run trains no LoRA B matrix; drop the key")
    # The base rate's group first: the Trainer logs the first group's rate as `learning_rate`.
    order = [OTHER, LORA_B, EMBEDDINGS]
    groups = [{"params": params, "lr": rates[kind], "weight_decay": float(weight_decay) if decays else 0.0,
               "name": kind} for (kind, decays), params in sorted(members.items(), key=lambda m: (order.index(m[0][0]), m[0][1]))]
    parts = []
    if counts[EMBEDDINGS] and embedding_lr is not None:
        parts.append(f"{counts[EMBEDDINGS]} embedding tensor(s) at {rates[EMBEDDINGS]:g} (training.embedding_learning_rate)")
    if counts[LORA_B] and ratio is not None:
        parts.append(f"{counts[LORA_B]} LoRA B matrices at {rates[LORA_B]:g} (training.loraplus_lr_ratio={float(ratio):g})")
    parts.append(f"{counts[OTHER]} other tensor(s) at {rates[OTHER]:g}")
    return groups, "optimizer learning rates: " + "; ".join(parts)


def group_rates(optimizer: Any, logged_rate: float) -> dict[str, float]:
    """``learning_rate_<group>`` of each group with a rate of its own, at the step the Trainer logged
    ``logged_rate`` for (the base group's rate, which the Trainer reads before the scheduler steps).

    Every group follows the same schedule, so each is its starting rate times the base group's factor.
    """
    groups = list(getattr(optimizer, "param_groups", ()))
    base = next((g for g in groups if g.get("name") == OTHER), None)
    if base is None or not base.get("initial_lr"):
        return {}
    factor = float(logged_rate) / float(base["initial_lr"])
    return {f"learning_rate_{g['name']}": float(g["initial_lr"]) * factor for g in groups
            if g.get("name") in (LORA_B, EMBEDDINGS) and g.get("initial_lr")}


def create_optimizer(trainer: Any, cfg: "DictConfig") -> Any:
    """The optimizer of ``trainer`` (a ``transformers.Trainer``) with :func:`parameter_groups`' rates, built
    the way the Trainer builds its own (``args.optim`` and its arguments); None when no group needs its own rate.

    8-bit Adam keeps the embeddings' optimizer state in 32 bits, as the Trainer arranges it.
    """
    model = trainer.model
    found = parameter_groups(model, cfg, trainer.args.learning_rate, trainer.args.weight_decay,
                             set(trainer.get_decay_parameter_names(model)))
    if found is None:
        return None
    groups, line = found
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    optimizer = optimizer_cls(groups, **kwargs)
    if optimizer_cls.__name__ == "Adam8bit":
        import bitsandbytes
        import torch

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    notice(line)
    return optimizer
