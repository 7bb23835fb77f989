"""The Hub publisher's machinery: one :class:`Pusher` per export run, the repo layout, the model card.

- **Layout.** ``publish.hub.repo_id`` (R) names the model; each exporter's files go to their
  own repo ``R + Exporter.hub_suffix``, the names Unsloth users know: ``merged_16bit`` to R,
  ``lora`` to ``R-lora``, ``merged_4bit`` to ``R-bnb-4bit``, ``gguf`` (quants + Modelfiles) to
  ``R-GGUF``; an exporter without a suffix to ``R-<name>``. Files sit at the repo root, so
  ``from_pretrained(repo)``, ``llama-cli -hf repo:Q8_0`` and ``ollama run hf.co/repo:Q8_0`` work.
- **One commit per repo and export**, with a ``README.md`` model card written with
  ``huggingface_hub.ModelCard`` (run-level sections here, the exporter's usage and metadata
  from :meth:`Exporter.hub_card`) and ``loss.png``.
- **Resuming.** Before committing, the Hub's ``paths-info`` says what each path already holds;
  a file with the same content (the sha256 the Hub keeps for LFS files, the git blob id for
  small ones) is skipped. LFS blobs uploaded before a cut are not sent again either: the LFS
  batch API reports them present. After the commit the same query checks what landed.
- **Safety.** The token comes from ``HF_TOKEN`` or the ``hf auth login`` store, read by
  huggingface_hub itself; sft never stores it and scrubs it from any message it records. A
  ``whoami`` check runs before training. An existing repo is pushed into only when sft made it
  (its card carries the ``sft-forge`` tag) or it is empty, unless ``force``.
- **Failures lose nothing.** A push that fails is recorded in ``summary.json``
  (``publish.hub.exports``, by the engine's publish fan-out) and reported; the exports stay on
  disk and ``sft push RUN`` (``sft publish RUN --to hub``) retries.

Only huggingface_hub's API is used (``whoami``, ``model_info``, ``create_repo``,
``create_branch``, ``get_paths_info``, ``create_commit``); no HTTP is written here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sft.core.errors import SftError
from sft.core.interfaces import ExportContext, ExportResult, Exporter, HubCard
from sft.core.notices import notice

__all__ = ["TAG", "ForeignRepoError", "PushSettings", "Pusher", "render_card", "repo_id_problem", "short_error"]

#: The Hub tag that marks a repo as made by sft (TRL tags its own cards ``sft``, so that one cannot).
TAG = "sft-forge"
#: Files a new repo starts with; a repo holding only these counts as empty.
EMPTY_REPO_FILES = {".gitattributes"}
METHOD_WORDS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


#: Local data files, never Hub ids, even when the path does not resolve from here.
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gguf", ".safetensors")


def _is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub id (``owner/name`` or ``name``) rather than a local path or ``sft:...``."""
    text = str(name or "")
    return (bool(_HUB_ID.match(text)) and not text.lower().endswith(_FILE_SUFFIXES)
            and not Path(text).expanduser().exists())


def repo_id_problem(repo: str, what: str = "") -> str | None:
    """Why ``repo`` is no Hub repo id, by huggingface_hub's own rule (one line naming the key), else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        return f"publish.hub.repo_id: {what}'{repo}' is not a Hub repo id: {str(exc).splitlines()[0]}"
    return None


class ForeignRepoError(SftError):
    """A repo that exists and was not made by sft, pushed into without ``force``."""


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _scrub(text: str) -> str:
    """``text`` with the token (if any) replaced: messages go to summary.json and logs."""
    token = _token()
    return text.replace(token, "hf_***") if token else text


def short_error(exc: BaseException) -> str:
    """One line for ``exc``, the token scrubbed: what summary.json and the log record of a failed push."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "") or type(exc).__name__
    return _scrub(f"{type(exc).__name__}: {first}" if not isinstance(exc, SftError) else str(exc))


