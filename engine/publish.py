"""Publishing: every enabled publisher reached through one fan-out, as metrics reach loggers.

A run's exports go to the publishers in ``publish.enabled`` (a publisher whose ``enabled_by``
option is set joins that list by itself: ``publish.hub.repo_id``). :class:`Publishing` is the
one way the engine and the commands talk to them:

- :meth:`Publishing.preflight` before training, and before ``--nproc`` workers start: one
  :class:`SftError` lists every problem (a refused token stops ``sft run`` in seconds);
- :meth:`Publishing.start` once per export run or ``sft publish``: a publisher that cannot
  start is recorded and left out, and the exports are still written;
- :meth:`Publishing.publish` for each export as soon as it is written; a failure is recorded
  and the next publisher and export still go.

Every outcome lands in ``summary.json`` under ``publish.<publisher>``: ``target`` (where the
exports go), ``error`` (a start that failed) and ``exports.<exporter>`` (each publication's
record, with ``ok``). :func:`failed_publications` reads it back and :func:`retry_command`
names the ``sft publish`` line that finishes the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sft.core.config import plugin_options
from sft.core.env import current_environment
from sft.core.errors import SftError
from sft.core.interfaces import ExportContext, ExportResult, Publisher
from sft.core.notices import notice
from sft.core.rundir import RunDir

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.plugins import PluginManager

__all__ = ["Publishing", "failed_publications", "retry_command"]


class Publishing:
    """The publishers ``names`` (default: ``publish.enabled``) of one validated config."""

    def __init__(self, cfg: "DictConfig", pm: "PluginManager", names: Sequence[str] | None = None):
        self.cfg, self.pm = cfg, pm
        self.names = list(cfg.publish.enabled if names is None else names)
        self._started: dict[str, Publisher] = {}

    def _options(self, name: str) -> Any:
        return plugin_options(self.cfg, "publisher", name, self.pm)

    def preflight(self, exporters: Sequence[str]) -> None:
        """Before training: every problem of every publisher in one :class:`SftError`."""
        if not self.names:
            return
        if not exporters:
            notice(f"publish.enabled lists {', '.join(self.names)} but export.enabled is empty: nothing will be published")
            return
        objects = [self.pm.get("exporter", name, "export.enabled") for name in exporters]
        problems = []
        for name in self.names:
            publisher: Publisher = self.pm.get("publisher", name, "publish.enabled")
            options = self._options(name)
            try:
                reason = publisher.unsupported_reason(current_environment(), options)
                found = [reason] if reason else list(publisher.preflight(self.cfg, objects, options))
            except Exception as exc:  # noqa: BLE001 - a broken preflight is one more problem, not a traceback
                found = [publisher.error_text(exc)]
            problems += [f"{name}: {p}" for p in found]
        if problems:
            raise SftError("publish: training did not start (fix these, or publish later with sft publish):\n"
                           + "\n".join(f"  - {p}" for p in problems))

    def start(self, context: ExportContext) -> dict[str, str]:
        """Start every publisher for ``context``'s run; one that cannot start is recorded and left out.
        Returns publisher -> the error of each that could not start."""
        self._started = {}
        failed = {}
        for name in self.names:
            publisher: Publisher = self.pm.get("publisher", name, "publish.enabled")
            try:
                target = publisher.start(context, self._options(name))
            except Exception as exc:  # noqa: BLE001 - nothing published there; the exports are still written
                error = failed[name] = publisher.error_text(exc)
                _record(context.run_dir, name, error=error)
                notice(f"publish {name}: not publishing, {error}; the exports are written to disk, publish them "
                       f"later with: {retry_command(context.run_dir.root, name, [])}")
                continue
            _record(context.run_dir, name, target=str(target), error=None)
            self._started[name] = publisher
        return failed

    def publish(self, context: ExportContext, result: ExportResult) -> dict[str, dict[str, Any]]:
        """Send one finished export to every started publisher: publisher -> the record written to summary.json."""
        records = {}
        exporter = context.pm.get("exporter", result.exporter)
        for name, publisher in self._started.items():
            try:
                record = dict(publisher.publish(context, exporter, result, self._options(name)) or {})
                record.setdefault("ok", True)
            except Exception as exc:  # noqa: BLE001 - a failed publication must not lose the run or the others
                record = {"ok": False, "error": publisher.error_text(exc)}
            if not record["ok"]:
                record.setdefault("error", "failed")
                notice(f"publish {name} {result.exporter}: FAILED: {record['error']}")
            _record(context.run_dir, name, exports={result.exporter: record})
            records[name] = record
        return records


def _record(run_dir: RunDir, publisher: str, exports: Mapping[str, Any] | None = None, **fields: Any) -> None:
    published = dict(run_dir.read_summary().get("publish") or {})
    entry = dict(published.get(publisher) or {})
    for key, value in fields.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    if exports:
        entry["exports"] = {**(entry.get("exports") or {}), **exports}
    published[publisher] = entry
    run_dir.update_summary(publish=published)


def failed_publications(summary: Mapping[str, Any], exporters: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Publisher -> the exports (of ``exporters``, default all) whose last publication failed; a
    publisher that could not start lists every finished export it has not published."""
    finished = [n for n, e in (summary.get("exports") or {}).items() if e.get("ok")]
    out = {}
    for name, entry in (summary.get("publish") or {}).items():
        records = entry.get("exports") or {}
        failed = [n for n, r in records.items() if not r.get("ok")]
        if entry.get("error"):
            failed += [n for n in finished if n not in records]
        failed = sorted({n for n in failed if exporters is None or n in exporters})
        if failed:
            out[name] = failed
    return out


def retry_command(run_dir: str | Path, publisher: str, exporters: Sequence[str],
                  summary: Mapping[str, Any] | None = None) -> str:
    """The ``sft publish`` line that finishes a failed publication (the target comes from the run),
    with the overrides its failed records ask for (``retry_overrides``: the hub's
    ``publish.hub.force=true`` for a repo sft did not make) when ``summary`` is given."""
    records = (((summary or {}).get("publish") or {}).get(publisher) or {}).get("exports") or {}
    extra = dict.fromkeys(o for n in exporters for o in (records.get(n) or {}).get("retry_overrides") or [])
    return " ".join(["sft", "publish", str(run_dir), "--to", publisher] + [f"--exporter {n}" for n in exporters]
                    + list(extra))
