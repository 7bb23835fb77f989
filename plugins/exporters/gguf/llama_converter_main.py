"""Child-process entry point that runs one of llama.cpp's converter scripts unchanged.

``python llama_converter_main.py SCRIPT ARGS...`` (run by file path, so it imports nothing of
``sft``; :func:`.llama_converter.run_converter` puts the vendored gguf-py and the converter
folder on ``PYTHONPATH``) runs ``SCRIPT`` as ``__main__`` with ``ARGS``, adding one fallback:

llama.cpp names a BPE pre-tokenizer (``tokenizer.ggml.pre``) by hashing the token ids of a
check string, so it knows only the vocabularies in its table. transformers 5 builds some
families' tokenizers with the family's own split rule whatever vocabulary they carry
(``Qwen2Tokenizer`` always splits with Qwen2's regex). When the hash is unknown but the
tokenizer's split regex is exactly one that llama.cpp implements, that pre-tokenizer is
used; llama.cpp then splits text as the trained tokenizer does. (The exporter's
verification checks it: llama.cpp must tokenize the prompt to the HF ids.) Anything else
still fails as llama.cpp fails.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys

#: Split regexes of HF tokenizers -> the llama.cpp pre-tokenizer that splits the same way.
SPLIT_RULES = {
    # Qwen2 / Qwen2.5 / Qwen3 (transformers' Qwen2Tokenizer): digits one at a time.
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "qwen2",
    # Llama 3.x: digits in groups of up to three.
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""": "llama-bpe",
}


def _split_regexes(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in (node.get("pattern") or {}) else []
        for value in node.values():
            found += _split_regexes(value)
        return found
    if isinstance(node, list):
        return [r for item in node for r in _split_regexes(item)]
    return []


def pre_by_split_rule(tokenizer: object) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    regexes = _split_regexes(json.loads(backend.to_str()).get("pre_tokenizer"))
    names = {SPLIT_RULES.get(r) for r in regexes}
    return names.pop() if len(regexes) == 1 and len(names) == 1 and None not in names else None


def _patch_pre_tokenizer_detection() -> None:
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001 - the converter's signature
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pre = pre_by_split_rule(tokenizer)
            if pre is None:
                raise
            logging.getLogger("sft").warning("unknown BPE vocabulary hash; its split regex is llama.cpp's %r", pre)
            return pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    script, *args = argv
    sys.argv = [script, *args]
    sys.path.pop(0)  # this file's folder: the converter imports its own modules, never ours
    _patch_pre_tokenizer_detection()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
