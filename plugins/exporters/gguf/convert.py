"""HF Llama-family folder → GGUF, in pure Python with the official ``gguf`` package.

What llama.cpp's ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM`` with a BPE
(``tokenizer.json``) vocabulary, reimplemented on ``gguf.GGUFWriter`` so export needs no
llama.cpp checkout, no compiler and no network:

- hyperparameters under ``llama.*`` (block count, context, widths, heads, rope, rms eps);
- tensors renamed with ``gguf.get_tensor_name_map`` (``MODEL_TENSORS[MODEL_ARCH.LLAMA]``);
  ``q_proj``/``k_proj`` rows permuted into the interleaved rotary layout llama.cpp expects
  (``LlamaModel.permute``); norms and 1-D tensors kept in F32; a tied ``lm_head`` omitted
  (llama.cpp falls back to ``token_embd``); llama3 rope scaling written as ``rope_freqs``;
- the vocabulary: tokens and token types from the HF tokenizer, merges from
  ``tokenizer.json``, the pre-tokenizer identified by the same check-string hash llama.cpp
  uses, special token ids, and the chat template.

F16, BF16 and Q8_0 are quantized here with ``gguf.quants`` (numpy). K-quants go through
llama.cpp's own quantizer (:func:`.llama.quantize_with_llama_cpp`) from an F16 file, because its
per-tensor mixing policy (``*_M`` variants, fallbacks for rows that are not a multiple of
256) is what users expect from those names.

Tensors are streamed: each is read from the safetensors shards, converted and written
before the next is read, so peak memory is one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from sft.core.errors import SftError
from sft.core.templating import adds_bos

from .quants import PYTHON_QUANTS

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "architecture_problem",
    "tokenizer_problem",
    "detect_pre_tokenizer",
    "convert_to_gguf",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids of this string
# (convert_hf_to_gguf.py, get_vocab_base_pre); the same string gives the same hash here.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: check-string hash -> llama.cpp ``tokenizer.ggml.pre`` for the Llama-family tokenizers we test.
_KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Llama 3's split regex; a tokenizer.json that uses it tokenizes like llama.cpp's llama-bpe
# even when extra added tokens change the hash.
_LLAMA3_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


def architecture_problem(config: dict[str, Any]) -> str | None:
    """Why a model with this ``config.json`` cannot be converted, or None when it can."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return (f"the gguf exporter supports the Llama family only (SmolLM2, Llama 3.x: "
                f"architectures {list(SUPPORTED_ARCHITECTURES)}, model_type 'llama'); this model is "
                f"architectures={archs}, model_type={model_type!r}. Use the lora or merged_16bit exporter "
                f"and llama.cpp's convert_hf_to_gguf.py for it")
    if config.get("quantization_config"):
        return "the merged model still carries a quantization_config; the gguf exporter needs 16-bit weights"
    heads = config.get("num_attention_heads")
    if not heads or config.get("hidden_size", 0) % heads:
        return f"hidden_size {config.get('hidden_size')} is not a multiple of num_attention_heads {heads}"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SftError(f"{path}: cannot read JSON: {exc}") from None


def tokenizer_problem(tokenizer_dir: str | Path) -> str | None:
    """Why the tokenizer files in ``tokenizer_dir`` cannot become a GGUF vocabulary, or None."""
    d = Path(tokenizer_dir)
    missing = [f for f in ("tokenizer.json", "tokenizer_config.json") if not (d / f).is_file()]
    if missing:
        return f"{d}: missing tokenizer file(s) {', '.join(missing)}; the gguf exporter reads the vocabulary and merges from them"
    model = _read_json(d / "tokenizer.json").get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return (f"{d / 'tokenizer.json'}: the gguf exporter supports byte-level BPE tokenizers (SmolLM2, Llama 3); "
                f"this one is model.type={model.get('type')!r}, byte_fallback={model.get('byte_fallback')!r} "
                f"(a SentencePiece-style vocabulary such as Llama 2's)")
    if not model.get("merges"):
        return f"{d / 'tokenizer.json'}: has no BPE merges"
    return None


