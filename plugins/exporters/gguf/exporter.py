"""The ``gguf`` exporter: GGUF files for llama.cpp and Ollama, converted offline and verified.

From the merged 16-bit HF model (the one ``merged_16bit`` wrote, or a temporary merge):

- ``f16``, ``bf16``, ``q8_0`` are written in pure Python (:mod:`.convert`);
- ``q2_k``, ``q3_k_m``, ``q4_k_m``, ``q5_k_m``, ``q6_k`` come from llama.cpp's quantizer
  (llama-cpp-python) applied to one F16 intermediate, shared by all of them;
- next to each ``<name>-<QUANT>.gguf`` goes ``<name>-<QUANT>.Modelfile`` for Ollama, whose
  TEMPLATE and stop lines come from the run's chat-template plugin;
- with ``export.verify`` (default) each file is loaded in llama.cpp and its greedy tokens
  compared with the merged HF model's (:mod:`.verify`). Without llama-cpp-python
  and with ``export.verify`` unset, the files are written and marked unverified (in the
  export's line, and ``verify.skipped`` in summary.json); ``export.verify=true`` makes that an error.

A quant that fails is reported and the others still get written; files appear only when
complete (``.partial`` then rename).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from sft.core import hookimpl
from sft.core.config import opt
from sft.core.errors import SftError
from sft.core.interfaces import ExportContext, EvalModel, ExportResult, Exporter, HubCard

from ..merging import merging_for

from . import llama_converter
from .convert import architecture_problem, convert_to_gguf, detect_pre_tokenizer, tokenizer_problem
from .header import gguf_tensor_types
from .llama import LLAMA_EXTRA_INSTALL, llama_cpp_available, quantize_with_llama_cpp
from .modelfile import modelfile_text
from .quants import ALL_QUANTS, LLAMA_CPP_QUANTS, PYTHON_QUANTS, quant_bits
from .verify import DEFAULT_TIE_MARGIN, verify_gguf

__all__ = ["GgufOptions", "GgufExporter", "hub_usage", "register_exporters", "CONVERTERS"]

CONVERTERS = ("auto", "python", "llama.cpp")


@dataclass
class GgufOptions:
    quants: List[str] = opt(["q8_0"], "GGUF quant types to write. f16, bf16, q8_0 need nothing else; the K-quants need llama-cpp-python (pip install 'sft-forge[llama]').", ALL_QUANTS)
    name: Optional[str] = opt(None, "File-name stem of the GGUF and Modelfile (default: the run name); a name, not a path.", name=True)
    modelfile: bool = opt(True, "Write an Ollama Modelfile next to each GGUF.")
    verify_prompt: Optional[str] = opt(None, "User message whose answer verification compares (default: training.generation_prompt, else the run's quick-generation prompt, else a fixed question).")
    tie_margin: float = opt(DEFAULT_TIE_MARGIN, "For f16, bf16 and q8_0: a token where llama.cpp picks another than the HF model passes only when the HF model's own logits for the two differ by less than this (nats), a near-tie that rounding decides.", ge=0)
    verify_tokens: int = opt(16, "Greedy tokens compared between llama.cpp and the merged HF model (at most: the comparison ends with the template's stop token, where generation ends).", ge=1)
    converter: str = opt("auto", "What writes f16, bf16 and q8_0: python (sft's own converter, Llama with a byte-level BPE vocabulary only, needs nothing), llama.cpp (llama.cpp's convert_hf_to_gguf.py, every architecture it converts; fetched once into the sft cache), auto (python where it can, else llama.cpp).", CONVERTERS)
    adapter: bool = opt(False, "Also write the LoRA adapter as a GGUF with llama.cpp's convert_lora_to_gguf.py (<name>-LoRA-F16.gguf, for llama.cpp --lora with the F16 base GGUF, or Ollama's ADAPTER); needs llama.cpp's converter.")


class GgufExporter(Exporter):
    name = "gguf"
    version = "1"
    description = "GGUF for llama.cpp/Ollama (f16, bf16, q8_0 in Python; K-quants via llama.cpp), with Modelfile and verification"
    options = GgufOptions
    hub_suffix = "-GGUF"  # where Unsloth users look for quants

    def hub_card(self, context: ExportContext, result: ExportResult, repo_id: str, user: str) -> HubCard:
        return HubCard(library_name="gguf", tags=["gguf", "llama.cpp", "ollama"], metadata={"quantized_by": user},
                       usage=hub_usage(repo_id, [Path(p).name for p in result.paths if p.endswith(".gguf")]))

    def eval_models(self, context: ExportContext) -> list[EvalModel]:
        from .evaluate import eval_models

        return eval_models(context.run_dir.export_dir(self.name), self.name)

    def answer(self, paths, messages, settings):
        from .chat import answer_with_gguf

        return answer_with_gguf(paths, messages, settings)

    def preflight(self, context: ExportContext, options: GgufOptions | None = None) -> list[str]:
        options = options or GgufOptions()
        merging = merging_for(context)
        problems = merging.merge_problems()
        if not options.quants:
            problems.append("export.gguf.quants is empty; name at least one of " + ", ".join(ALL_QUANTS))
        if options.tie_margin < 0:
            problems.append(f"export.gguf.tie_margin must be 0 or more, got {options.tie_margin}")
        if options.verify_tokens < 1:
            problems.append(f"export.gguf.verify_tokens must be at least 1, got {options.verify_tokens}")
        converter, why_python = self._choose_converter(context, options)
        if converter == "python" and why_python:
            problems.append(why_python)
        elif converter == "llama.cpp" and not problems:
            problems += self._llama_cpp_problems(context)
        if options.adapter and not context.is_full_model and converter == "python":
            problems += [p for p in [llama_converter.converter_problem()] if p]
        k_quants = [q for q in options.quants if q in LLAMA_CPP_QUANTS]
        if k_quants and not llama_cpp_available():
            problems.append(f"{', '.join(k_quants)} need llama.cpp's quantizer: {LLAMA_EXTRA_INSTALL}; "
                            f"or keep to {', '.join(PYTHON_QUANTS)}")
        if context.config.export.verify is True and not llama_cpp_available():
            problems.append(f"export.verify=true: GGUF verification loads each file in llama.cpp: "
                            f"{LLAMA_EXTRA_INSTALL}, or leave export.verify unset to write unverified files")
        params = context.parameter_count()
        expected = sum(params * quant_bits(q) / 8 for q in options.quants)
        if k_quants and "f16" not in options.quants:
            expected += params * 2  # the F16 intermediate
        if not merging.has_merged():
            expected += merging.merged_bytes()  # the temporary merge
        if (disk := context.disk_problem(int(expected), f"the gguf export ({', '.join(options.quants)})")):
            problems.append(disk)
        return problems

    def _choose_converter(self, context: ExportContext, options: GgufOptions) -> tuple[str, str | None]:
        """``(converter, why the python converter cannot do this model or None)``; auto picks python where it can."""
        why = architecture_problem(context.base_config())
        if why is None and context.tokenizer_dir.is_dir():
            # A base model not on disk yet (before training) has its tokenizer checked by training.
            why = tokenizer_problem(context.tokenizer_dir)
            if why is None:
                try:
                    detect_pre_tokenizer(context.tokenizer, context.tokenizer_dir)
                except SftError as exc:
                    why = str(exc)
        if why and options.converter == "python":
            why += "; or set export.gguf.converter=llama.cpp (llama.cpp's converter handles every architecture it knows)"
        if options.converter == "auto":
            return ("python" if why is None else "llama.cpp"), why
        return options.converter, why

    def _llama_cpp_problems(self, context: ExportContext) -> list[str]:
        """Why llama.cpp's converter cannot convert this model: not fetched, an unknown architecture, or, before
        training, whatever its dry run on the base model (hyperparameters, rope, tensors, vocabulary) refuses."""
        missing = llama_converter.converter_problem()
        if missing:
            return [missing]
        folder = llama_converter.find_converter()
        arch = llama_converter.architecture_problem(context.base_config(), folder)
        if arch:
            return [arch]
        base = context.base_local_dir()
        if not context.before_training or base is None or context.config.model.gguf_file:
            return []  # after training the conversion itself reports what it cannot do
        return context.shared("gguf.llama_cpp_dry_run", lambda: self._dry_run(context, base))

    @staticmethod
    def _dry_run(context: ExportContext, base: Path) -> list[str]:
        try:
            with tempfile.TemporaryDirectory(prefix="sft-gguf-dry-") as tmp:  # a dry run writes nothing
                llama_converter.convert_hf_with_llama_cpp(base, Path(tmp) / "dry-run.gguf", "f16",
                                                          name=context.name, dry_run=True)
        except SftError as exc:
            # The converter's last line is its reason (the exception it raised); the traceback above it is noise here.
            reason = str(exc).strip().splitlines()[-1]
            return [f"llama.cpp's converter cannot convert {context.config.model.name} (its dry run failed): {reason}"]
        return []

    def export(self, context: ExportContext, options: GgufOptions | None = None) -> ExportResult:
        options = options or GgufOptions()
        start = time.perf_counter()
        out_dir = context.output_dir(self.name)
        stem = options.name or context.name
        merging = merging_for(context)
        merged = merging.merged_model_dir()
        quants = list(dict.fromkeys(options.quants))
        files: dict[str, Path] = {q: out_dir / f"{stem}-{q.upper()}.gguf" for q in quants}
        per_quant: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}

        converter, _ = self._choose_converter(context, options)
        if converter == "python":
            convert_args = dict(tokenizer=context.tokenizer, tokenizer_dir=context.tokenizer_dir,
                                chat_template=context.template.jinja(context.tokenizer),
                                eot_token=context.eot_token, name=stem)

            def convert(quant: str, target: Path) -> dict[str, Any]:
                return convert_to_gguf(merged, target, quant, **convert_args)
        else:
            # The merged folder carries the run's tokenizer (template chat_template, EOT as eos).
            source = _llama_cpp_input(context, merged, context.tmp_dir / "llama-cpp-input")

            def convert(quant: str, target: Path) -> dict[str, Any]:
                return llama_converter.convert_hf_with_llama_cpp(source, target, quant, name=stem)
        # One F16 file feeds every K-quant: the requested f16 output when there is one,
        # else a temporary file.
        f16_source: Path | None = None
        if "f16" in quants or any(q in LLAMA_CPP_QUANTS for q in quants):
            target = files.get("f16") or context.tmp_dir / f"{stem}-F16-intermediate.gguf"
            try:
                info = convert("f16", target)
                f16_source = target
                if "f16" in files:
                    per_quant["f16"] = info
            except SftError as exc:
                errors["f16 (intermediate)" if "f16" not in files else "f16"] = str(exc)
        for quant in quants:
            if quant == "f16":
                continue
            try:
                if quant in PYTHON_QUANTS:
                    per_quant[quant] = convert(quant, files[quant])
                elif f16_source is None:
                    errors[quant] = "no F16 intermediate to quantize from (its conversion failed)"
                else:
                    per_quant[quant] = quantize_with_llama_cpp(f16_source, files[quant], quant)
            except SftError as exc:
                errors[quant] = str(exc)
        adapter: dict[str, Any] = {}
        if options.adapter and not context.is_full_model:
            try:
                adapter = self._export_adapter(context, out_dir, stem)
            except SftError as exc:
                errors["adapter"] = str(exc)
        for quant, info in per_quant.items():
            info["tensor_types"] = dict(Counter(gguf_tensor_types(files[quant]).values()))
            if options.modelfile:
                modelfile = files[quant].with_suffix(".Modelfile")
                _write_text(modelfile, modelfile_text(files[quant].name, context.template, context.tokenizer))
                info["modelfile"] = str(modelfile)

        verify: dict[str, Any] = {}
        if context.verifying and per_quant and not llama_cpp_available():
            # Only with export.verify unset (true is refused in preflight): the pure-Python quants
            # are still useful, but nobody may mistake them for checked ones.
            # The summary is the export's one line (engine/export.py prints it once, after the export).
            verify = {"skipped": True, "summary": f"the files are NOT verified: llama-cpp-python is not installed ({LLAMA_EXTRA_INSTALL})"}
        elif context.verifying and per_quant:
            verify = self._verify(context, options, files, per_quant, errors)
        if adapter and context.verifying and llama_cpp_available():
            self._verify_adapter(context, options, adapter, errors)
        paths = [info["path"] for info in per_quant.values()]
        paths += [adapter[k] for k in ("base", "path") if k in adapter]
        paths += [info["modelfile"] for info in per_quant.values() if "modelfile" in info]
        details: dict[str, Any] = {
            "quants": per_quant,
            "merged_from": str(merged),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if verify:
            details["verify"] = verify
        if adapter:
            details["adapter"] = adapter
        if errors:
            details["errors"] = errors
            return ExportResult(self.name, ok=False, paths=paths, details=details,
                                error="; ".join(f"{q}: {e}" for q, e in errors.items()))
        return ExportResult(self.name, ok=True, paths=paths, details=details)

    def _verify(self, context: ExportContext, options: GgufOptions, files: dict[str, Path],
                per_quant: dict[str, dict[str, Any]], errors: dict[str, str]) -> dict[str, Any]:
        prompt = context.verify_prompt(options.verify_prompt)
        prompt_ids = context.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        merging = merging_for(context)
        reference = merging.reference_greedy(prompt_ids, options.verify_tokens)
        lines = []
        for quant, info in per_quant.items():
            try:
                record = verify_gguf(files[quant], quant, prompt, prompt_ids, reference, threads=os.cpu_count(),
                                     gaps_of=lambda forced: merging.reference_gaps(prompt_ids, options.verify_tokens, forced),
                                     tie_margin=options.tie_margin)
            except SftError as exc:
                errors[quant] = f"verification: {exc}"
                continue
            info["verify"] = record
            lines.append(f"{quant}: {record['summary']}")
            if not record["ok"]:
                errors[quant] = f"verification failed: {record['summary']}"
        return {"prompt": prompt, "reference": reference, "reference_text": context.tokenizer.decode(reference),
                "summary": "; ".join(lines)}


    def _export_adapter(self, context: ExportContext, out_dir: Path, stem: str) -> dict[str, Any]:
        """The LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py) and the F16 base GGUF it applies to.

        The base GGUF is the base model's weights with the run's tokenizer (template chat_template,
        EOT as eos), converted by llama.cpp's converter so its tensor names are the adapter's.
        """
        from ..merging import adapter_beyond_lora, adapter_embedding_rows

        base = context.base_local_dir()
        if base is None or context.config.model.gguf_file:
            raise SftError("export.gguf.adapter: the base model's safetensors are not on disk")
        if adapter_embedding_rows(context.adapter_dir):
            raise SftError("export.gguf.adapter: training added tokens to the vocabulary, so the adapter carries "
                           "resized embeddings that a GGUF LoRA cannot apply to the base GGUF; use the merged GGUF")
        beyond = adapter_beyond_lora(context.adapter_dir)
        if beyond:
            raise SftError(f"export.gguf.adapter: the adapter holds {'; '.join(beyond)}, which a llama.cpp LoRA "
                           f"GGUF does not carry; use the merged GGUF")
        staged = _llama_cpp_input(context, base, context.tmp_dir / "adapter-base", weights_only=True)
        base_gguf = out_dir / f"{stem}-base-F16.gguf"
        lora_gguf = out_dir / f"{stem}-LoRA-F16.gguf"
        base_info = llama_converter.convert_hf_with_llama_cpp(staged, base_gguf, "f16", name=f"{stem}-base")
        lora_info = llama_converter.convert_lora_with_llama_cpp(context.adapter_dir, staged, lora_gguf, "f16")
        return {"base": base_info["path"], "path": lora_info["path"], "bytes": lora_info["bytes"],
                "seconds": round(base_info["seconds"] + lora_info["seconds"], 2)}

    def _verify_adapter(self, context: ExportContext, options: GgufOptions, adapter: dict[str, Any],
                        errors: dict[str, str]) -> None:
        """llama.cpp with the base GGUF + the LoRA GGUF must give the merged HF model's greedy tokens (as the merged f16 does)."""
        prompt = context.verify_prompt(options.verify_prompt)
        prompt_ids = context.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        merging = merging_for(context)
        reference = merging.reference_greedy(prompt_ids, options.verify_tokens)
        try:
            record = verify_gguf(adapter["base"], "f16", prompt, prompt_ids, reference, threads=os.cpu_count(),
                                 gaps_of=lambda forced: merging.reference_gaps(prompt_ids, options.verify_tokens, forced),
                                 tie_margin=options.tie_margin, lora_path=adapter["path"])
        except SftError as exc:
            errors["adapter"] = f"verification: {exc}"
            return
        adapter["verify"] = record
        if not record["ok"]:
            errors["adapter"] = f"verification of base + LoRA failed: {record['summary']}"


