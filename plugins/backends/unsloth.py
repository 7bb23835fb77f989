"""The ``unsloth`` training backend: Unsloth's FastLanguageModel, on a CUDA GPU.

``model.backend: auto`` prefers it (higher priority) wherever CUDA is available. unsloth
raises at import on a machine without a GPU, so it is imported only inside methods, and
only after :meth:`UnslothBackend.unsupported_reason` has found CUDA.

Unsloth patches transformers, TRL and PEFT when it is imported; :meth:`prepare_environment`
imports it before the trainer imports TRL so that every patch applies.
"""

from __future__ import annotations

from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.interfaces import TrainingBackend

__all__ = ["UnslothBackend", "ALL_LINEAR"]

#: What ``target_modules: [all-linear]`` means for Unsloth: every linear layer of a decoder block.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: The ``lora.init_lora_weights`` values Unsloth's get_peft_model accepts (it raises on the others).
UNSLOTH_INITS = ("true", "false", "gaussian", "loftq")


class UnslothBackend(TrainingBackend):
    """FastLanguageModel.from_pretrained + get_peft_model (QLoRA 4-bit, LoRA 16-bit or full)."""

    name = "unsloth"
    version = "1"
    description = ("Unsloth FastLanguageModel (CUDA): 4-bit QLoRA, LoRA, FP8-base LoRA or full fine-tuning; of the "
                   "lora.* keys, init_lora_weights only true/false/gaussian/loftq, modules_to_save only "
                   "embed_tokens/lm_head, no layers_pattern, and DoRA layers without Unsloth's fast kernels")
    priority = 100
    #: Unsloth computes its fused cross-entropy inside the model's forward; let it.
    trained_positions_loss = False
    #: Unsloth patches transformers' model classes process-wide, which breaks the exporters'
    #: plain transformers models (CPU forwards hit Triton kernels, generation wants
    #: Unsloth-only attributes): run them in a fresh process.
    exports_in_subprocess = True
    #: DDP only: Unsloth has no FSDP path (its kernels and offloaded checkpointing expect the
    #: whole model on each GPU).
    distributed_strategies = ("ddp",)

    def distributed_reason(self, config: Any, strategy: str) -> str | None:
        if strategy == "fsdp2":
            return ("Unsloth has no FSDP path and trains with DDP only; use distributed.strategy=ddp, "
                    "or model.backend=transformers for fsdp2")
        return super().distributed_reason(config, strategy)

    def config_problems(self, config: Any) -> list[tuple[str, str]]:
        if config.model.method == "full":
            return []
        lora, problems = config.lora, []
        if str(lora.init_lora_weights) not in UNSLOTH_INITS:
            problems.append(("lora.init_lora_weights", f"{lora.init_lora_weights}: Unsloth's get_peft_model accepts "
                             f"only {', '.join(UNSLOTH_INITS)}; train it with model.backend=transformers"))
        others = [str(m) for m in lora.modules_to_save if str(m) not in ("embed_tokens", "lm_head")]
        if others:
            problems.append(("lora.modules_to_save", f"{', '.join(others)}: Unsloth trains only embed_tokens and "
                             f"lm_head whole; train others with model.backend=transformers"))
        if lora.layers_pattern is not None:
            problems.append(("lora.layers_pattern", "Unsloth's get_peft_model does not pass it on to PEFT; drop it "
                             "(Unsloth finds the decoder layers itself) or use model.backend=transformers"))
        return problems

    def config_notes(self, config: Any) -> list[str]:
        if config.model.method != "full" and config.lora.use_dora:
            return ["lora.use_dora: Unsloth's fast LoRA kernels skip DoRA layers, which run PEFT's own (slower) "
                    "DoRA forward; the run trains DoRA, just not at Unsloth's LoRA speed"]
        return []

    def unsupported_reason(self, env: Any, options: Any = None) -> str | None:
        if not env.cuda:
            return "needs a CUDA GPU"
        import importlib.util

        if importlib.util.find_spec("unsloth") is None:
            return "the unsloth package is not installed (pip install unsloth)"
        return None

    def prepare_environment(self) -> None:
        """Import unsloth before transformers, TRL and PEFT are used, so its patches apply.

        Then give its packed attention torch's varlen kernel where this torch lacks the
        argument Unsloth asks for (:mod:`sft.plugins.backends.unsloth_varlen`).
        """
        import unsloth  # noqa: F401

        from sft.core.notices import notice
        from sft.plugins.backends.unsloth_varlen import enable_varlen_gqa

        changed = enable_varlen_gqa()
        if changed:
            notice(changed)

    def load(self, config: Any) -> tuple[Any, Any]:
        self.prepare_environment()
        import torch
        from unsloth import FastLanguageModel

        from sft.engine import distributed
        from sft.engine.models import pretrained_kwargs, resolve_model

        dtype = None if config.model.dtype == "auto" else getattr(torch, config.model.dtype)
        method = config.model.method
        placement = distributed.device_map(config)  # a DDP rank loads onto its own GPU
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=resolve_model(config.model.name),
            max_seq_length=int(config.model.max_seq_length),
            dtype=dtype,  # None: bf16 where supported, else fp16
            load_in_4bit=method == "qlora",
            full_finetuning=method == "full",
            use_gradient_checkpointing=self._checkpointing(config),
            random_state=int(config.lora.random_state),
            # training.memory=long: Unsloth's tiled MLP, which runs each MLP in row chunks (a
            # chunk's intermediates are recomputed in backward), applied to every `.mlp` it finds.
            unsloth_tiled_mlp=config.training.memory == "long",
            **({"device_map": placement} if placement is not None else {}),
            **pretrained_kwargs(config.model),
        )
        if config.training.memory == "long":
            report_tiled_mlp(model)
        return model, tokenizer

    @staticmethod
    def _checkpointing(config: Any) -> Any:
        value = config.lora.use_gradient_checkpointing
        return {"auto": "unsloth", "unsloth": "unsloth", "true": True, "false": False}[value]

    def prepare_for_training(self, model: Any, config: Any, new_token_rows: Sequence[int] = ()) -> Any:
        if config.model.method == "full":
            return model
        from unsloth import FastLanguageModel

        from .common import lora_settings

        settings = lora_settings(config)
        if settings["target_modules"] == "all-linear":
            settings["target_modules"] = list(ALL_LINEAR)
        modules_to_save = settings.pop("modules_to_save") or []
        if new_token_rows:
            # Tokens the base model lacks were added: Unsloth trains their rows as whole
            # modules (it has no trainable-token rows), input embedding and output head.
            modules_to_save = list(dict.fromkeys([*modules_to_save, "embed_tokens", "lm_head"]))
        # Unsloth names the common LoRA settings itself and hands the rest to PEFT's LoraConfig.
        peft_only = {key: settings[key] for key in ("use_dora", "target_parameters", "rank_pattern", "alpha_pattern")
                     if settings[key]}
        model = FastLanguageModel.get_peft_model(
            model,
            r=settings["r"],
            target_modules=settings["target_modules"],
            lora_alpha=settings["lora_alpha"],
            lora_dropout=settings["lora_dropout"],
            bias=settings["bias"],
            layers_to_transform=settings["layers_to_transform"],
            use_gradient_checkpointing=self._checkpointing(config),
            random_state=int(config.lora.random_state),
            use_rslora=settings["use_rslora"],
            init_lora_weights=settings["init_lora_weights"],
            loftq_config=settings["loftq_config"],
            modules_to_save=modules_to_save or None,
            **peft_only,
        )
        if config.model.method == "fp8":
            to_fp8_base(model)
        if config.training.memory == "auto" and self._checkpointing(config):
            plan_checkpoint_skips(model, config)
        return model

    def continue_training(self, model: Any, config: Any, adapter_dir: Any) -> Any:
        from unsloth import FastLanguageModel

        from .common import load_trainable_adapter

        model = load_trainable_adapter(model, adapter_dir)
        # Unsloth's fast LoRA kernels and offloaded checkpointing, as its get_peft_model sets them up.
        model = FastLanguageModel.patch_peft_model(model, use_gradient_checkpointing=self._checkpointing(config))
        if config.training.memory == "auto" and self._checkpointing(config):
            plan_checkpoint_skips(model, config)
        return model


