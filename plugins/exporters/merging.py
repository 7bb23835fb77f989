"""What the exporters that need merged weights share: the merge itself, and the HF reference it is checked against.

``merged_16bit`` and ``gguf`` (and a third-party exporter that wants merged weights) get one
:class:`Merging` per export run through :func:`merging_for`, so the base model is merged
once: ``gguf`` reuses the folder ``merged_16bit`` wrote (even in an earlier ``sft export``,
found by the adapter's fingerprint in :data:`MERGED_MARKER`), or merges into the context's
temporary folder. The merged folder loaded with plain transformers in float32 is the
reference every export is verified against (:meth:`Merging.reference_greedy`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sft.core.errors import SftError
from sft.engine.models import forget_gguf_quantization, pretrained_kwargs
from sft.core.rundir import file_sha256, staged_dir, swap_in

if TYPE_CHECKING:
    from sft.core.interfaces import ExportContext

__all__ = ["MERGED_MARKER", "Merging", "merging_for", "adapter_embedding_rows", "adapter_beyond_lora"]

#: A merged 16-bit HF folder carries this file: which adapter and dtype it was merged from.
MERGED_MARKER = ".sft-merged.json"
#: Models up to this size (float32 bytes) stay loaded between verifications of one export run.
KEEP_MODEL_BYTES = 2_000_000_000


def merging_for(context: "ExportContext") -> "Merging":
    """The export run's one :class:`Merging`."""
    return context.shared("merging", lambda: Merging(context))


