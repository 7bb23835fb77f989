"""``sft eval`` of the gguf exporter's files: an lm-eval ``LM`` that scores a GGUF with llama.cpp, without torch.

``sft eval`` scores the run's own model with lm-eval's ``hf`` model and each GGUF the exporter
wrote (:func:`eval_models`) with :func:`llama_cpp_lm`. Both are lm-eval ``TemplateLM`` subclasses, so the same lm-eval code
builds the requests (chat template, context/continuation split, few-shot, filters, metrics);
only the numbers under them come from a different engine:

- ``loglikelihood``: the sum of log-softmax(llama.cpp logits) over the continuation tokens,
  and whether each continuation token is the argmax, exactly as ``HFLM._loglikelihood_tokens``
  computes them from the HF logits (same truncation to the context length);
- ``generate_until``: greedy decoding, stopped at the ``until`` strings and the EOS token and
  cut at the first stop string, as ``HFLM.generate_until`` with ``do_sample=False``;
- ``loglikelihood_rolling``: lm-eval's own rolling windows over the same scoring.

The chat template is the one inside the GGUF (``tokenizer.chat_template``, written by the gguf
exporter from the run's template), rendered by llama-cpp-python's ``Jinja2ChatFormatter``:
what llama.cpp users of the file get. The text is tokenized by the GGUF's own vocabulary.

Why not lm-eval's ``gguf`` model type over llama-cpp-python's server: that client scores a
continuation from the server's character offsets of an ``echo`` completion (its split of
context and continuation tokens is not the ``hf`` model's), drops the last continuation token's
log-probability, applies no chat template, and needs the server's extra packages and a port.
Scoring in-process from the logits gives the same definition of every number on both sides.

Runs in the llama.cpp worker (:mod:`.worker`): torch's OpenMP threads would busy-wait next to
ggml's thread pool.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sft.core.errors import SftError
from sft.core.interfaces import EvalModel

from .llama import LLAMA_EXTRA_INSTALL, llama_cpp_available

__all__ = ["llama_cpp_lm", "evaluate_here", "eval_models"]

#: Context rounded up to this many tokens when llama.cpp needs a bigger one (scores are n_ctx x vocab floats).
_CTX_STEP = 512


def llama_cpp_lm(path: str | Path, threads: int | None = None) -> Any:
    """An lm-eval ``TemplateLM`` scoring with the GGUF at ``path`` (see the module docstring)."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    path = str(path)
    n_threads = threads or os.cpu_count() or 1

    def load(n_ctx: int) -> Any:
        try:
            return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, logits_all=True,
                                   verbose=False, seed=0)
        except Exception as exc:  # noqa: BLE001 - llama.cpp reports load failures as ValueError/RuntimeError
            raise SftError(f"llama.cpp cannot load {path}: {exc}") from None

    class LlamaCppLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            # Tokenizes too (llama.cpp's vocabulary needs a context); replaced by a bigger one when a request needs it.
            self._llm = self._vocab = load(_CTX_STEP)
            meta = self._vocab.metadata
            arch = meta.get("general.architecture", "llama")
            self.max_length = int(meta.get(f"{arch}.context_length") or 2048)
            self.max_gen_toks = 256
            template = meta.get("tokenizer.chat_template")
            bos, eos = self._vocab.token_bos(), self._vocab.token_eos()
            self._formatter = Jinja2ChatFormatter(
                template, eos_token=self._piece(eos), bos_token=self._piece(bos)) if template else None

        def close(self) -> None:
            """Free llama.cpp's model now (at interpreter exit its finalizers may run after the library is gone)."""
            self._llm.close()

        def _piece(self, token: int) -> str:
            return self._vocab.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

        # -- tokens -------------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return int(self._vocab.token_eos())

        @property
        def prefix_token_id(self) -> int:
            bos = int(self._vocab.token_bos())
            return bos if bos >= 0 else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            # As HFLM: None is the vocabulary's own default (llama.cpp's add_bos=True adds a BOS only when the
            # GGUF's tokenizer.ggml.add_bos_token says so), except for a text that already starts with the BOS.
            if add_special_tokens is None:
                bos = self._piece(self._vocab.token_bos())
                add_special_tokens = not (bos and string.startswith(bos))
            # Special tokens written as text (the chat template's) parse as tokens, as in HF tokenizers.
            return list(self._vocab.tokenize(string.encode("utf-8"), add_bos=add_special_tokens, special=True))

        def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
            return self._vocab.detokenize(list(tokens), special=not skip_special_tokens).decode("utf-8", errors="replace")

        # -- chat template ------------------------------------------------------------------
        @property
        def tokenizer_name(self) -> str:
            return path

        def chat_template(self, chat_template: bool | str = False) -> str:
            return self._vocab.metadata.get("tokenizer.chat_template", "")

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            if self._formatter is None:
                raise SftError(f"{path} has no tokenizer.chat_template; the gguf exporter writes the run's template "
                               f"into every file: re-export with sft export RUN --exporter gguf")
            if not add_generation_prompt:
                raise SftError("a task with gen_prefix (a prefilled assistant turn) cannot be scored on a GGUF: "
                               "llama-cpp-python's chat formatter always ends with a new assistant turn")
            return self._formatter(messages=chat_history).prompt

        # -- scoring ------------------------------------------------------------------------
        def _logits(self, tokens: list[int]) -> Any:
            """llama.cpp's logits after each of ``tokens`` (len(tokens) x vocab), reusing the common prefix."""
            if self._llm.n_ctx() < len(tokens):
                self._llm.close()
                needed = -(-len(tokens) // _CTX_STEP) * _CTX_STEP
                self._llm = self._vocab = load(max(min(needed, self.max_length), len(tokens)))
            llm = self._llm
            cached = llm.input_ids[:llm.n_tokens].tolist()
            same = 0
            for a, b in zip(cached, tokens):
                if a != b:
                    break
                same += 1
            llm.n_tokens = same  # eval() drops the KV cache past n_tokens and goes on from there
            llm.eval(tokens[same:])
            scores = np.array(llm.scores[:len(tokens)], dtype=np.float64)
            if not np.isfinite(scores).all():
                raise SftError(f"{path}: llama.cpp computes non-finite logits (nan or inf); the file is broken")
            return scores

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            results = []
            for _key, context, continuation in requests:
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                inp = whole[:-1]
                n = len(continuation)
                rows = self._logits(inp)[len(inp) - n:]
                shifted = rows - rows.max(axis=1, keepdims=True)
                logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
                ll = float(sum(logprobs[i, tok] for i, tok in enumerate(continuation)))
                greedy = bool(all(int(rows[i].argmax()) == tok for i, tok in enumerate(continuation)))
                results.append((ll, greedy))
                self.cache_hook.add_partial("loglikelihood", _key, (ll, greedy))
            return results

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            results = []
            for (string,) in [req.args for req in requests]:
                windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                results.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
            return results

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            results = []
            for context, gen_kwargs in [req.args for req in requests]:
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                if kwargs.get("do_sample"):
                    raise SftError("sft eval scores GGUFs with greedy decoding only; the task asks for sampling "
                                   "(do_sample/temperature in its generation_kwargs)")
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                tokens = self.tok_encode(context)[-(self.max_length - max_gen):]
                out: list[int] = []
                for _ in range(max_gen):
                    nxt = int(self._logits(tokens)[-1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    out.append(nxt)
                    tokens.append(nxt)
                    if any(stop and stop in self.tok_decode(out) for stop in until):
                        break
                text = postprocess_generated_text(self.tok_decode(out), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return results

    return LlamaCppLM()


def evaluate_here(request: dict[str, Any]) -> dict[str, Any]:
    """The worker's side of GGUF scoring: ``request`` has ``path``, ``tasks``, ``limit``, ``threads``.

    Returns :func:`sft.engine.evaluate.run_lm_eval`'s results, ``seconds`` and whether torch got imported.
    """
    from sft.engine.evaluate import run_lm_eval

    start = time.perf_counter()
    lm = llama_cpp_lm(request["path"], request.get("threads"))
    try:
        results = run_lm_eval(lm, request["tasks"], request.get("limit"), torch_seed=False)
    finally:
        lm.close()
    import sys

    return {"results": results, "seconds": round(time.perf_counter() - start, 2), "torch_imported": "torch" in sys.modules}


def score_gguf(path: str | Path, tasks: list[str], limit: int | None) -> dict[str, Any]:
    """:func:`evaluate_here` in the llama.cpp worker process; task -> metric -> value."""
    if not llama_cpp_available():
        raise SftError(f"scoring a GGUF loads it with llama.cpp, which is not installed: {LLAMA_EXTRA_INSTALL}")
    from .worker import run_in_worker

    return run_in_worker(f"{__name__}:evaluate_here", {"path": str(path), "tasks": list(tasks), "limit": limit,
                                                       "threads": os.cpu_count()})["results"]


def eval_models(folder: Path, exporter: str) -> list[EvalModel]:
    """One :class:`EvalModel` per ``*.gguf`` in ``folder``, labelled ``<exporter>:<quant>`` (``gguf:q8_0``)."""
    models = []
    for path in sorted(folder.glob("*.gguf")):
        quant = path.stem.rsplit("-", 1)[-1].lower() if "-" in path.stem else path.stem
        label = f"{exporter}:{quant}"
        if any(m.label == label for m in models):
            label = f"{exporter}:{path.stem}"
        models.append(EvalModel(label, str(path), lambda tasks, limit, path=path: score_gguf(path, tasks, limit)))
    return models
