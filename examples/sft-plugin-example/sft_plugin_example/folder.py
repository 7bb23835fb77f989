"""The ``folder`` publisher: a run's exports copied into a local folder, with a manifest and a model card.

``publish.folder.path`` (setting it turns the publisher on) names the destination; each run
gets ``<path>/<run name>/``, holding one folder per export (``lora/``, ``gguf/`` ...) with the
export's files, ``manifest.json`` (every file with its size and sha256, the run's losses and
where each export came from) and ``README.md``, a Hugging Face model card of the run
(:mod:`sft_plugin_example.modelcard`). A shared drive, an artifact store mounted as a folder,
or the staging area of a release job can take it from there.

Files are copied under a temporary name and renamed, and a file whose bytes are already there
is left alone, so ``sft publish RUN --to folder`` after an interruption finishes the job.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from sft.core import ExportContext, Exporter, ExportResult, Publisher, SftError, hookimpl
from sft.core.config import opt
from sft.core.rundir import atomic_write_text, file_sha256

from .modelcard import ModelCardOptions, read_front_matter, render_model_card

__all__ = ["FolderOptions", "FolderPublisher", "register_publishers"]


@dataclass
class FolderOptions:
    path: Optional[str] = opt(None, "Folder the exports are copied into (one subfolder per run); setting it turns the folder publisher on.")
    card: bool = opt(True, "Write README.md, a Hugging Face model card of the run, beside the exports.")
    license: Optional[str] = opt(None, "The card's license (an SPDX-style Hub id such as apache-2.0); left out when null.")
    language: List[str] = opt([], "Languages of the training data (ISO codes, e.g. [en]).")
    tags: List[str] = opt([], "Extra Hub tags for the card, added to sft, lora and the chat template's name.")


class FolderPublisher(Publisher):
    name = "folder"
    version = "1"
    description = "Copy each export into a local folder, with manifest.json (sizes, sha256) and a model card"
    options = FolderOptions
    enabled_by = "path"

    def preflight(self, config: Any, exporters: Sequence[Exporter], options: FolderOptions | None = None) -> list[str]:
        if options is None or not options.path:
            return ["publish.folder.path is not set: name the folder the exports are copied into"]
        root = Path(options.path).expanduser()
        existing = next((p for p in [root, *root.parents] if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            return [f"publish.folder.path: {root} cannot be written ({existing or 'no existing parent'} is not a writable folder)"]
        return []

    def start(self, context: ExportContext, options: FolderOptions | None = None) -> str:
        problems = self.preflight(context.config, [], options)
        if problems:
            raise SftError(problems[0])
        target = Path(options.path).expanduser() / context.name
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    def publish(self, context: ExportContext, exporter: Exporter, result: ExportResult,
                options: FolderOptions | None = None) -> dict[str, Any]:
        target = Path(options.path).expanduser() / context.name
        copied, kept, manifest_files = [], [], {}
        for local, rel in context.run_dir.export_files(result.paths):
            dest = target / exporter.name / rel
            digest = file_sha256(local)
            if dest.is_file() and dest.stat().st_size == local.stat().st_size and file_sha256(dest) == digest:
                kept.append(rel)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                partial = dest.with_name(f".{dest.name}.partial")
                shutil.copyfile(local, partial)
                os.replace(partial, dest)
                copied.append(rel)
            manifest_files[f"{exporter.name}/{rel}"] = {"bytes": local.stat().st_size, "sha256": digest}
        self._write_manifest(context, target, exporter.name, manifest_files)
        if options.card:
            self._write_card(context, target, options)
        return {"where": str(target / exporter.name), "copied": copied, "kept": kept}

    @staticmethod
    def _write_manifest(context: ExportContext, target: Path, name: str, files: dict[str, Any]) -> None:
        path = target / "manifest.json"
        manifest = json.loads(path.read_text()) if path.is_file() else {"files": {}, "exports": {}}
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{name}/")} | files
        summary = context.run_dir.read_summary()
        manifest["exports"][name] = {"from": str(context.run_dir.export_dir(name)),
                                     "details": (summary.get("exports") or {}).get(name, {}).get("details", {})}
        manifest.update(run=context.name, base_model=str(context.config.model.name),
                        template=str(context.config.template.name),
                        train_loss=summary.get("train_loss"), steps=summary.get("steps"))
        atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def _write_card(context: ExportContext, target: Path, options: FolderOptions) -> None:
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(context.config, resolve=True)
        card = ModelCardOptions(license=options.license, language=list(options.language), tags=list(options.tags))
        text = render_model_card(config, context.run_dir.read_summary(), card, context.name,
                                 trained_in_4bit=context.trained_in_4bit)
        read_front_matter(text)  # the front matter parses back, as the Hub parses it
        atomic_write_text(target / "README.md", text)


@hookimpl
def register_publishers(register) -> None:
    register(FolderPublisher())
