"""llama.cpp work (K-quant quantization, GGUF verification) in a fresh Python process.

Why not in the exporting process: by then torch has run the merge and the reference model,
and its OpenMP threads busy-wait next to ggml's own thread pool. On a 2-core machine one
GGUF verification took 6 to 13 s there against 0.5 s in a process that never imported torch.
A separate process also keeps a crash in native code to one export instead of the run, and
its logs (a line per tensor from the quantizer) out of the console.

Parent side: :func:`run_in_worker`. Child side: ``python -m sft.plugins.exporters.gguf.worker
TASK REQUEST.json RESULT.json``, which imports llama_cpp but never torch. A task is named
``"module:function"`` and imported by the child, so this module imports none of its callers.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from sft.core.errors import SftError

__all__ = ["run_in_worker"]

WORKER_MODULE = "sft.plugins.exporters.gguf.worker"


def run_in_worker(task: str, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``task`` (``"module:function"``) on ``request`` in a child process and return its result.

    Raises :class:`SftError` with the task's own message, or with the tail of the child's
    output when it died (a crash in llama.cpp, a timeout).
    """
    with tempfile.TemporaryDirectory(prefix="sft-llama-") as tmp:
        req, res, log = Path(tmp) / "request.json", Path(tmp) / "result.json", Path(tmp) / "output.log"
        req.write_text(json.dumps(request))
        with log.open("w") as out:
            try:
                proc = subprocess.run([sys.executable, "-m", WORKER_MODULE, task, str(req), str(res)],
                                      stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
                code: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                code = f"timeout after {timeout}s"
        reply = json.loads(res.read_text()) if res.is_file() else None
        if reply is None or code != 0:
            tail = log.read_text(errors="replace")[-2000:]
            detail = reply.get("error") if reply else None
            raise SftError(detail or f"llama.cpp {task} stopped ({_exit_reason(code)}):\n{tail}")
        if "error" in reply:
            raise SftError(reply["error"])
        return reply["result"]


def _exit_reason(code: int | str) -> str:
    """A child's exit status in words; an illegal instruction says what to rebuild."""
    if code == -signal.SIGILL:
        from .llama_converter import LLAMA_CPP_PYTHON_PIN

        return ("SIGILL: llama-cpp-python was built for CPU instructions this machine refuses; rebuild it for AVX2: "
                'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON '
                '-DGGML_F16C=ON -DGGML_BMI2=ON" pip install --no-cache-dir --force-reinstall --no-deps '
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_PIN} (docs/gguf-and-ollama.md)")
    if isinstance(code, int) and code < 0:
        return f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
    return str(code)


def main(argv: list[str]) -> int:
    task, request_path, result_path = argv
    try:
        module, _, function = task.partition(":")
        run: Callable[[dict[str, Any]], dict[str, Any]] = getattr(importlib.import_module(module), function)
        reply: dict[str, Any] = {"result": run(json.loads(Path(request_path).read_text()))}
    except SftError as exc:
        reply = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent with its traceback
        reply = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}"}
    Path(result_path).write_text(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
