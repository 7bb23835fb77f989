"""llama.cpp through llama-cpp-python: is it installed, its quantizer, and quieting its native logs.

llama-cpp-python is the optional ``llama`` extra. Nothing here imports it at module level:
:func:`llama_cpp_available` checks without importing, and the quantizer itself runs in the
torch-free worker process (:mod:`.worker`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from sft.core.errors import SftError

from .quants import LLAMA_CPP_QUANTS
from .worker import run_in_worker

__all__ = ["LLAMA_EXTRA_INSTALL", "llama_cpp_available", "quiet_native_output", "quantize_with_llama_cpp"]

#: The worker task that runs :func:`quantize_here` in a torch-free process.
QUANTIZE_TASK = f"{__name__}:quantize_here"

LLAMA_EXTRA_INSTALL = "pip install 'sft-forge[llama]' (llama-cpp-python==0.3.36; it builds llama.cpp from source once, about 10 minutes on 2 cores)"


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is importable (without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def quiet_native_output() -> Iterator[Path]:
    """Send llama.cpp's logs to a temporary file; yields its path.

    llama.cpp writes from C (file descriptors 1 and 2) and, through llama-cpp-python's log
    callback, to Python's ``sys.stderr``; both are redirected.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    fd, log = tempfile.mkstemp(prefix="sft-llama-", suffix=".log")
    saved = os.dup(1), os.dup(2)
    saved_py = sys.stdout, sys.stderr
    text = open(fd, "w", buffering=1)  # owns fd
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = text
        yield Path(log)
    finally:
        sys.stdout, sys.stderr = saved_py
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        text.close()


# -- llama.cpp quantizer ------------------------------------------------------------------------
def quantize_with_llama_cpp(src: str | Path, dst: str | Path, quant: str, threads: int | None = None) -> dict[str, Any]:
    """Quantize the F16 GGUF ``src`` to ``dst`` with llama.cpp's ``llama_model_quantize``, in a worker process.

    Raises :class:`SftError` naming what to install when llama-cpp-python is missing.
    Returns the quant, path, size, wall and CPU seconds and how many tensors fell back to
    another type (rows not a multiple of the K-quant block).
    """
    if quant not in LLAMA_CPP_QUANTS:
        raise SftError(f"quant '{quant}' is not made by llama.cpp's quantizer; use one of {', '.join(LLAMA_CPP_QUANTS)}")
    if not llama_cpp_available():
        raise SftError(f"the {quant} quant needs llama.cpp's quantizer: {LLAMA_EXTRA_INSTALL}")
    start = time.perf_counter()
    result = run_in_worker(QUANTIZE_TASK, {"src": str(src), "dst": str(dst), "quant": quant, "threads": threads})
    return {**result, "seconds": round(time.perf_counter() - start, 2)}


def quantize_here(request: dict[str, Any]) -> dict[str, Any]:
    """The quantization itself, in this process (the worker's side of :func:`quantize_with_llama_cpp`).

    ``request`` holds ``src``, ``dst``, ``quant`` and ``threads``.
    """
    src, dst, quant, threads = (request[k] for k in ("src", "dst", "quant", "threads"))
    import ctypes

    import llama_cpp

    cpu = time.process_time()
    out = Path(dst)
    partial = out.with_name(out.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_QUANTS[quant])
    params.nthread = threads or os.cpu_count() or 1
    # llama.cpp prints a line per tensor (and per fallback); keep it for the fallback count
    # and for the error message.
    with quiet_native_output() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    output = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise SftError(f"llama.cpp's quantizer failed ({rc}) making {quant} from {src}:\n{output[-2000:]}")
    os.replace(partial, out)
    return {"quant": quant, "path": str(out), "bytes": out.stat().st_size,
            "cpu_seconds": round(time.process_time() - cpu, 2), "fallback_tensors": output.count("falling back to")}
