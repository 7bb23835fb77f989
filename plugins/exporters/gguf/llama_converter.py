"""llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``): getting them, and running them.

The converters are pure Python, but no wheel ships them: they sit in the llama-cpp-python
source distribution under ``vendor/llama.cpp/`` (with their ``conversion/`` package and their
own ``gguf-py``). ``sft`` does not copy them into its repository. It fetches that sdist once,
pinned to the llama-cpp-python that is installed (so the converter and the quantizer are the
same llama.cpp), and extracts the converter files into the sft cache::

    <sft cache>/llama.cpp/llama_cpp_python-0.3.36.tar.gz      what pip downloaded
    <sft cache>/llama.cpp/llama-cpp-python-0.3.36/            convert_hf_to_gguf.py, conversion/, gguf-py/ ...

``python -m sft.plugins.exporters.gguf.llama_converter fetch`` runs ``pip download --no-deps
--no-binary :all: llama-cpp-python==<version>`` into that folder and extracts it. Without network,
copy the sdist there by hand: it is extracted on first use.

The converter runs in a child process with this project's Python and the vendored ``gguf-py``
first on its ``PYTHONPATH`` (the converter is written against its own gguf-py, which is newer
than the ``gguf`` release this project installs). See :mod:`.llama_converter_main` for the one
thing the child adds to the converter: naming a BPE pre-tokenizer by its split rule when
llama.cpp's hash table does not know the vocabulary.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from sft.core.errors import SftError

__all__ = [
    "LLAMA_CPP_PYTHON_PIN",
    "converter_version",
    "converter_home",
    "find_converter",
    "fetch_converter",
    "fetch_command",
    "converter_problem",
    "supported_architectures",
    "architecture_problem",
    "run_converter",
    "convert_hf_with_llama_cpp",
    "convert_lora_with_llama_cpp",
]

#: The llama-cpp-python the ``llama`` extra pins; used when it is not installed.
LLAMA_CPP_PYTHON_PIN = "0.3.36"
#: Files of ``vendor/llama.cpp/`` the converters need.
_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
#: Run by file path in the child, so the child imports nothing of sft.
_MAIN = Path(__file__).with_name("llama_converter_main.py")


def converter_version() -> str:
    """The llama-cpp-python version whose converter is used: the installed one (the quantizer's), else the pin."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return LLAMA_CPP_PYTHON_PIN


def converter_home() -> Path:
    """``<sft cache>/llama.cpp``: where the sdist is downloaded and the converter extracted."""
    from sft.engine.models import cache_dir

    return cache_dir("llama.cpp")


def _sdist(version: str) -> Path:
    return converter_home() / f"llama_cpp_python-{version}.tar.gz"


def _extracted(version: str) -> Path:
    return converter_home() / f"llama-cpp-python-{version}"


def fetch_command(version: str | None = None) -> str:
    """The one command that fetches the converter."""
    return f"python -m {__name__} fetch"


def _fetch_hint(version: str) -> str:
    return (f"fetch it once with: {fetch_command()} (pip downloads the llama-cpp-python {version} source "
            f"distribution, about 77 MB, into {converter_home()}); without network, copy "
            f"llama_cpp_python-{version}.tar.gz into that folder")


def find_converter(version: str | None = None) -> Path | None:
    """The folder holding llama.cpp's converters for ``version``, extracting a downloaded sdist if needed; None when absent."""
    version = version or converter_version()
    folder = _extracted(version)
    if (folder / "COMPLETE").is_file():
        return folder
    if _sdist(version).is_file():
        return _extract(_sdist(version), folder)
    return None


def _extract(sdist: Path, folder: Path) -> Path:
    from sft.core.rundir import staged_dir

    try:
        with tarfile.open(sdist) as tar, staged_dir(folder) as tmp:
            prefix = None
            for member in tar.getmembers():
                head, sep, rest = member.name.partition("/vendor/llama.cpp/")
                if not sep or not rest.startswith(_MEMBERS) or "/" in head:
                    continue
                prefix = head + sep
                member.name = rest
                tar.extract(member, tmp, filter="data")
            if prefix is None or not (tmp / "convert_hf_to_gguf.py").is_file():
                raise SftError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside; is it the llama-cpp-python sdist?")
            (tmp / "COMPLETE").write_text(json.dumps({"from": sdist.name}))
    except (OSError, tarfile.TarError) as exc:
        raise SftError(f"{sdist}: cannot extract llama.cpp's converter: {exc}") from None
    return folder


def fetch_converter(version: str | None = None) -> Path:
    """Download the llama-cpp-python sdist with pip (once) and extract the converters; returns their folder."""
    version = version or converter_version()
    found = find_converter(version)
    if found is not None:
        return found
    home = converter_home()
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(home)]
    print(f"[sft] {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not _sdist(version).is_file():
        raise SftError(f"pip could not download the llama-cpp-python {version} sdist (exit {proc.returncode}); "
                       f"without network, copy llama_cpp_python-{version}.tar.gz into {home}")
    return _extract(_sdist(version), _extracted(version))


def converter_problem(version: str | None = None) -> str | None:
    """Why llama.cpp's converter cannot run here (not fetched), with the command that fetches it; None when it can."""
    version = version or converter_version()
    try:
        if find_converter(version) is not None:
            return None
    except SftError as exc:
        return str(exc)
    return f"llama.cpp's converter (llama-cpp-python {version}) is not on this machine: {_fetch_hint(version)}"


@lru_cache(maxsize=4)
def supported_architectures(folder: Path) -> frozenset[str]:
    """The HF architectures llama.cpp's converter in ``folder`` converts (its ``TEXT_MODEL_MAP``, read without importing it)."""
    tree = ast.parse((folder / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if getattr(target, "id", None) == "TEXT_MODEL_MAP" and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    raise SftError(f"{folder}/conversion/__init__.py: no TEXT_MODEL_MAP; an unexpected llama.cpp layout")


def architecture_problem(config: dict[str, Any], folder: Path) -> str | None:
    """Why llama.cpp's converter in ``folder`` cannot convert a model with this ``config.json``, or None."""
    archs = list(config.get("architectures") or [])
    if not archs and isinstance(config.get("text_config"), dict):
        archs = list(config["text_config"].get("architectures") or [])
    if not archs:
        return "config.json names no architectures; llama.cpp's converter picks its model class by architecture"
    known = supported_architectures(folder)
    if archs[0] not in known:
        close = sorted(a for a in known if a.lower()[:5] == archs[0].lower()[:5])[:5]
        hint = f" (it knows {', '.join(close)})" if close else ""
        return (f"llama.cpp's converter (llama-cpp-python {converter_version()}) does not convert architecture "
                f"{archs[0]!r}{hint}; export it with lora or merged_16bit")
    if config.get("quantization_config"):
        return "the merged model still carries a quantization_config; GGUF conversion needs 16-bit weights"
    return None


def run_converter(script: str, args: list[str], what: str, timeout: float | None = None) -> str:
    """Run llama.cpp's ``script`` with ``args`` in a child process; returns its log. Raises :class:`SftError` with the log's tail."""
    folder = find_converter()
    if folder is None:
        raise SftError(converter_problem() or "llama.cpp's converter is missing")
    env = dict(os.environ)
    # The vendored gguf-py first: the converter is written against it, not against the gguf release installed here.
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py"), str(folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(_MAIN), str(folder / script), *args]
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SftError(f"llama.cpp's {script} timed out after {timeout}s {what}") from None
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SftError(f"llama.cpp's {script} failed {what} (exit {proc.returncode}):\n{_tail(log)}")
    return log


def _tail(log: str, lines: int = 25) -> str:
    kept = [ln for ln in log.splitlines() if "it/s]" not in ln and ln.strip()]
    return "\n".join(kept[-lines:])


def convert_hf_with_llama_cpp(model_dir: str | Path, out_path: str | Path, quant: str, *, name: str,
                              dry_run: bool = False) -> dict[str, Any]:
    """``convert_hf_to_gguf.py`` on the HF folder ``model_dir`` (weights and tokenizer) into ``out_path``.

    ``quant`` is ``f16``, ``bf16`` or ``q8_0`` (the converter's own ``--outtype``). The file is
    written as ``<out_path>.partial`` and renamed when complete. With ``dry_run`` the converter
    reads the config, plans every tensor and builds the vocabulary, and writes nothing (a preflight).
    """
    start = time.perf_counter()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    args = [str(model_dir), "--outfile", str(partial), "--outtype", quant, "--model-name", name]
    if dry_run:
        log = run_converter("convert_hf_to_gguf.py", args + ["--dry-run"], f"planning the conversion of {model_dir}")
        return {"dry_run": True, "log": _tail(log, 5)}
    try:
        log = run_converter("convert_hf_to_gguf.py", args, f"converting {model_dir} to {quant}")
        if not partial.is_file():
            raise SftError(f"llama.cpp's convert_hf_to_gguf.py wrote no file for {model_dir}:\n{_tail(log)}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"quant": quant, "path": str(out), "bytes": out.stat().st_size, "converter": "llama.cpp",
            "converter_version": converter_version(), "seconds": round(time.perf_counter() - start, 2)}


def convert_lora_with_llama_cpp(adapter_dir: str | Path, base_dir: str | Path, out_path: str | Path,
                                outtype: str = "f16") -> dict[str, Any]:
    """``convert_lora_to_gguf.py``: the PEFT adapter in ``adapter_dir`` (on the HF base ``base_dir``) as a GGUF LoRA adapter."""
    start = time.perf_counter()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        log = run_converter("convert_lora_to_gguf.py",
                            [str(adapter_dir), "--base", str(base_dir), "--outfile", str(partial), "--outtype", outtype],
                            f"converting the adapter {adapter_dir}")
        if not partial.is_file():
            raise SftError(f"llama.cpp's convert_lora_to_gguf.py wrote no file for {adapter_dir}:\n{_tail(log)}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": str(out), "bytes": out.stat().st_size, "outtype": outtype,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str]) -> int:
    if argv[:1] != ["fetch"]:
        print(f"usage: python -m {__name__} fetch   (downloads llama.cpp's converter into {converter_home()})",
              file=sys.stderr)
        return 2
    try:
        folder = fetch_converter()
    except SftError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"llama.cpp's converter (llama-cpp-python {converter_version()}) is in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
