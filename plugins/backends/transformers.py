"""The ``transformers`` training backend: plain transformers + PEFT, on any device.

This is what ``model.backend: auto`` picks without a CUDA GPU. On CPU it trains in float32
without gradient checkpointing (bf16 autocast plus checkpointing is ~23x slower on a small
CPU), and ``model.method: qlora`` falls back to ``lora`` with a one-line notice, because
4-bit bitsandbytes kernels need CUDA.

Distributed (docs/distributed.md): under DDP each rank loads the model onto its own GPU;
under FSDP2 it loads without a device map and accelerate shards it by decoder layer. QLoRA
under FSDP2 stores the 4-bit weights in the compute dtype (``bnb_4bit_quant_storage``) and
keeps the adapters in it too: FSDP2 flattens one dtype per shard, and with the default
uint8 storage it trains with loss 0 and NaN gradients without an error (accelerate#3983).

The loss is computed only at trained positions (``trained_positions_loss``), which the
trainer in :mod:`sft.engine.trainer` honours: the output head then projects a few hundred hidden
states instead of every position of the batch onto the 49k-word vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.interfaces import TrainingBackend

__all__ = ["TransformersBackend", "TransformersOptions"]

_STORAGE = ("auto", "uint8", "bfloat16", "float16", "float32")


@dataclass
class TransformersOptions:
    bnb_4bit_quant_storage: str = opt("auto", "dtype the 4-bit QLoRA weights are stored in. auto: the compute dtype under distributed.strategy=fsdp2 (which needs it), else uint8.", _STORAGE)


def _quant_storage(config: Any, dtype: Any) -> Any:
    """The torch dtype of 4-bit storage: ``auto`` is the compute dtype under FSDP2, else uint8."""
    import torch

    setting = _options(config).bnb_4bit_quant_storage
    if setting == "auto":
        return dtype if config.distributed.strategy == "fsdp2" else torch.uint8
    return getattr(torch, setting)


def _options(config: Any) -> TransformersOptions:
    node = config.model.get("transformers")
    return TransformersOptions(**node) if node is not None else TransformersOptions()


class TransformersBackend(TrainingBackend):
    """AutoModelForCausalLM + PEFT LoRA; runs anywhere torch runs."""

    name = "transformers"
    version = "1"
    description = ("transformers + PEFT (CPU or any device); fp32 without gradient checkpointing on CPU; every lora.* "
                   "key as PEFT means it (DoRA and PiSSA/OLoRA not under FSDP2)")
    priority = 10
    options = TransformersOptions
    #: The trainer computes the loss only where a label is trained (see module docstring).
    trained_positions_loss = True
    distributed_strategies = ("ddp", "fsdp2")

    def config_problems(self, config: Any) -> list[tuple[str, str]]:
        if config.training.memory != "default":
            return [("training.memory", f"{config.training.memory}: plans Unsloth's checkpointing or tiled MLP, which "
                     "this backend does not have; use model.backend=unsloth (CUDA) or training.memory=default")]
        return []

    def distributed_reason(self, config: Any, strategy: str) -> str | None:
        reason = super().distributed_reason(config, strategy)
        if not reason and strategy == "fsdp2" and config.model.method == "fp8":
            return "model.method=fp8 is not sharded with FSDP2 (its e4m3 base and float32 scales differ in dtype); use ddp"
        if reason or strategy != "fsdp2":
            return reason
        if config.model.method != "full" and config.lora.use_dora:
            return ("lora.use_dora under FSDP2: DoRA's magnitude is the norm of each whole weight matrix, which "
                    "FSDP2 shards across processes; train DoRA with distributed.strategy=ddp")
        from sft.engine.configuration import DECOMPOSING_INITS, lora_init_kind

        if config.model.method != "full" and lora_init_kind(str(config.lora.init_lora_weights)) in DECOMPOSING_INITS:
            return (f"lora.init_lora_weights={config.lora.init_lora_weights} under FSDP2: the decomposition and the "
                    "conversion of the saved adapter need each whole weight matrix, which FSDP2 shards; use "
                    "distributed.strategy=ddp")
        if config.model.method != "qlora":
            return None
        storage = _options(config).bnb_4bit_quant_storage
        if storage == "auto":
            return None
        import torch

        from sft.engine.backends import resolve_dtype
        from sft.core.env import current_environment

        compute = resolve_dtype(config, current_environment())
        if getattr(torch, storage) != compute:
            return (f"QLoRA under FSDP2 needs model.transformers.bnb_4bit_quant_storage equal to the compute "
                    f"dtype ({str(compute).removeprefix('torch.')}; auto does it): with {storage} storage FSDP2 "
                    f"trains with loss 0 and NaN gradients and no error (accelerate#3983)")
        return None

    def load(self, config: Any) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM

        from sft.engine.backends import resolve_dtype
        from sft.core.env import current_environment
        from sft.core.errors import SftError
        from sft.engine.models import forget_gguf_quantization, load_tokenizer, pretrained_kwargs, resolve_model
        from sft.core.notices import notice

        from sft.engine import distributed

        env = current_environment()
        method = config.model.method
        kwargs = pretrained_kwargs(config.model)
        dtype = resolve_dtype(config, env)
        placement = distributed.device_map(config)  # a DDP rank's own GPU; None for FSDP2 and one process
        if method == "qlora":
            if env.cuda:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=_quant_storage(config, dtype))
                if placement is not None:
                    kwargs["device_map"] = placement
            else:
                notice("model.method=qlora needs CUDA (4-bit bitsandbytes); training LoRA on a float32 base instead")
        path = resolve_model(config.model.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except OSError as exc:
            raise SftError(f"model.name: cannot load '{config.model.name}': {exc}") from None
        if config.model.gguf_file:
            forget_gguf_quantization(model)
        if env.cuda and "quantization_config" not in kwargs and not distributed.is_fsdp(config):
            model = model.to(distributed.device(env))  # FSDP2 places the shards itself
        # The KV cache is useless in training, and with it transformers cannot tell packed
        # sequences apart from position_ids (they would attend to each other).
        model.config.use_cache = False
        torch.manual_seed(int(config.lora.random_state))
        return model, load_tokenizer(config.model)

    def prepare_for_training(self, model: Any, config: Any, new_token_rows: Sequence[int] = ()) -> Any:
        import torch

        from sft.engine.backends import resolve_dtype
        from sft.core.env import current_environment

        from .common import lora_settings, new_token_targets

        env = current_environment()
        new_rows = list(new_token_rows)
        use_ckpt = config.lora.use_gradient_checkpointing
        checkpointing = use_ckpt in ("true", "unsloth") or (use_ckpt == "auto" and env.cuda)
        if config.model.method == "full":
            model.requires_grad_(True)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return model

        from peft import LoraConfig, get_peft_model

        model = _ready_for_adapter(model, checkpointing)
        settings = lora_settings(config)
        loftq = settings.pop("loftq_config")
        if settings["init_lora_weights"] == "loftq":
            from peft import LoftQConfig

            settings["loftq_config"] = LoftQConfig(**loftq)
        tokens = new_token_targets(model, new_rows, settings["modules_to_save"])
        if tokens:
            # Added tokens (an end-of-turn token the base model lacks, model.add_tokens) start
            # untrained: train just their rows of the embedding and of the output head.
            settings["trainable_token_indices"] = tokens
        # LoRA's A matrices are drawn from torch's global RNG: seed it for reproducible runs.
        torch.manual_seed(int(config.lora.random_state))
        peft_config = LoraConfig(task_type="CAUSAL_LM", **settings)
        model = get_peft_model(model, peft_config)
        from sft.engine import distributed

        if config.model.method == "fp8":
            from sft.core.notices import notice

            from .fp8 import convert_lora_base_to_fp8

            notice(convert_lora_base_to_fp8(model).describe())
        if distributed.is_fsdp(config) and getattr(model, "is_loaded_in_4bit", False):
            # FSDP2 shards one dtype: the adapters (and what prepare_model_for_kbit_training
            # upcast to float32) go to the 4-bit storage dtype, the compute dtype.
            storage = _quant_storage(config, resolve_dtype(config, env))
            for param in model.parameters():
                if param.dtype.is_floating_point and param.dtype != storage:
                    param.data = param.data.to(storage)
        return model

    def continue_training(self, model: Any, config: Any, adapter_dir: Any) -> Any:
        from sft.core.env import current_environment

        from .common import load_trainable_adapter

        use_ckpt = config.lora.use_gradient_checkpointing
        checkpointing = use_ckpt in ("true", "unsloth") or (use_ckpt == "auto" and current_environment().cuda)
        return load_trainable_adapter(_ready_for_adapter(model, checkpointing), adapter_dir)


def _ready_for_adapter(model: Any, checkpointing: bool) -> Any:
    """The base model made ready for a LoRA adapter: a 4-bit one through PEFT's k-bit preparation,
    gradient checkpointing on when asked."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


@hookimpl
def register_backends(register):
    register(TransformersBackend())
