"""Tiny models of the families llama.cpp converts, built from a config (no Hub), for the GGUF family matrix.

Each family gets its real architecture class (hidden 64, 2 layers, random weights) and a
tokenizer of the family's kind:

- BPE (Qwen2, Qwen3): SmolLM2's byte-level BPE tokenizer (the embedded model's). transformers 5
  loads it through the family's tokenizer class (``Qwen2Tokenizer`` splits with Qwen2's regex);
- SentencePiece (Mistral, Gemma 2, Gemma 3, Phi-3): a small BPE SentencePiece model with byte
  fallback, trained offline on the embedded identity data with the family's control tokens at
  the family's ids, converted to ``tokenizer.json`` by transformers and kept as
  ``tokenizer.model`` (llama.cpp's converter reads that). Mistral's is the v0.1/v0.2 kind:
  ``[INST]`` is plain text, and the Llama-2 "legacy" rule puts a word boundary after special
  tokens, as llama.cpp's SentencePiece tokenizer does.

``make_tiny_family(path, family)`` writes one; ``FAMILIES`` says which template each trains with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "Family", "make_tiny_family", "train_sentencepiece"]

_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers class name
    model_class: str
    template: str  # the chat template its test run trains with
    tokenizer: str  # "smollm2" or "sentencepiece"
    tokenizer_class: str = "TokenizersBackend"
    #: SentencePiece: (pad, eos, bos, unk) ids and the control tokens after them.
    special_ids: tuple[int, int, int, int] = (0, 2, 1, 3)
    specials: tuple[str, ...] = ()
    names: tuple[str, str, str, str] = ("<pad>", "</s>", "<s>", "<unk>")
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    # Qwen's own qwen/qwen3 templates come with the tool-calling work (issue 16); ChatML is their format.
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "chatml", "smollm2"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "chatml", "smollm2", extra=dict(head_dim=16)),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "mistral", "sentencepiece", "LlamaTokenizer",
           special_ids=(3, 2, 1, 0), names=("<pad>", "</s>", "<s>", "<unk>"),
           extra=dict(sliding_window=None)),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "gemma", "sentencepiece", "GemmaTokenizer",
           special_ids=(0, 1, 2, 3), specials=("<start_of_turn>", "<end_of_turn>"),
           names=("<pad>", "<eos>", "<bos>", "<unk>"),
           # Tied, as every Gemma is: llama.cpp's Gemma 2 conversion drops lm_head and uses token_embd.
           extra=dict(head_dim=16, sliding_window=64, query_pre_attn_scalar=16, tie_word_embeddings=True)),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "gemma", "sentencepiece", "GemmaTokenizer",
           special_ids=(0, 1, 2, 3), specials=("<start_of_turn>", "<end_of_turn>"),
           names=("<pad>", "<eos>", "<bos>", "<unk>"),
           extra=dict(head_dim=16, sliding_window=64, query_pre_attn_scalar=16, tie_word_embeddings=True)),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "phi3", "sentencepiece", "LlamaTokenizer",
           special_ids=(3, 2, 1, 0), specials=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           names=("<pad>", "</s>", "<s>", "<unk>"), extra=dict(pad_token_id=None)),
]}


def _corpus() -> str:
    from sft.engine.models import resolve_model  # noqa: F401 - the package is importable

    from importlib.resources import files

    rows = json.loads(files("sft.engine.assets").joinpath("identity.json").read_text())
    lines = [turn["value"] for row in rows for turn in row["conversations"]]
    lines += ["What is the capital of France?", "Paris is the capital of France.", "Hello! How can I help you today?",
              "Quote \"this\" and {{ that }}, tabs\tand newlines, ünïcödé — 'quotes' 1234 3.14."]
    return "\n".join(lines * 3)


def train_sentencepiece(out_dir: Path, family: Family, vocab_size: int = 600) -> Path:
    """Train a small BPE SentencePiece model with byte fallback and the family's special tokens; returns tokenizer.model."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text(_corpus())
    pad, eos, bos, unk = family.special_ids
    names = dict(zip(("pad", "eos", "bos", "unk"), family.names))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, split_digits=True,
        pad_id=pad, eos_id=eos, bos_id=bos, unk_id=unk,
        pad_piece=names["pad"], eos_piece=names["eos"], bos_piece=names["bos"], unk_piece=names["unk"],
        user_defined_symbols=list(family.specials), add_dummy_prefix=family.tokenizer_class == "LlamaTokenizer",
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    corpus.unlink()
    return out_dir / "tokenizer.model"


def _sentencepiece_tokenizer(path: Path, family: Family) -> Any:
    from transformers import AutoTokenizer

    work = path.parent / f".{path.name}-spm"
    model = train_sentencepiece(work, family)
    names = dict(zip(("pad", "eos", "bos", "unk"), family.names))
    (work / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": family.tokenizer_class, "bos_token": names["bos"], "eos_token": names["eos"],
        "unk_token": names["unk"], "pad_token": names["pad"], "add_bos_token": True, "add_eos_token": False,
        "legacy": True}))
    tokenizer = AutoTokenizer.from_pretrained(str(work))
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.specials)})
    tokenizer.save_pretrained(str(path))
    shutil.copy(model, path / "tokenizer.model")
    shutil.rmtree(work, ignore_errors=True)
    return tokenizer


def make_tiny_family(path: str | Path, family: str, seed: int = 0) -> Path:
    """Write a random tiny model of ``family`` (a key of :data:`FAMILIES`) with its tokenizer to ``path``."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from sft.engine.models import embedded_model_dir

    fam = FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if fam.tokenizer == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        tokenizer.save_pretrained(str(path))
    else:
        tokenizer = _sentencepiece_tokenizer(path, fam)
    settings = dict(_SIZES, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    settings.update(fam.extra)
    torch.manual_seed(seed)
    config = getattr(transformers, fam.config_class)(**settings)
    model = getattr(transformers, fam.model_class)(config)
    model.save_pretrained(str(path))
    return path