def detect_pre_tokenizer(tokenizer: Any, tokenizer_dir: str | Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for ``tokenizer``, found as llama.cpp finds it.

    Raises :class:`SftError` for a pre-tokenizer llama.cpp would tokenize differently.
    """
    chkhsh = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if chkhsh in _KNOWN_PRE:
        return _KNOWN_PRE[chkhsh]
    pre = json.dumps(_read_json(Path(tokenizer_dir) / "tokenizer.json").get("pre_tokenizer"))
    if _LLAMA3_REGEX_START in pre:
        return "llama-bpe"
    raise SftError(
        f"{tokenizer_dir}: unknown BPE pre-tokenizer (check hash {chkhsh}); llama.cpp would split text "
        f"differently from the trained tokenizer. Supported: Llama 3.x (llama-bpe), SmolLM/SmolLM2 (smollm), GPT-2")


# -- vocabulary ---------------------------------------------------------------------------------
def _looks_special(token: str) -> bool:
    # Mirrors convert_hf_to_gguf.py's does_token_look_special for added tokens not flagged special.
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    if reverse and max(reverse) >= vocab_size:
        raise SftError(f"the tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}; "
                       f"the embedding matrix was not resized for the added tokens")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = getattr(decoder.get(i), "special", False)
            types.append(gguf.TokenType.CONTROL if special or _looks_special(token) else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    if not token:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
        return tid
    return None


# -- tensors ------------------------------------------------------------------------------------
def _permute(weights: Any, n_head: int) -> Any:
    # HF stores each head's rotary halves as [first half; second half]; llama.cpp's rope
    # wants them interleaved. Same transform as convert_hf_to_gguf.py's LlamaModel.permute.
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta + rope_scaling.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "rope_type" not in params and params.get("type"):
        params["rope_type"] = params["type"]
    return params


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _llama3_rope_factors(config: dict[str, Any]) -> Any:
    import numpy as np

    rope = _rope_parameters(config)
    base = rope.get("rope_theta", 10000.0)
    dim = _head_dim(config)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@dataclass
class _Planned:
    name: str  # GGUF name
    source: str | None  # HF name (None for generated tensors)
    qtype: Any  # GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape, HF order (rows, cols)


def _index_tensors(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SftError(f"{model_dir}: no *.safetensors weights to convert")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                where[key] = f
    return where


def _shape(path: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as sf:
        return tuple(sf.get_slice(name).get_shape())


def _plan(model_dir: Path, config: dict[str, Any], qtype: Any) -> tuple[list[_Planned], dict[str, Path]]:
    import gguf

    where = _index_tensors(model_dir)
    n_blocks = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    tied = bool(config.get("tie_word_embeddings"))
    plan: list[_Planned] = []
    if _rope_parameters(config).get("rope_type", "").lower() == "llama3":
        plan.append(_Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None,
                             gguf.GGMLQuantizationType.F32, (_head_dim(config) // 2,)))
    for hf_name in where:
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when output.weight is absent
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SftError(f"{where[hf_name]}: tensor '{hf_name}' has no GGUF name in the Llama tensor map; "
                           f"the model is not a plain Llama")
        shape = _shape(where[hf_name], hf_name)
        t = qtype
        if len(shape) <= 1 or new.endswith("_norm.weight"):
            t = gguf.GGMLQuantizationType.F32  # llama.cpp keeps norms and vectors in F32
        elif t not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16) and shape[-1] % gguf.GGML_QUANT_SIZES[t][0]:
            t = gguf.GGMLQuantizationType.F16  # convert_hf_to_gguf.py's fallback for odd rows
        plan.append(_Planned(new, hf_name, t, shape))
    return plan, where


def _tensor_data(item: _Planned, where: dict[str, Path], config: dict[str, Any]) -> Any:
    import gguf
    import numpy as np
    from safetensors import safe_open

    if item.source is None:
        data = _llama3_rope_factors(config)
    else:
        with safe_open(str(where[item.source]), framework="pt") as sf:
            data = sf.get_tensor(item.source).float().numpy()
        if item.source.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, config["num_attention_heads"])
        elif item.source.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    if item.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    out = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), item.qtype)
    if item.qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(out).all():
        # bf16 weights can exceed float16's range (65504); llama.cpp would compute with inf.
        raise SftError(f"tensor '{item.source}' has values beyond float16's range; export bf16 (or q8_0) instead of f16")
    return out


def _nbytes_and_dtype(item: _Planned) -> tuple[Any, tuple[int, ...], int]:
    import gguf
    import numpy as np

    if item.qtype == gguf.GGMLQuantizationType.F32:
        return np.float32, item.shape, 4 * math.prod(item.shape)
    if item.qtype == gguf.GGMLQuantizationType.F16:
        return np.float16, item.shape, 2 * math.prod(item.shape)
    byte_shape = gguf.quant_shape_to_byte_shape(item.shape, item.qtype)
    return np.uint8, byte_shape, math.prod(byte_shape)


# -- conversion ---------------------------------------------------------------------------------
def convert_to_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    quant: str,
    *,
    tokenizer: Any,
    tokenizer_dir: str | Path,
    chat_template: str | None,
    eot_token: str | None,
    name: str,
) -> dict[str, Any]:
    """Write ``model_dir`` (a merged HF Llama folder with safetensors) as a ``quant`` GGUF.

    Args:
        model_dir: the merged 16-bit HF model.
        out_path: the GGUF to write; written to ``<out_path>.partial`` and renamed when complete.
        quant: one of :data:`PYTHON_QUANTS`.
        tokenizer: the run's HF tokenizer (carries the template's added tokens).
        tokenizer_dir: the folder it was loaded from (``tokenizer.json`` is read for merges).
        chat_template: the Jinja stored as ``tokenizer.chat_template``.
        eot_token: the template's end-of-turn token, stored as both ``eos`` and ``eot`` so
            llama.cpp and Ollama stop there.
        name: ``general.name``.

    Returns details: the quant, size in bytes, seconds, tensor count and tokenizer pre.
    """
    import gguf

    if quant not in PYTHON_QUANTS:
        raise SftError(f"quant '{quant}' is not written in Python; use one of {', '.join(PYTHON_QUANTS)}")
    start, cpu = time.perf_counter(), time.process_time()
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = _read_json(model_dir / "config.json")
    problem = architecture_problem(config) or tokenizer_problem(tokenizer_dir)
    if problem:
        raise SftError(problem)
    qtype = gguf.GGMLQuantizationType[PYTHON_QUANTS[quant][0]]
    ftype = gguf.LlamaFileType[PYTHON_QUANTS[quant][1]]
    pre = detect_pre_tokenizer(tokenizer, tokenizer_dir)
    plan, where = _plan(model_dir, config, qtype)

    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_metadata(writer, config, ftype, name)
        _write_vocab(writer, tokenizer, tokenizer_dir, config["vocab_size"], pre, chat_template, eot_token)
        for item in plan:
            dtype, shape, nbytes = _nbytes_and_dtype(item)
            plain = item.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            writer.add_tensor_info(item.name, shape, dtype, nbytes, raw_dtype=None if plain else item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            writer.write_tensor_data(_tensor_data(item, where, config))
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return {
        "quant": quant,
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "tensors": len(plan),
        "tokenizer_pre": pre,
    }


def _write_metadata(writer: Any, config: dict[str, Any], ftype: Any, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    rope = _rope_parameters(config)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = (rope.get("rope_type") or "default").lower()
    if rope_type == "linear" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in ("default", "llama3"):
        raise SftError(f"config.json: rope type '{rope_type}' is not supported by the gguf exporter (default, linear, llama3)")
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer: Any, tokenizer: Any, tokenizer_dir: str | Path, vocab_size: int, pre: str,
                 chat_template: str | None, eot_token: str | None) -> None:
    import gguf

    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # SpecialVocab only for the merges (it knows both merge encodings of tokenizer.json);
    # special ids come from the tokenizer object, which is what training used.
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, special_token_types=())
    if not special.merges:
        raise SftError(f"{tokenizer_dir}/tokenizer.json: no BPE merges found")
    writer.add_token_merges(special.merges)
    eot_id = _token_id(tokenizer, eot_token)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": eot_id if eot_id is not None else tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "eot": eot_id,
    }
    for kind, tid in ids.items():
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(adds_bos(tokenizer))  # what the Ollama TEMPLATE relies on (TurnTemplate)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