@dataclass(frozen=True)
class PushSettings:
    """``publish.hub`` resolved. ``repo_id`` may still lack its namespace."""

    repo_id: str
    private: bool = True
    revision: str | None = None
    commit_message: str | None = None
    force: bool = False
    base_model: str | None = None

    @classmethod
    def from_options(cls, options: Any, repo_id: str | None = None) -> "PushSettings | None":
        """The settings of the ``publish.hub`` options, ``repo_id`` standing in for an unset one; None without a repo."""
        repo = options.repo_id or repo_id
        if not repo:
            return None
        return cls(repo_id=str(repo), private=bool(options.private), revision=options.revision or None,
                   commit_message=options.commit_message, force=bool(options.force), base_model=options.base_model)


class Pusher:
    """Pushes exports of one run with one token. :meth:`login` first (it checks the token)."""

    def __init__(self, settings: PushSettings):
        import sys

        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars

        if not sys.stderr.isatty():
            disable_progress_bars()  # per-file bars are for a terminal; logs get sft's one line per push
        self.settings = settings
        self.api = HfApi(library_name="sft-forge")
        self.user: str | None = None
        self.repo_id = settings.repo_id
        self._sha256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: weights are hashed once

    # -- the token --------------------------------------------------------------------------------
    def login(self) -> str:
        """Check the token with ``whoami`` and resolve the repo's namespace; return the Hub user name.

        Raises :class:`SftError` for a missing, invalid or read-only token, an unreachable Hub,
        or a namespace the token cannot write to.
        """
        from huggingface_hub.errors import HfHubHTTPError

        where = self.api.endpoint
        if _token() is None:
            raise SftError("no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                           "(sft reads the token only from there, never from the config)")
        try:
            info = self.api.whoami()
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 401:
                raise SftError(f"the Hugging Face token was refused by {where} (401): {short_error(exc)}. "
                               "Set a valid write token in HF_TOKEN or run `hf auth login`") from None
            raise SftError(f"cannot check the Hugging Face token at {where}: {short_error(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - network errors come from httpx, not huggingface_hub
            raise SftError(f"cannot reach the Hugging Face Hub at {where} to check the token: {short_error(exc)}") from None
        role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise SftError("the Hugging Face token is read-only; pushing needs a token with write access "
                           "(https://huggingface.co/settings/tokens)")
        self.user = str(info["name"])
        namespaces = [self.user] + [str(o.get("name")) for o in info.get("orgs") or []]
        if "/" not in self.repo_id:
            self.repo_id = f"{self.user}/{self.repo_id}"
        namespace = self.repo_id.split("/")[0]
        if namespace not in namespaces:
            raise SftError(f"publish.hub.repo_id: '{self.repo_id}' is in '{namespace}', which the token's user "
                           f"'{self.user}' cannot write to (yours: {', '.join(namespaces)})")
        return self.user

    # -- repos ------------------------------------------------------------------------------------
    def repo_for(self, exporter: Exporter) -> str:
        """The repo ``exporter``'s files go to (see the module docstring)."""
        suffix = exporter.hub_suffix if exporter.hub_suffix is not None else f"-{exporter.name}"
        return self.repo_id + suffix

    def repo_state(self, repo: str) -> tuple[str, Any]:
        """``("missing" | "empty" | "sft" | "foreign", model_info or None)``; raises :class:`SftError` for a foreign repo without force."""
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            info = self.api.model_info(repo)
        except RepositoryNotFoundError:
            return "missing", None
        files = {s.rfilename for s in info.siblings or []}
        tags = set(info.tags or []) | set(getattr(info.card_data, "tags", None) or [])
        state = "empty" if files <= EMPTY_REPO_FILES else "sft" if TAG in tags else "foreign"
        if state == "foreign" and not self.settings.force:
            raise ForeignRepoError(f"{repo} already exists and was not made by sft (its model card has no '{TAG}' tag); "
                           "push into it anyway with `sft push --force` or publish.hub.force=true, or choose "
                           "another publish.hub.repo_id")
        return state, info

    def _ensure_repo(self, repo: str) -> dict[str, Any]:
        state, info = self.repo_state(repo)
        created = state == "missing"
        if created:
            self.api.create_repo(repo, private=self.settings.private, exist_ok=True)
            private = self.settings.private
        else:
            private = bool(info.private)
            if private != self.settings.private:
                notice(f"push: {repo} exists and is {'private' if private else 'public'}; "
                       "sft leaves a repo's visibility as it is")
        revision = self.settings.revision
        if revision and revision != "main":
            self.api.create_branch(repo, branch=revision, exist_ok=True)
        return {"created": created, "private": private}

    # -- pushing ----------------------------------------------------------------------------------
    def push(self, context: ExportContext, exporter: Exporter, result: ExportResult) -> dict[str, Any]:
        """Push one export (files + card + loss plot) to its repo; return the record for summary.json.

        Raises :class:`SftError` (or what huggingface_hub raises) when the push fails; the
        engine records the failure with the message scrubbed by :func:`short_error`.
        """
        name = exporter.name
        if not [path for _, path in context.run_dir.export_files(result.paths) if path != "README.md"]:
            # A card-only export: sft writes every repo's card itself.
            notice(f"push {name}: nothing to push (no files besides a README)")
            return {"ok": True, "repo": None, "uploaded": [], "skipped": [], "commit": None}
        repo = self.repo_for(exporter)
        record: dict[str, Any] = {"repo": repo, "url": f"{self.api.endpoint}/{repo}",
                                  "revision": self.settings.revision or "main"}
        files = self._files(context, name, result, repo)  # first: a file that is not the run's own stops it here
        record.update(self._ensure_repo(repo))
        record.update(self._commit(repo, name, files, context.name))
        size = _size(record["bytes_uploaded"])
        notice(f"push {name}: {record['url']} ({record['commit'] or 'no new commit'}): "
               f"{len(record['uploaded'])} file(s) uploaded ({size}), {len(record['skipped'])} already there")
        return record

    def _files(self, context: ExportContext, name: str, result: ExportResult, repo: str) -> list[tuple[str, Any]]:
        """``(path in repo, local Path or bytes)`` for ``result``, the loss plot and the model card."""
        summary = context.run_dir.read_summary()
        entries = _repo_entries(context, summary, repo, self, current=(name, result))
        files: dict[str, Any] = {}
        for _n, _exporter, entry in entries:
            files.update({path: local for local, path in context.run_dir.export_files(entry.paths)})
        files.pop("README.md", None)  # sft's card replaces any README an export carries (PEFT's placeholder)
        if context.run_dir.own_path(context.run_dir.loss_plot).is_file():  # a link to ~/.ssh/id_rsa is refused
            files.setdefault("loss.png", context.run_dir.loss_plot)
        siblings = sorted({(n, self.repo_for(e)) for n, e, _r in _repo_entries(context, summary, None, self)
                           if self.repo_for(e) != repo})
        card = render_card(context, summary, repo, self.user or "", entries, sorted(files),
                           base_model=self.settings.base_model, siblings=siblings)
        files["README.md"] = card.encode()
        return sorted(files.items())

    def _commit(self, repo: str, name: str, files: list[tuple[str, Any]], run_name: str) -> dict[str, Any]:
        from huggingface_hub import CommitOperationAdd

        revision = self.settings.revision
        remote = {f.path: f for f in self.api.get_paths_info(repo, [p for p, _ in files], revision=revision)}
        changed, skipped = [], []
        for path, local in files:
            (skipped if self._same(local, remote.get(path)) else changed).append((path, local))
        commit = None
        if changed:
            operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=local if isinstance(local, bytes) else str(local))
                          for path, local in changed]
            message = self.settings.commit_message or f"Upload {name} export of {run_name} (sft)"
            info = self.api.create_commit(repo, operations, commit_message=message, revision=revision)
            commit = info.oid
        landed = {f.path: f for f in self.api.get_paths_info(repo, [p for p, _ in files], revision=revision)}
        wrong = [path for path, local in files if not self._same(local, landed.get(path))]
        if wrong:
            raise SftError(f"after the commit, {repo} does not hold the local bytes of: {', '.join(wrong)}")
        return {"commit": commit, "uploaded": [p for p, _ in changed], "skipped": [p for p, _ in skipped],
                "bytes_uploaded": sum(_nbytes(local) for _, local in changed), "files": len(files)}

    def _same(self, local: Any, remote: Any) -> bool:
        """Whether the Hub's entry holds these bytes: sha256 for LFS files, the git blob id for small ones."""
        import hashlib

        from huggingface_hub.utils import sha

        if remote is None or remote.size != _nbytes(local):
            return False
        if remote.lfs is not None:
            if isinstance(local, bytes):
                return hashlib.sha256(local).hexdigest() == remote.lfs.sha256
            stat = Path(local).stat()
            key = (str(local), stat.st_size, stat.st_mtime_ns)
            if key not in self._sha256:
                with open(local, "rb") as f:
                    self._sha256[key] = sha.sha_fileobj(f).hex()
            return self._sha256[key] == remote.lfs.sha256
        data = local if isinstance(local, bytes) else Path(local).read_bytes()  # small: the Hub keeps it out of LFS
        return sha.git_hash(data) == remote.blob_id


