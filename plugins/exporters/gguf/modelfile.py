"""The Ollama Modelfile written next to each GGUF: FROM, the template's TEMPLATE and its stop tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.core.errors import SftError

__all__ = ["modelfile_text"]


def _printable(text: str) -> bool:
    # Ollama's parser keeps only printable runes (and the spaces and newlines between words).
    return all(c.isprintable() or c in " \t\n\r" for c in text)


def _quote_stop(stop: str, template_name: str) -> str:
    """``stop`` as Ollama's Modelfile parser reads a quoted value (parser/parser.go, ``unquote``).

    That parser has no escapes: a value is the text between the first and the last ``"`` of
    its line, and a line that ends in ``"`` ends the value. So a stop string holding ``"``,
    ``\\`` or a line break cannot be written faithfully (and one with ``"`` plus a newline would
    start a new Modelfile command, e.g. ``FROM /etc/passwd``): it is refused.
    """
    bad = [what for what, hit in (('"', '"' in stop), ("\\", "\\" in stop),
                                  ("a line break", "\n" in stop or "\r" in stop),
                                  ("a non-printable character", not _printable(stop.replace("\n", "")))) if hit]
    if not stop or bad:
        what = "is empty" if not stop else f"holds {' and '.join(bad)}"
        raise SftError(f"chat template '{template_name}': the stop string {stop!r} {what}, which an Ollama "
                       f"Modelfile cannot quote (its parser has no escapes); the GGUF is fine, the Modelfile is not "
                       f"written with it (export.gguf.modelfile=false skips the Modelfile)")
    return f'"{stop}"'


def modelfile_text(gguf_file: str, template: Any, tokenizer: Any = None) -> str:
    """An Ollama Modelfile for ``gguf_file`` (a path relative to the Modelfile) and the run's template."""
    go_template = template.ollama_template(tokenizer)
    # A TEMPLATE """...""" value ends at the first line whose text ends in """ (parser/parser.go).
    if '"""' in go_template or not _printable(go_template):
        raise SftError(f"chat template '{template.name}': its Ollama template holds \"\"\" or a non-printable "
                       f"character, which a Modelfile cannot quote")
    if any(c in gguf_file for c in "\n\r") or not _printable(gguf_file):
        raise SftError(f"GGUF file name {gguf_file!r}: a Modelfile cannot name it (line break or non-printable character)")
    lines = [
        f"# Ollama Modelfile written by sft for {gguf_file} (chat template '{template.name}').",
        f"# ollama create <model-name> -f {Path(gguf_file).stem}.Modelfile",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{go_template}"""',
    ]
    lines += [f"PARAMETER stop {_quote_stop(s, template.name)}" for s in template.stop_tokens(tokenizer)]
    return "\n".join(lines) + "\n"
