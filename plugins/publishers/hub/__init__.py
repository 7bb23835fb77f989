"""The ``hub`` publisher: each export to the Hugging Face Hub (``publish.hub``, ``--push-to-hub``, ``sft push``).

Each exporter's files go to their own repo named after ``publish.hub.repo_id`` (R):
``merged_16bit`` to R, ``lora`` to ``R-lora``, ``gguf`` to ``R-GGUF`` (the exporter's
``hub_suffix``), with a model card (the exporter's ``hub_card``) and the loss plot, in one
commit per repo and export; files the Hub already holds are skipped, so a retry resumes. The
machinery is in :mod:`.pusher`; docs/hub.md tells the whole story.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sft.core import ExportContext, Exporter, ExportResult, Publisher, SftError, hookimpl
from sft.core.config import opt

__all__ = ["HubOptions", "HubPublisher", "register_publishers"]


@dataclass
class HubOptions:
    repo_id: Optional[str] = opt(None, "Push every export to the Hugging Face Hub as soon as it is written: owner/name, or name for your own account. Setting it turns the hub publisher on. Each exporter gets its own repo named after this one (merged_16bit: the name itself, lora: -lora, gguf: -GGUF; see docs/hub.md). null: the repo of the run's last push (sft push). The token comes from HF_TOKEN or `hf auth login`, never from the config.")
    private: bool = opt(True, "Create the repos private. A repo that already exists keeps its visibility.")
    revision: Optional[str] = opt(None, "Branch to push to, created from main when missing. null: main.")
    commit_message: Optional[str] = opt(None, "Commit message. null: 'Upload <exporter> export of <run name> (sft)'.")
    force: bool = opt(False, "Push into a repo that exists and was not made by sft (its model card lacks the sft-forge tag). sft never deletes files on the Hub; it adds or replaces its own.")
    base_model: Optional[str] = opt(None, "Hub id of the base model, for the model card's base_model when model.name is a local folder. null: model.name when it is a Hub id.")


class HubPublisher(Publisher):
    name = "hub"
    description = "Push each export to its own Hugging Face Hub repo, with a model card; files already there are skipped"
    options = HubOptions
    enabled_by = "repo_id"
    moved_from = "export.push"
    # A run folder's config cannot make your repos public or push into one sft did not make.
    confirmed_options = {"private": (True, "sft push: --public"), "force": (False, "sft push: --force")}

    def __init__(self) -> None:
        self._pusher: Any = None

    def preflight(self, config: Any, exporters: Sequence[Exporter], options: Any = None) -> list[str]:
        """The token (``whoami``) and every target repo, before training starts."""
        from .pusher import Pusher, PushSettings, repo_id_problem, short_error

        settings = PushSettings.from_options(options)
        if settings is None:
            return ["publish.hub.repo_id is not set: name the repo (owner/name) the exports go to"]
        pusher = Pusher(settings)
        # Before the token is checked: a name the Hub refuses needs no network to find.
        named = [repo_id_problem(settings.repo_id)] + [
            repo_id_problem(pusher.repo_for(e), f"the {e.name} export's repo ") for e in exporters]
        if any(named):
            return [next(p for p in named if p)]  # the repo's own name first: its exports' repos share its fault
        try:
            pusher.login()
        except SftError as exc:
            return [str(exc)]
        except Exception as exc:  # noqa: BLE001 - the Hub unreachable mid-check
            return [f"cannot check the token on the Hub: {short_error(exc)}"]
        problems = []
        for exporter in exporters:
            try:
                pusher.repo_state(pusher.repo_for(exporter))
            except SftError as exc:
                problems.append(str(exc))
            except Exception as exc:  # noqa: BLE001
                problems.append(f"cannot check {pusher.repo_for(exporter)} on the Hub: {short_error(exc)}")
        return problems

    def start(self, context: ExportContext, options: Any = None) -> str:
        """Log in; the repo is ``publish.hub.repo_id``, else the one the run's last push resolved
        (``publish.hub.target`` in summary.json, or an older run's ``hub.repo_id``)."""
        from .pusher import Pusher, PushSettings, repo_id_problem

        self._pusher = None
        summary = context.run_dir.read_summary()
        # summary.json's "hub" record is where runs made before publishers were a kind kept their repo.
        last = (((summary.get("publish") or {}).get(self.name) or {}).get("target")
                or (summary.get("hub") or {}).get("repo_id"))
        settings = PushSettings.from_options(options, repo_id=last)
        if settings is None:
            raise SftError("no repo to push to: pass --repo owner/name (or set publish.hub.repo_id)")
        if (problem := repo_id_problem(settings.repo_id)):
            raise SftError(problem)
        pusher = Pusher(settings)
        pusher.login()
        self._pusher = pusher
        return pusher.repo_id

    def publish(self, context: ExportContext, exporter: Exporter, result: ExportResult,
                options: Any = None) -> dict[str, Any]:
        from .pusher import ForeignRepoError

        if self._pusher is None:
            raise SftError("the hub publisher was not started")
        try:
            return self._pusher.push(context, exporter, result)
        except ForeignRepoError as exc:
            # The retry that sft prints must say what lets it go through this time.
            return {"ok": False, "error": str(exc), "retry_overrides": ["publish.hub.force=true"]}

    def error_text(self, exc: BaseException) -> str:
        from .pusher import short_error

        return short_error(exc)


@hookimpl
def register_publishers(register) -> None:
    register(HubPublisher())