def adapter_embedding_rows(adapter_dir: Path) -> int | None:
    """Rows of the embedding the adapter saved (it does when training added tokens), else None."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    for key, info in header.items():
        if "embed_tokens" in key and key.endswith("weight") and "lora_" not in key:
            return int(info["shape"][0])
    return None


def adapter_beyond_lora(adapter_dir: Path) -> list[str]:
    """What an adapter holds besides plain LoRA matrices, which LoRA loaders of inference servers
    (vLLM, llama.cpp's LoRA GGUF) do not take: DoRA's magnitudes, whole modules
    (``modules_to_save``), trainable token rows, a resized embedding. Empty for a plain adapter."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    found = []
    if config.get("use_dora"):
        found.append("DoRA magnitude vectors (lora.use_dora)")
    if config.get("modules_to_save"):
        found.append(f"whole modules {', '.join(config['modules_to_save'])} (lora.modules_to_save)")
    if config.get("trainable_token_indices"):
        found.append(f"trained rows of {', '.join(config['trainable_token_indices'])} (added tokens)")
    elif adapter_embedding_rows(adapter_dir) and not config.get("modules_to_save"):
        found.append("a resized embedding (added tokens)")
    return found


class Merging:
    """Base + adapter merged into 16-bit weights, built once and shared by an export run's exporters."""

    def __init__(self, context: "ExportContext") -> None:
        self.context = context
        self._cache: dict[str, Any] = {}

    def merged_bytes(self) -> int:
        """Expected size of a merged 16-bit model."""
        return 2 * self.context.parameter_count()

    def adapter_fingerprint(self) -> str:
        """sha256 of the adapter weights and config: identifies what a merged folder was merged from."""
        if "fingerprint" not in self._cache:
            h = hashlib.sha256()
            files = sorted(self.context.adapter_dir.glob("*.safetensors")) + sorted(self.context.adapter_dir.glob("*config.json"))
            for f in files:
                h.update(f.name.encode())
                h.update(file_sha256(f).encode())
            self._cache["fingerprint"] = h.hexdigest()
        return self._cache["fingerprint"]

    def resolve_merge_dtype(self, dtype: str = "auto") -> str:
        """``auto`` is the base's own 16-bit dtype, else bfloat16."""
        if dtype != "auto":
            return dtype
        stored = str(self.context.base_config().get("dtype") or self.context.base_config().get("torch_dtype") or "")
        return stored if stored in ("bfloat16", "float16") else "bfloat16"

    def merge_problems(self) -> list[str]:
        """Why a merged 16-bit model cannot be built here (checked in preflight)."""
        problems = self.context.tokenizer_problems() + self.context.adapter_problems()
        if self.context.is_full_model:
            return problems
        quant = self.context.base_config().get("quantization_config")
        if quant and not self.context.env.cuda:
            problems.append(f"the base model '{self.context.config.model.name}' is stored quantized "
                            f"({quant.get('quant_method', 'unknown method')}); merging needs its weights "
                            f"dequantized to 16-bit, which bitsandbytes does only on CUDA")
        return problems

    def _find_merged(self, dtype: str | None) -> Path | None:
        cached = self._cache.get("merged_dir")
        if cached is not None and Path(cached).is_dir():
            if dtype is None or json.loads((Path(cached) / MERGED_MARKER).read_text())["dtype"] == dtype:
                return Path(cached)
        exports = self.context.run_dir.root / "exports"
        for marker in (sorted(exports.glob(f"*/{MERGED_MARKER}")) if exports.is_dir() else []):
            info = json.loads(marker.read_text())
            if info.get("adapter") == self.adapter_fingerprint() and (dtype is None or info.get("dtype") == dtype):
                return marker.parent
        return None

    def has_merged(self) -> bool:
        """Whether a merged folder for this adapter already exists (so a merge costs no disk)."""
        return self._find_merged(None) is not None

    def merged_model_dir(self, dtype: str | None = None) -> Path:
        """A merged 16-bit HF folder for this run's adapter, built once and shared.

        Reuses any export folder whose marker matches the adapter (what ``merged_16bit``
        wrote, even in an earlier ``sft export``); else merges into the context's temporary
        folder. ``dtype`` None accepts any 16-bit dtype already merged, else ``auto``.
        """
        found = self._find_merged(dtype)
        if found is not None:
            self._cache["merged_dir"] = found
            return found
        resolved = self.resolve_merge_dtype(dtype or "auto")
        out = self.context.tmp_dir / f"merged-{resolved}"
        self.write_merged(out, resolved)
        self._cache["merged_dir"] = out
        return out

    def adopt_merged(self, dest: Path, dtype: str) -> dict[str, Any]:
        """Put a merged folder of ``dtype`` at ``dest``: moved from the temporary one, copied from an export, or merged now."""
        source = self._find_merged(dtype)
        if source is not None and source.resolve() == dest.resolve():
            return {"reused": str(dest)}
        if source is None:
            details = self.write_merged(dest, dtype)
        elif self.context.tmp_dir in source.parents:
            swap_in(source, dest)
            details = {"moved_from": str(source)}
        else:
            with staged_dir(dest) as partial:
                shutil.copytree(source, partial, dirs_exist_ok=True)
            details = {"copied_from": str(source)}
        self._cache["merged_dir"] = dest
        cached = self._cache.get("reference_model")
        if source is not None and cached is not None and cached[0] == source:
            self._cache["reference_model"] = (dest, cached[1])  # same weights, new place
        return details

    def load_adapted_model(self, dtype: str) -> Any:
        """The base model in ``dtype`` (never 4-bit) with the run's adapter attached, unmerged (a ``PeftModel``).

        A base stored quantized (bitsandbytes) is dequantized first, on CUDA only. For a
        full fine-tune, the trained model itself.
        """
        import torch
        from transformers import AutoModelForCausalLM

        load_dtype = getattr(torch, dtype)
        if self.context.is_full_model:
            return AutoModelForCausalLM.from_pretrained(str(self.context.adapter_dir), dtype=load_dtype,
                                                        trust_remote_code=bool(self.context.config.model.trust_remote_code))
        kwargs = pretrained_kwargs(self.context.config.model)
        quantized = bool(self.context.base_config().get("quantization_config"))
        if quantized and not self.context.env.cuda:
            raise SftError(self.merge_problems()[-1])
        if self.context.env.cuda:
            kwargs["device_map"] = {"": 0}
        model = AutoModelForCausalLM.from_pretrained(self.context.base_model, dtype=load_dtype, **kwargs)
        if kwargs.get("gguf_file"):
            forget_gguf_quantization(model)  # dequantized already; merged and saved as plain weights
        if quantized:
            # What Unsloth does too: merge into the dequantized weights, never into 4-bit ones.
            model = model.dequantize().to(load_dtype)
        rows = adapter_embedding_rows(self.context.adapter_dir)
        if rows and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(self.context.adapter_dir))

    def load_merged_model(self, dtype: str) -> Any:
        """Base + adapter merged, returned in ``dtype``. On CPU the merge runs in float32 for accuracy."""
        import torch

        model = self.load_adapted_model(dtype if self.context.env.cuda else "float32")
        if not self.context.env.cuda and self.context.verifying:
            # base + adapter (unmerged, float32) on the verify prompt: the reference the merged
            # folder is checked against, taken now rather than loading the base a second time.
            ids = self.context.tokenizer(self.context.verify_prompt(), add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                self._cache["unmerged_logits"] = (ids, model(input_ids=ids).logits[0].float())
        if not self.context.is_full_model:
            model = model.merge_and_unload()
        return model.to(getattr(torch, dtype))

    def unmerged_logits(self, ids: Any) -> Any:
        """Logits of base + adapter (unmerged, float32) for ``ids`` (1 x n): the reference for a merge."""
        import torch

        cached = self._cache.get("unmerged_logits")
        if cached is not None and torch.equal(cached[0], ids):
            return cached[1]
        model = self.load_adapted_model("float32")
        with torch.no_grad():
            # On CUDA the adapted model sits on the GPU; the merged reference it is compared with is on the CPU.
            return model(input_ids=ids.to(model.device)).logits[0].float().cpu()

    def merge_details(self, merged_dir: Path) -> dict[str, Any]:
        """What a merged folder's marker says (adapter, dtype, whether training used 4 bits ...)."""
        marker = Path(merged_dir) / MERGED_MARKER
        return json.loads(marker.read_text()) if marker.is_file() else {}

    def write_merged(self, out: Path, dtype: str) -> dict[str, Any]:
        """Merge the adapter into a ``dtype`` base and save an HF folder (weights, tokenizer, marker) at ``out``."""
        start = time.perf_counter()
        model = self.load_merged_model(dtype)
        model.config.dtype = dtype
        eot_id = self.context.tokenizer.convert_tokens_to_ids(self.context.eot_token)
        eos = [t for t in dict.fromkeys([eot_id, self.context.tokenizer.eos_token_id]) if isinstance(t, int) and t >= 0]
        if getattr(model, "generation_config", None) is not None and eos:
            # So plain transformers generation stops at the template's end of turn.
            model.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
            if self.context.tokenizer.pad_token_id is not None:
                model.generation_config.pad_token_id = self.context.tokenizer.pad_token_id
        with staged_dir(out) as partial:
            model.save_pretrained(str(partial))
            self.context.save_tokenizer(partial)
            marker = {
                "adapter": self.adapter_fingerprint(),
                "dtype": dtype,
                "base_model": self.context.config.model.name,
                "trained_in_4bit": self.context.trained_in_4bit,
                "base_was_quantized": bool(self.context.base_config().get("quantization_config")),
                "merge_seconds": round(time.perf_counter() - start, 2),
            }
            (partial / MERGED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        del model
        return marker

    def reference_greedy(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """Greedy tokens of the merged HF model (loaded in float32 with plain transformers) after ``prompt_ids``.

        At most ``n``, ending with the first stop token: that is where llama.cpp and Ollama
        stop, and what follows it is untrained, near-tied territory where any rounding flips
        the argmax.
        """
        return self._greedy_with_logits(prompt_ids, n)[0]

    def reference_gaps(self, prompt_ids: Sequence[int], n: int, tokens: Sequence[int]) -> list[float]:
        """Per position of :meth:`reference_greedy`, the HF model's logit of its own greedy token
        minus its logit of ``tokens[i]`` (0 where they are the same): how sure it was."""
        reference, logits = self._greedy_with_logits(prompt_ids, n)
        return [float(logits[i, ref] - logits[i, tok]) for i, (ref, tok) in enumerate(zip(reference, tokens))]

    def _greedy_with_logits(self, prompt_ids: Sequence[int], n: int) -> tuple[list[int], Any]:
        """:meth:`reference_greedy`'s tokens and the logits row each was chosen from (computed once)."""
        key = ("greedy", tuple(prompt_ids), n)
        if key in self._cache:
            return self._cache[key]
        import torch

        model = self.merged_reference_model()
        stops = self.context.stop_token_ids()
        out: list[int] = []
        rows = []
        ids = torch.tensor([list(prompt_ids)], device=model.device)
        past = None
        with torch.no_grad():
            for _ in range(n):
                res = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                nxt = int(res.logits[0, -1].argmax())
                out.append(nxt)
                rows.append(res.logits[0, -1].float().cpu())
                if nxt in stops:
                    break
                ids = torch.tensor([[nxt]], device=model.device)
        self._cache[key] = (out, torch.stack(rows))
        return self._cache[key]

    def merged_reference_model(self) -> Any:
        """The merged folder loaded in float32 with plain transformers: what exports are checked against.

        Kept in memory for the next check when it is small (under :data:`KEEP_MODEL_BYTES`), so
        merged_16bit's and gguf's verifications load it once.
        """
        import torch
        from transformers import AutoModelForCausalLM

        path = self.merged_model_dir()
        cached = self._cache.get("reference_model")
        if cached is not None and cached[0] == path:
            return cached[1]
        device = {"device_map": {"": 0}} if self.context.env.cuda else {}
        # The merged folder keeps the model's own code (save_pretrained copies it): loading it runs that code again.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **device,
                                                     trust_remote_code=bool(self.context.config.model.trust_remote_code))
        model.eval()
        if 4 * self.context.parameter_count() <= KEEP_MODEL_BYTES:
            self._cache["reference_model"] = (path, model)
        return model