# -- sizes and records ----------------------------------------------------------------------
def _nbytes(local: Any) -> int:
    return len(local) if isinstance(local, bytes) else Path(local).stat().st_size


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _repo_entries(context: ExportContext, summary: Mapping[str, Any], repo: str | None, pusher: Pusher,
                  current: tuple[str, ExportResult] | None = None) -> list[tuple[str, Exporter, ExportResult]]:
    """Every finished export of the run whose files go to ``repo`` (usually one; None: any), ``current`` included."""
    results = {name: ExportResult.from_summary(name, entry) for name, entry in (summary.get("exports") or {}).items()}
    if current is not None:
        results[current[0]] = current[1]
    out = []
    for name, result in results.items():
        exporter = context.pm.registry("exporter").get(name)
        if exporter is not None and result.ok and repo in (None, pusher.repo_for(exporter)):
            out.append((name, exporter, result))
    return out


# -- the model card ---------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def render_card(context: ExportContext, summary: Mapping[str, Any], repo: str, user: str,
                entries: Sequence[tuple[str, Exporter, ExportResult]], files: Sequence[str],
                base_model: str | None = None, siblings: Sequence[tuple[str, str]] = ()) -> str:
    """The ``README.md`` of ``repo``: front matter from ``huggingface_hub.ModelCardData``, then the run
    (base model, data, template, method and LoRA settings, results, loss plot) and each export's usage."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = context.config
    parts: list[HubCard] = [exporter.hub_card(context, result, repo, user) for _n, exporter, result in entries]
    base = base_model or (cfg.model.name if _is_hub_id(cfg.model.name) else None)
    dataset = str(cfg.data.dataset)
    method = str(summary.get("method") or cfg.model.method)
    template = str(cfg.template.name)
    metadata: dict[str, Any] = {}
    for part in parts:
        metadata.update(part.metadata)
    method_tag = "full-fine-tuning" if method == "full" else method
    tags = list(dict.fromkeys([TAG, method_tag, template, *(t for part in parts for t in part.tags)]))
    data = ModelCardData(
        base_model=base,
        library_name=next((p.library_name for p in parts if p.library_name), None),
        datasets=_hub_datasets(dataset, summary) or None,
        pipeline_tag="text-generation",
        tags=tags,
        **metadata,
    )
    name = repo.split("/")[-1]
    base_text = f"[`{base}`](https://huggingface.co/{base})" if base else "a local base model"
    lines = [f"# {name}", "",
             f"The {', '.join(f'`{n}`' for n, _e, _r in entries)} export of the `sft` run `{context.name}`: "
             f"{base_text} fine-tuned with {METHOD_WORDS.get(method, method)} in the `{template}` chat format.", ""]
    lines += ["## Files", "", "| file | size |", "|---|---|"]
    sizes = {path: _nbytes(local) for _n, _e, r in entries for local, path in context.run_dir.export_files(r.paths)}
    lines += [f"| `{path}` | {_size(sizes[path])} |" for path in files if path in sizes]
    for part in parts:
        if part.usage:
            lines += ["", "## How to use", "", part.usage.strip()]
    if siblings:
        lines += ["", "## Other exports of this run", ""]
        lines += [f"- {n}: [{r}](https://huggingface.co/{r})" for n, r in siblings]
    lines += ["", "## Training", ""] + _training_lines(cfg, summary, base_text, dataset)
    if "loss.png" in files:
        lines += ["", "![Training loss](loss.png)"]
    generation = summary.get("generation") or {}
    if generation.get("prompt") and generation.get("text") is not None:
        lines += ["", "Quick generation after training:", "", f"> **{generation['prompt']}**", ">",
                  "> " + str(generation["text"]).strip().replace("\n", "\n> ")]
    lines += ["", "Made with [sft](https://pypi.org/project/sft-forge/) (`sft push` re-uploads it from the run directory).", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _hub_datasets(dataset: str, summary: Mapping[str, Any]) -> list[str]:
    """The Hub datasets the model learned from: the run's, and the run it continued's (model.from_run)."""
    objective = summary.get("objective") if isinstance(summary.get("objective"), Mapping) else {}
    names = [dataset, str(objective.get("from_run_dataset") or "")]
    return list(dict.fromkeys(n for n in names if _is_hub_id(n) and "/" in n))


def _packed(cfg: Any, summary: Mapping[str, Any]) -> bool:
    """Whether the run packed its rows: what ``training.packing=auto`` decided (``summary.json``'s ``packed``); a
    run from before that record says so only for ``training.packing=true``."""
    packed = summary.get("packed")
    return bool(packed) if packed is not None else str(cfg.training.packing).lower() == "true"


def _training_lines(cfg: Any, summary: Mapping[str, Any], base_text: str, dataset: str) -> list[str]:
    stats = summary.get("dataset") if isinstance(summary.get("dataset"), Mapping) else {}
    shown = dataset if _is_hub_id(dataset) or dataset.startswith("sft:") else Path(dataset).name
    t, lora = cfg.training, cfg.lora
    rows = [("base model", base_text), ("dataset", f"`{shown}` (format `{stats.get('format', cfg.data.format)}`, split `{cfg.data.split}`)")]
    for key, label in (("train_rows", "training rows"), ("eval_rows", "evaluation rows"),
                       ("trained_tokens", "trained (assistant) tokens")):
        if stats.get(key) is not None:
            rows.append((label, _fmt(stats[key])))
    objective = summary.get("objective") if isinstance(summary.get("objective"), Mapping) else {}
    if objective.get("name") not in (None, "sft") or objective.get("from_run"):
        rows.append(("objective", str(objective.get("description") or objective.get("name"))))
    rows.append(("chat template", f"`{cfg.template.name}`"))
    method = str(summary.get("method") or cfg.model.method)
    if method != "full":
        rows.append(("method", f"{method}: r={lora.r}, alpha={lora.lora_alpha}, dropout={_fmt(lora.lora_dropout)}, "
                               f"target modules {_fmt(list(lora.target_modules))}" + (", rsLoRA" if lora.use_rslora else "")))
    else:
        rows.append(("method", "full fine-tuning"))
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{_fmt(t.num_train_epochs)} epochs"
    rows.append(("schedule", f"{steps}, learning rate {_fmt(t.learning_rate)} ({t.lr_scheduler_type}), batch "
                             f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation, "
                             f"max length {cfg.model.max_seq_length}" + (", packed" if _packed(cfg, summary) else "")))
    for key, label in (("steps", "optimizer steps"), ("epochs", "epochs"), ("train_loss", "final train loss"),
                       ("eval_loss", "final eval loss"), ("tokens", "tokens seen"), ("tokens_per_second", "tokens/s"),
                       ("device", "device"), ("backend", "backend")):
        if summary.get(key) is not None:
            rows.append((label, _fmt(summary[key])))
    train_seconds = (summary.get("durations") or {}).get("train")
    if train_seconds is not None:
        rows.append(("training time", f"{_fmt(float(train_seconds))} s"))
    return [f"- {label}: {value}" for label, value in rows]