def hub_usage(repo_id: str, gguf_files: list[str]) -> str:
    """The model card's llama.cpp and Ollama instructions for a repo holding ``gguf_files``."""
    quants = [name.rsplit("-", 1)[-1][: -len(".gguf")] for name in gguf_files]
    first, quant = (gguf_files[0], quants[0]) if gguf_files else ("model-Q8_0.gguf", "Q8_0")
    stem = Path(first).stem
    lines = ["| file | quant |", "|---|---|"] + [f"| `{f}` | {q} |" for f, q in zip(gguf_files, quants)]
    lines += ["", "**llama.cpp** downloads the file itself (pick the quant after the colon):", "", "```bash",
              f"llama-cli -hf {repo_id}:{quant}", f"llama-server -hf {repo_id}:{quant}", "```", "",
              "**Ollama**, straight from the Hub (it reads the chat template from the GGUF):", "", "```bash",
              f"ollama run hf.co/{repo_id}:{quant}", "```", "",
              "or with the Modelfile next to each GGUF, which holds the exact template and stop tokens of training:",
              "", "```bash", f"hf download {repo_id} {first} {stem}.Modelfile --local-dir .",
              f"ollama create {stem.lower()} -f {stem}.Modelfile", f"ollama run {stem.lower()}", "```"]
    return "\n".join(lines)


