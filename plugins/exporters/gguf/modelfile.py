"""The Ollama Modelfile written next to each GGUF: FROM, the template's TEMPLATE and its stop tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.core.errors import SftError

__all__ = ["modelfile_text"]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_file: str, template: Any, tokenizer: Any = None) -> str:
    """An Ollama Modelfile for ``gguf_file`` (a path relative to the Modelfile) and the run's template."""
    go_template = template.ollama_template(tokenizer)
    if '"""' in go_template:
        raise SftError(f"chat template '{template.name}': its Ollama template contains \"\"\", which a Modelfile cannot quote")
    lines = [
        f"# Ollama Modelfile written by sft for {gguf_file} (chat template '{template.name}').",
        f"# ollama create <model-name> -f {Path(gguf_file).stem}.Modelfile",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{go_template}"""',
    ]
    lines += [f"PARAMETER stop {_quote(s)}" for s in template.stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"
