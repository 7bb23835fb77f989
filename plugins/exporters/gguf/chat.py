"""Talking to an exported GGUF through llama.cpp: ``sft chat RUN --gguf``, ``sft generate RUN PROMPT --gguf``.

The user tries what they will ship: the GGUF file, rendered with the chat template stored in
it (the one training used; the export verified they agree) and decoded by llama.cpp. Each
answer runs in the torch-free worker process (:mod:`.worker`) like the quantizer and the
verification: llama.cpp's threads then have the cores to themselves. The worker loads the
file for every answer; for the models one tries on a laptop that is a second or two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from sft.core.errors import SftError

from sft.engine.model_files import read_gguf_header

from .llama import LLAMA_EXTRA_INSTALL, llama_cpp_available, quiet_native_output
from .worker import run_in_worker

__all__ = ["answer_with_gguf", "chat_here"]

CHAT_TASK = f"{__name__}:chat_here"


def pick_gguf(paths: Sequence[str]) -> Path:
    """The GGUF file among an export's paths (the first quant written), or an error saying what is there."""
    ggufs = [Path(p) for p in paths if str(p).endswith(".gguf")]
    if not ggufs:
        raise SftError(f"no .gguf file among the export's paths ({', '.join(map(str, paths)) or 'none'})")
    missing = [p for p in ggufs if not p.is_file()]
    if missing:
        raise SftError(f"{missing[0]}: missing; run the export again (sft export RUN --exporter gguf)")
    return ggufs[0]


def answer_with_gguf(paths: Sequence[str], messages: Sequence[Mapping[str, str]], settings: Mapping[str, Any]) -> str:
    """The next assistant turn for ``messages`` (``{"role", "content"}`` dicts) from the GGUF among ``paths``."""
    path = pick_gguf(paths)
    read_gguf_header(path)  # a crafted header: one line here, not llama.cpp's parser in the worker
    if not llama_cpp_available():
        raise SftError(f"talking to a GGUF needs llama.cpp: {LLAMA_EXTRA_INSTALL}")
    reply = run_in_worker(CHAT_TASK, {"path": str(path), "messages": list(map(dict, messages)), **settings})
    return reply["text"]


def chat_here(request: dict[str, Any]) -> dict[str, Any]:
    """The worker's side of :func:`answer_with_gguf`: llama.cpp renders the GGUF's own chat template."""
    import llama_cpp

    temperature = float(request.get("temperature") or 0.0)
    with quiet_native_output():
        llm = llama_cpp.Llama(request["path"], n_ctx=int(request.get("n_ctx") or 2048), verbose=False,
                              seed=int(request["seed"]) if request.get("seed") is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        out = llm.create_chat_completion(
            messages=request["messages"],
            max_tokens=int(request.get("max_new_tokens") or 128),
            # temperature 0 is greedy in llama.cpp's sampler chain, as in sft generate.
            temperature=temperature,
            top_p=float(request.get("top_p") or 1.0) if temperature > 0 else 1.0,
            top_k=0 if temperature > 0 else 1,
        )
    return {"text": (out["choices"][0]["message"]["content"] or "").strip()}