#: SentencePiece model files: llama.cpp's converter reads them, transformers 5 no longer saves them.
_SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")


def _llama_cpp_input(context: ExportContext, model_dir: Path, dest: Path, weights_only: bool = False) -> Path:
    """``dest``: a folder of links to ``model_dir``'s files, as llama.cpp's converter wants its input.

    A SentencePiece family's ``tokenizer.model`` comes from the base model when ``model_dir`` has
    none: transformers 5 saves only ``tokenizer.json``, and llama.cpp's converter reads the
    SentencePiece model (scores and piece types) from ``tokenizer.model``. With ``weights_only``
    only config and weights are linked and the run's tokenizer is saved beside them.
    """
    from sft.core.rundir import remove_inside

    remove_inside(context.run_dir.root, dest)
    dest.mkdir(parents=True)
    for f in model_dir.iterdir():
        weights = f.name == "config.json" or f.name.startswith("model") and f.suffix in (".safetensors", ".json")
        if f.is_file() and (weights or not weights_only):
            (dest / f.name).symlink_to(f.resolve())
    if weights_only:
        context.save_tokenizer(dest)
    base = context.base_local_dir()
    for name in _SENTENCEPIECE_FILES:
        if not (dest / name).exists() and base is not None and (base / name).is_file():
            (dest / name).symlink_to((base / name).resolve())
    _restore_added_tokens_decoder(dest)
    return dest


def _restore_added_tokens_decoder(folder: Path) -> None:
    """Put ``added_tokens_decoder`` back into ``tokenizer_config.json``, as transformers 4 wrote it.

    llama.cpp's converter (written against transformers 4.57) learns which added tokens are
    special (control tokens, matched whole in text) from that key; transformers 5 keeps them
    only in ``tokenizer.json``. Without it a SentencePiece family's ``[INST]`` or
    ``<end_of_turn>`` would become ordinary pieces that llama.cpp spells out letter by letter.
    """
    import json

    config_path, tokenizer_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not config_path.is_file() or not tokenizer_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    added = json.loads(tokenizer_path.read_text(encoding="utf-8")).get("added_tokens") or []
    if config.get("added_tokens_decoder") or not added:
        return
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special") if k in t}
        for t in added}
    config_path.unlink()  # a link to the source folder's file: write a copy, never through the link
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _write_text(path: Path, text: str) -> None:
    from sft.core.rundir import atomic_write_text

    atomic_write_text(path, text)
    path.chmod(0o644)  # mkstemp made it private; a Modelfile is meant to be shared


@hookimpl
def register_exporters(register):
    register(GgufExporter())