def to_fp8_base(model: Any) -> None:
    """``model.method=fp8``: the LoRA layers' 16-bit base weights become e4m3 with per-row scales.

    Unsloth's fused LoRA kernels read such a weight (``weight`` e4m3, ``weight_scale``) and run
    its forward products on FP8 tensor cores; ``SFT_FP8_KERNELS=sft`` sends every base product
    through :mod:`.fp8`'s instead (FP8 backward too).
    """
    from sft.core.notices import notice

    from .fp8 import convert_lora_base_to_fp8, fp8_kernels_choice, use_sft_kernels_under_unsloth

    report = convert_lora_base_to_fp8(model)
    notice(report.describe())
    if fp8_kernels_choice() == "sft":
        changed = use_sft_kernels_under_unsloth(model)
        notice(f"model.method=fp8: SFT_FP8_KERNELS=sft, {changed} fused LoRA projections back on PEFT's forward: "
               "the base products are sft's FP8 ones (input gradient in FP8 too)")


def report_tiled_mlp(model: Any) -> None:
    """Say how many decoder layers got Unsloth's tiled MLP; refuse a model where none did.

    Unsloth tiles the modules whose name ends in ``.mlp``, ``.feed_forward`` and a few more,
    and marks each with ``_unsloth_forward``; a family named otherwise would train untiled,
    at default memory, with nothing said.
    """
    from unsloth_zoo.block_swap import find_decoder_layers

    from sft.core.errors import ConfigError, ConfigProblem
    from sft.core.notices import notice

    layers = find_decoder_layers(model)
    tiled = sum(any("_unsloth_forward" in vars(m) for m in layer.modules()) for layer in layers)
    if not tiled:
        raise ConfigError([ConfigProblem("training.memory", f"long: Unsloth's tiled MLP found no MLP module in the "
                                         f"{len(layers)} decoder layers of this {type(model).__name__}; use "
                                         "training.memory=default")])
    notice(f"training.memory=long: Unsloth's tiled MLP on {tiled} of {len(layers)} decoder layers")


