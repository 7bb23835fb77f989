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

``exact`` (f16, bf16, q8_0) requires equal prompt ids and equal greedy tokens; otherwise
only the prompt ids must match and the agreement is reported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import SftError
from .gguf_convert import LLAMA_EXTRA_INSTALL, quiet_native_output

__all__ = ["EXACT_QUANTS", "verify_gguf", "verify_here"]

#: Quants whose greedy tokens must equal the HF model's.
EXACT_QUANTS = ("f16", "bf16", "q8_0")


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
) -> dict[str, Any]:
    """Load ``path`` with llama.cpp and compare it with the HF reference; returns the verification record.

    Args:
        path: the GGUF file.
        quant: its quant name (decides ``exact`` when not given).
        prompt: the rendered generation prompt (template text, special tokens as text).
        hf_prompt_ids: the HF tokenizer's ids for ``prompt`` (no special tokens added).
        reference: the merged HF model's greedy tokens after ``hf_prompt_ids``.
        exact: require token equality (default: ``quant in EXACT_QUANTS``).

    The record has ``ok``, ``summary``, the tokens and texts, ``prompt_ids_match``,
    ``tokens_match``, ``prefix_match`` (leading equal tokens) and ``agreement``.
    It runs in a worker process that never imports torch (see :mod:`sft.core.llama_worker`).
    """
    try:
        import llama_cpp  # noqa: F401 - only to say what to install before starting a worker
    except ImportError:
        raise SftError(f"GGUF verification loads the file with llama.cpp: {LLAMA_EXTRA_INSTALL}, "
                       f"or turn verification off with export.verify=false") from None
    from .llama_worker import run_in_worker

    return run_in_worker("verify", {"path": str(path), "quant": quant, "prompt": prompt,
                                    "hf_prompt_ids": list(hf_prompt_ids), "reference": list(reference),
                                    "exact": exact, "threads": threads})


def verify_here(request: dict[str, Any]) -> dict[str, Any]:
    """The verification itself, in this process (the worker's side of :func:`verify_gguf`).

    ``request`` holds :func:`verify_gguf`'s arguments by name.
    """
    path, quant, prompt, exact, threads = (request[k] for k in ("path", "quant", "prompt", "exact", "threads"))
    hf_prompt_ids, reference = request["hf_prompt_ids"], request["reference"]
    import llama_cpp  # verify_gguf checked that it is installed

    exact = quant in EXACT_QUANTS if exact is None else exact
    n = len(reference)
    start = time.perf_counter()
    with quiet_native_output() as log:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(hf_prompt_ids) + n + 8), n_batch=512,
                                  n_threads=threads or os.cpu_count() or 1, logits_all=True, verbose=False, seed=0)
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
        # Teacher forcing on the HF tokens: agreement per position, independent of earlier flips.
        llm.reset()
        forced = list(hf_prompt_ids) + list(reference[:-1])
        llm.eval(forced)
        base = len(hf_prompt_ids) - 1
        agree = sum(_argmax(llm.scores[base + i]) == reference[i] for i in range(n))
        text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    finally:
        llm.close()
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), n))
    tokens_match = tokens == list(reference)
    agreement = agree / n if n else 1.0
    ok = prompt_match and (tokens_match if exact else True)
    if not prompt_match:
        summary = "llama.cpp tokenizes the prompt differently from the HF tokenizer"
    elif exact:
        summary = (f"{n}/{n} greedy tokens equal the HF model's" if tokens_match
                   else f"greedy tokens differ from the HF model's after {prefix}/{n}")
    else:
        summary = f"{prefix}/{n} leading greedy tokens equal, teacher-forced agreement {agreement:.0%}"
    return {
        "ok": ok,
        "exact": exact,
        "summary": summary,
        "prompt_ids_match": prompt_match,
        "tokens_match": tokens_match,
        "prefix_match": prefix,
        "agreement": round(agreement, 4),
        "tokens": tokens,
        "text": text,
        "seconds": round(time.perf_counter() - start, 2),
    }
