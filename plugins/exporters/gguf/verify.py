"""Check that a GGUF really works: load it in llama.cpp and compare greedy tokens with the HF model.

For one GGUF file:

1. load it with llama-cpp-python (CPU);
2. tokenize the template's generation prompt with the GGUF's own vocabulary and check the
   ids equal the HF tokenizer's (a wrong pre-tokenizer or vocabulary shows up here);
3. greedy-decode ``n`` tokens (argmax of the logits, no sampler) and compare them with
   the merged HF model's greedy tokens (plain transformers, float32);
4. teacher-forced agreement: feed prompt + the HF tokens and count the positions where
   llama.cpp's argmax is the HF token. Free-running tokens diverge for good after one
   flip; this number says how close a K-quant really is.

``exact`` (f16, bf16, q8_0) requires equal prompt ids and equal greedy tokens, where a
teacher-forced flip is forgiven only at a near-tie of the HF model itself (see :func:`judge`);
otherwise only the prompt ids must match and the agreement is reported.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sft.core.errors import SftError

from .llama import LLAMA_EXTRA_INSTALL, llama_cpp_available, quiet_native_output
from .worker import run_in_worker

__all__ = ["EXACT_QUANTS", "verify_gguf", "verify_here"]

#: The worker task that runs :func:`verify_here` in a torch-free process.
VERIFY_TASK = f"{__name__}:verify_here"

#: Quants whose greedy tokens must equal the HF model's.
EXACT_QUANTS = ("f16", "bf16", "q8_0")
#: HF logit gap (nats) under which a greedy flip is a near-tie: measured on SmolLM2, q8_0
#: moved a top-two gap by 0.27 (0.20 one way to 0.07 the other).
DEFAULT_TIE_MARGIN = 0.5


def _argmax(row: Any) -> int:
    import numpy as np

    return int(np.argmax(row))


def verify_gguf(
    path: str | Path,
    quant: str,
    prompt: str,
    hf_prompt_ids: Sequence[int],
    reference: Sequence[int],
    *,
    exact: bool | None = None,
    threads: int | None = None,
    gaps_of: Callable[[list[int]], list[float]] | None = None,
    tie_margin: float = DEFAULT_TIE_MARGIN,
    lora_path: str | Path | None = None,
) -> dict[str, Any]:
    """Load ``path`` (with the GGUF LoRA adapter ``lora_path`` applied, when given) with llama.cpp and compare it with the HF reference; returns the verification record.

    Args:
        path: the GGUF file.
        quant: its quant name (decides ``exact`` when not given).
        prompt: the rendered generation prompt (template text, special tokens as text).
        hf_prompt_ids: the HF tokenizer's ids for ``prompt`` (no special tokens added).
        reference: the merged HF model's greedy tokens after ``hf_prompt_ids``.
        exact: require token equality (default: ``quant in EXACT_QUANTS``).
        gaps_of: given llama.cpp's teacher-forced tokens, the HF model's logit of its own token
            minus its logit of llama.cpp's, per position; without it every flip is a failure.
        tie_margin: a flip where that gap is below this (nats) is a near-tie, not a failure.

    The record has ``ok``, ``summary``, the tokens and texts, ``prompt_ids_match``,
    ``tokens_match``, ``prefix_match`` (leading equal tokens) and ``agreement``.
    It runs in a worker process that never imports torch (see :mod:`.worker`).
    """
    if not llama_cpp_available():  # checked without importing it: llama.cpp stays out of this (torch) process
        raise SftError(f"GGUF verification loads the file with llama.cpp: {LLAMA_EXTRA_INSTALL}, "
                       f"or turn verification off with export.verify=false")
    raw = run_in_worker(VERIFY_TASK, {"path": str(path), "prompt": prompt, "hf_prompt_ids": list(hf_prompt_ids),
                                   "reference": list(reference), "threads": threads,
                                   "lora_path": str(lora_path) if lora_path else None})
    exact = quant in EXACT_QUANTS if exact is None else exact
    return judge(raw, list(reference), exact, gaps_of, tie_margin)


def judge(raw: dict[str, Any], reference: list[int], exact: bool,
          gaps_of: Callable[[list[int]], list[float]] | None, tie_margin: float) -> dict[str, Any]:
    """Turn what llama.cpp did (:func:`verify_here`) into the verification record.

    Exact quants pass when the free-running greedy tokens equal the reference, or when every
    teacher-forced position where llama.cpp picks another token is a near-tie in the HF
    model itself (its logit gap below ``tie_margin``): q8_0 rounds every weight, and where
    the top two tokens are that close, rounding decides which one wins. A flip at a position
    the HF model is sure of is a broken file.
    """
    n, tokens, forced = len(reference), raw["tokens"], raw["forced_tokens"]
    prompt_match = raw["prompt_ids_match"]
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), n))
    tokens_match = tokens == reference
    flips = [i for i in range(n) if forced[i] != reference[i]]
    gaps = gaps_of(forced) if gaps_of and flips else [math.inf] * n
    ties = [{"position": i, "hf_gap": round(gaps[i], 4)} for i in flips if gaps[i] < tie_margin]
    hard = [i for i in flips if gaps[i] >= tie_margin]
    agreement = 1 - len(flips) / n if n else 1.0
    ok = prompt_match and (tokens_match or not hard if exact else True)
    if not prompt_match:
        summary = "llama.cpp tokenizes the prompt differently from the HF tokenizer"
    elif not exact:
        summary = f"{prefix}/{n} leading greedy tokens equal, teacher-forced agreement {agreement:.0%}"
    elif tokens_match:
        summary = f"{n}/{n} greedy tokens equal the HF model's"
    elif not hard:
        where = ", ".join(f"{t['position']} (gap {t['hf_gap']:.2f})" for t in ties)
        summary = (f"greedy tokens equal the HF model's except at near-ties, where its own top two logits "
                   f"are within {tie_margin}: position {where}; {prefix}/{n} leading tokens equal")
    else:
        gap = "" if math.isinf(gaps[hard[0]]) else f", HF logit gap {gaps[hard[0]]:.2f} >= {tie_margin}"
        summary = f"greedy tokens differ from the HF model's at position {hard[0]}{gap}; {prefix}/{n} leading tokens equal"
    return {
        "ok": ok,
        "exact": exact,
        "summary": summary,
        "prompt_ids_match": prompt_match,
        "tokens_match": tokens_match,
        "prefix_match": prefix,
        "agreement": round(agreement, 4),
        "near_ties": ties,
        "tokens": tokens,
        "forced_tokens": forced,
        "text": raw["text"],
        "seconds": raw["seconds"],
    }


def verify_here(request: dict[str, Any]) -> dict[str, Any]:
    """The verification itself, in this process (the worker's side of :func:`verify_gguf`).

    ``request`` holds the file's ``path``, the rendered ``prompt``, the HF tokenizer's
    ``hf_prompt_ids``, the HF model's greedy tokens (``reference``) and ``threads``. Returns
    what llama.cpp did: as many greedy ``tokens`` as the reference has, their ``text``,
    whether the prompt ids match, and its argmax at each position when fed the prompt plus
    the reference tokens (``forced_tokens``).
    """
    path, prompt, hf_prompt_ids, reference, threads = (
        request[k] for k in ("path", "prompt", "hf_prompt_ids", "reference", "threads"))
    n = len(reference)
    import llama_cpp  # verify_gguf checked that it is installed

    start = time.perf_counter()
    with quiet_native_output() as log:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(hf_prompt_ids) + n + 8), n_batch=512,
                                  n_threads=threads or os.cpu_count() or 1, logits_all=True, verbose=False, seed=0,
                                  lora_path=request.get("lora_path"))
        except Exception as exc:  # noqa: BLE001 - llama.cpp reports load failures as ValueError/RuntimeError
            detail = log.read_text(errors="replace")[-2000:]
            raise SftError(f"llama.cpp cannot load {path}: {exc}\n{detail}") from None
    log.unlink(missing_ok=True)
    try:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        prompt_match = list(ids) == list(hf_prompt_ids)
        llm.eval(ids)
        tokens: list[int] = []
        for _ in range(n):
            nxt = _argmax(llm.scores[llm.n_tokens - 1])
            tokens.append(nxt)
            llm.eval([nxt])
        # Teacher forcing on the HF tokens: llama.cpp's choice at each position, independent of earlier flips.
        llm.reset()
        llm.eval(list(hf_prompt_ids) + list(reference[:-1]))
        base = len(hf_prompt_ids) - 1
        forced = [_argmax(llm.scores[base + i]) for i in range(n)]
        text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    finally:
        llm.close()
    return {"prompt_ids_match": prompt_match, "tokens": tokens, "forced_tokens": forced, "text": text,
            "seconds": round(time.perf_counter() - start, 2)}