def plan_checkpoint_skips(model: Any, config: Any) -> None:
    """``training.memory=auto``: let as many layers skip checkpointing as free VRAM allows.

    The policy (probe, budget, choice) is :func:`.memory.plan_checkpointing`; this
    supplies Unsloth's way to mark layers (``get_peft_model(checkpoint_skip_layers=k)``'s
    ``skip_checkpointing``), undoing the previous marks first so the probe can try several k.
    """
    from unsloth.models._utils import skip_checkpointing
    from unsloth_zoo.block_swap import find_decoder_layers

    from sft.core.notices import notice

    from .memory import plan_checkpointing

    layers = find_decoder_layers(model)

    def set_skip(k: int) -> None:
        for layer in layers:
            layer.__dict__.pop("_unsloth_skip_checkpoint", None)
        skip_checkpointing(model, k)

    plan = plan_checkpointing(model, len(layers), int(config.training.per_device_train_batch_size),
                              int(config.model.max_seq_length), set_skip)
    _forget_probe(model)
    notice(plan.describe())


def _forget_probe(model: Any) -> None:
    """Drop what the probe's forward/backward left in Unsloth's compile and checkpoint caches.

    Unsloth arms a detector for a forward/backward run before ``trainer.train()``: graphs
    traced then must not be reused in training. The trainer would reset them too, but with a
    warning about a "poisoned" cache that the user did not cause; the reset is done here,
    where the probe ran, and its warning is ours to silence.
    """
    import types
    import warnings

    try:
        from unsloth.models._utils import _unsloth_reset_stray_compile_cache
    except ImportError:  # an Unsloth without the detector has nothing to reset
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsloth: detected a manual forward/backward")
        _unsloth_reset_stray_compile_cache(types.SimpleNamespace(model=model))


@hookimpl
def register_backends(register):
    register(UnslothBackend())
