"""Export orchestration: the export context, preflight, running, ``sft export`` and ``sft publish``.

The training core calls :func:`run_exporters` once the adapter is on disk; ``sft export
RUN_DIR --exporter X [key=value ...]`` calls :func:`export_run`, which re-reads the run's
``config.yaml`` (plus overrides) and exports from ``RUN_DIR/adapter``. Either way:

1. every selected exporter's ``unsupported_reason`` and ``preflight`` run before any work
   (free disk for the expected size, architecture, tokenizer files, missing extras);
2. the exporters run in order; one that raises is recorded as failed (``ok=False`` with the
   error) and the next one still runs. Files are written under a temporary name and
   renamed when complete, so a failure never deletes or truncates earlier outputs;
3. each result is written into ``summary.json`` (``exports.<name>``) as soon as it is
   known, and printed;
4. each finished export goes to every enabled publisher right away (:mod:`sft.engine.publish`);
   ``sft publish RUN --to NAME`` (:func:`publish_run`) sends what is on disk.

:class:`RunExportContext` implements :class:`sft.core.interfaces.ExportContext`, what every
exporter and publisher gets: the run's paths and config, its
configured chat template and tokenizer, facts about the base model (for disk estimates and
architecture checks) and the disk reservation. Machinery that only some exporters share
(the merge, reference generations) lives with them, in :mod:`sft.plugins.exporters.merging`,
and is kept for one export run through :meth:`ExportContext.shared`.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from sft.core.errors import SftError, as_user_error
from sft.core.interfaces import ChatTemplate, ExportResult, Exporter, Message
from sft.core.notices import notice
from sft.core.plugins import get_plugin_manager
from sft.core.rundir import RunDir, dir_size, remove_inside
from sft.core.templating import resolve_template

from .model_files import check_model_folder, check_safetensors, read_gguf_header

from .publish import Publishing

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.env import Environment
    from sft.core.plugins import PluginManager

__all__ = [
    "RunExportContext",
    "run_exporters",
    "export_run",
    "publish_run",
    "preflight_exporters",
    "preflight_before_training",
]

#: Free disk kept in hand beyond the estimates (10%).
DISK_MARGIN = 1.10
DEFAULT_VERIFY_PROMPT = "What is the capital of France?"

T = TypeVar("T")


def _elements(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _safetensors_params(files: Sequence[Path]) -> int:
    """Parameter count from safetensors headers (checked; no tensor is read)."""
    return sum(_elements(info["shape"]) for f in files
               for key, info in check_safetensors(f).items() if key != "__metadata__")


class RunExportContext:
    """The :class:`~sft.core.interfaces.ExportContext` of one export run. Everything heavy is built on first use and cached.

    Args:
        run_dir: the run directory (``config.yaml``, ``adapter/``, ``exports/``).
        config: the resolved config (the run's, plus any ``sft export`` overrides).
        pm: the plugin manager the config was validated with.
        template: the run's configured chat template, as the run resolved it once.
        before_training: preflight only, before the adapter exists (see
            :func:`preflight_before_training`): the tokenizer comes from the base model and
            the adapter files are not checked.
    """

    def __init__(self, run_dir: RunDir | str | Path, config: "DictConfig", pm: "PluginManager",
                 template: ChatTemplate, before_training: bool = False):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir.of(run_dir)
        self.config = config
        self.pm = pm
        #: The run's chat template, configured with its ``template.<name>`` options.
        self.template = template
        self.before_training = before_training
        self._cache: dict[str, Any] = {}
        self._reserved_bytes = 0

    def shared(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once per export run, then the same object: what several exporters share
        (a merged model, reference generations) is made once and dropped by :meth:`close`."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- paths -------------------------------------------------------------------------------
    @property
    def adapter_dir(self) -> Path:
        return self.run_dir.adapter

    def output_dir(self, name: str) -> Path:
        """``<run>/exports/<name>`` (created). Exporters write only here."""
        path = self.run_dir.export_dir(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def tmp_dir(self) -> Path:
        """Scratch space inside the run (same filesystem, so renames are atomic); removed by :meth:`close`."""
        path = self.run_dir.root / "exports" / ".tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def name(self) -> str:
        """A file-name stem for exports: the run name, else the run folder's name."""
        return self.config.training.run_name or self.run_dir.root.resolve().name

    def close(self) -> None:
        """Drop temporary folders and cached models."""
        remove_inside(self.run_dir.root, self.run_dir.root / "exports" / ".tmp")
        self._cache.clear()

    # -- environment and base model ----------------------------------------------------------
    @property
    def env(self) -> "Environment":
        from sft.core.env import current_environment

        return current_environment()

    @property
    def verifying(self) -> bool:
        """Whether exports are checked: ``export.verify`` is true or null (the default)."""
        return self.config.export.verify is not False

    @property
    def is_full_model(self) -> bool:
        """True when the run trained every weight (``adapter/`` holds a whole model, no LoRA)."""
        if self.before_training:
            return self.config.model.method == "full"
        return not (self.adapter_dir / "adapter_config.json").is_file() and (self.adapter_dir / "config.json").is_file()

    @property
    def trained_in_4bit(self) -> bool:
        """Whether training loaded the base quantized to 4 bits (QLoRA on CUDA; on CPU qlora falls back to lora)."""
        return self.config.model.method == "qlora" and self.env.cuda

    @property
    def base_model(self) -> str:
        """Local folder or hub id of the base model (the embedded default resolves offline)."""
        from .models import resolve_model

        return resolve_model(self.config.model.name)

    def base_config(self) -> dict[str, Any]:
        """The base model's ``config.json`` as a dict."""
        if "base_config" not in self._cache:
            from transformers import AutoConfig

            from .models import pretrained_kwargs

            try:
                cfg = AutoConfig.from_pretrained(self.base_model, **pretrained_kwargs(self.config.model))
            except (OSError, ValueError) as exc:
                raise SftError(f"model.name: cannot read the config of '{self.config.model.name}': {exc}") from None
            self._cache["base_config"] = cfg.to_dict()
        return self._cache["base_config"]

    def base_local_dir(self) -> Path | None:
        """The folder holding the base weights (a local path or the hub cache), or None when not on disk."""
        path = Path(self.base_model)
        if path.is_dir():
            return path
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(self.base_model, revision=self.config.model.revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the estimate falls back to the config
            return None

    def parameter_count(self) -> int:
        """Parameters of the base model, from its weight headers (nothing is loaded)."""
        if "params" in self._cache:
            return self._cache["params"]
        count = 0
        local = self.base_local_dir()
        if local is not None and self.config.model.gguf_file:
            count = sum(_elements(shape) for _type, shape in
                        read_gguf_header(local / self.config.model.gguf_file)[1].values())
        elif local is not None and list(local.glob("*.safetensors")):
            count = _safetensors_params(sorted(local.glob("*.safetensors")))
        if not count:
            c = self.base_config()
            h, layers, vocab = c.get("hidden_size", 0), c.get("num_hidden_layers", 0), c.get("vocab_size", 0)
            count = vocab * h * 2 + layers * (4 * h * h + 3 * h * c.get("intermediate_size", 4 * h))
        self._cache["params"] = count
        return count

    # -- tokenizer and template --------------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path:
        """Where the run's tokenizer lives: the adapter folder (it carries the template's chat_template).

        Before training, the base model's folder (when it is on disk).
        """
        if self.before_training:
            return self.base_local_dir() or Path(self.base_model)
        return self.adapter_dir

    @property
    def tokenizer(self) -> Any:
        """The run's tokenizer, with the template's Jinja as its ``chat_template``."""
        if "tokenizer" not in self._cache:
            from transformers import AutoTokenizer

            check_model_folder(self.tokenizer_dir)
            try:
                tok = AutoTokenizer.from_pretrained(str(self.tokenizer_dir),
                                                    trust_remote_code=bool(self.config.model.trust_remote_code))
            except (OSError, ValueError) as exc:
                raise SftError(f"{self.tokenizer_dir}: cannot load the run's tokenizer: {exc}") from None
            tok.chat_template = self.template.jinja(tok)
            self._cache["tokenizer"] = tok
        return self._cache["tokenizer"]

    def tokenizer_problems(self) -> list[str]:
        """Missing tokenizer files in the adapter folder (checked before any work)."""
        d = self.tokenizer_dir
        if self.before_training:
            # Training loads (and fails on) the base tokenizer itself; only a folder on disk can be checked here.
            if not d.is_dir() or self.config.model.gguf_file:
                return []
        elif not d.is_dir():
            return [f"{d}: the run has no adapter folder; train first (sft run) or point sft export at a finished run"]
        if not (d / "tokenizer_config.json").is_file():
            return [f"{d}: missing tokenizer_config.json (the training core saves the tokenizer next to the adapter)"]
        if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return [f"{d}: missing tokenizer files (tokenizer.json, tokenizer.model or vocab.json)"]
        try:
            check_model_folder(d)  # a received run's adapter/: its tokenizer and weights, before any work
        except SftError as exc:
            return [str(exc)]
        return []

    @property
    def eot_token(self) -> str:
        """The template's end-of-turn token (its first stop token)."""
        stops = self.template.stop_tokens(self.tokenizer)
        if not stops:
            raise SftError(f"chat template '{self.template.name}' declares no stop tokens")
        return stops[0]

    def verify_prompt(self, text: str | None = None) -> str:
        """The generation prompt (template-rendered) used to check exports.

        Default: ``training.generation_prompt``, else the run's own quick-generation prompt
        (a question the model was trained to answer, so its greedy tokens are confident and
        a quantized file can be held to the same tokens), else a fixed question.
        """
        ran = (self.run_dir.read_summary().get("generation") or {}).get("prompt")
        question = text or self.config.training.generation_prompt or ran or DEFAULT_VERIFY_PROMPT
        return self.template.generation_prompt([Message("user", question)], self.tokenizer)

    def stop_token_ids(self) -> set[int]:
        """Ids of the template's stop tokens (and the tokenizer's EOS): where generation ends."""
        ids = {self.tokenizer.convert_tokens_to_ids(t) for t in self.template.stop_tokens(self.tokenizer)}
        ids.add(self.tokenizer.eos_token_id)
        return {i for i in ids if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id}

    def save_tokenizer(self, path: str | Path) -> None:
        """Save the run's tokenizer (template chat_template included) into ``path``."""
        self.tokenizer.save_pretrained(str(path))

    # -- disk ----------------------------------------------------------------------------------
    def disk_problem(self, expected_bytes: int, what: str) -> str | None:
        """Reserve ``expected_bytes`` on the run's filesystem; a message when they will not fit.

        Reservations add up across preflights, so two exporters that each fit alone but not
        together are caught before either starts.
        """
        self._reserved_bytes += int(expected_bytes)
        free = shutil.disk_usage(self.run_dir.root if self.run_dir.root.exists() else Path.cwd()).free
        needed = int(self._reserved_bytes * DISK_MARGIN)
        if needed > free:
            return (f"not enough free disk for {what}: about {_gb(expected_bytes)} needed "
                    f"({_gb(needed)} for all selected exports with a 10% margin), {_gb(free)} free on "
                    f"{self.run_dir.root}")
        return None

    def adapter_problems(self) -> list[str]:
        """Missing adapter files (none are expected before training)."""
        if self.before_training or self.is_full_model:
            return []
        problems = []
        if not (self.adapter_dir / "adapter_config.json").is_file():
            problems.append(f"{self.adapter_dir}: no adapter_config.json; the run has no LoRA adapter")
        if not any((self.adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            problems.append(f"{self.adapter_dir}: no adapter_model.safetensors; the run has no LoRA weights")
        return problems

def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# -- running ------------------------------------------------------------------------------------
def preflight_exporters(context: RunExportContext, names: Sequence[str]) -> dict[str, list[str]]:
    """Every problem each exporter can see before work starts: name -> messages (empty when fine)."""
    from sft.core.config import plugin_options

    problems: dict[str, list[str]] = {}
    for name in names:
        exporter: Exporter = context.pm.get("exporter", name, "export.enabled")
        options = plugin_options(context.config, "exporter", name, context.pm)
        found: list[str] = []
        try:
            reason = exporter.unsupported_reason(context.env, options)
            found = [reason] if reason else list(exporter.preflight(context, options))
        except SftError as exc:
            found = [str(exc)]
        except Exception as exc:  # noqa: BLE001 - a broken preflight fails its exporter, not the run
            found = [f"preflight raised {type(exc).__name__}: {exc}"]
        problems[name] = found
    return problems


def preflight_before_training(cfg: "DictConfig", run_dir: str | Path | RunDir, pm: "PluginManager",
                              template: ChatTemplate) -> None:
    """Check ``cfg.export.enabled`` before training starts; raise one :class:`SftError` listing every problem.

    The training core calls this before the model weights load, so an export that cannot
    work (architecture, missing llama-cpp-python, disk, CPU-only ``merged_4bit`` ...) stops
    the run in seconds instead of after training. The full preflight runs again after
    training, with the adapter on disk.
    """
    names = list(cfg.export.enabled)
    if not names:
        return
    context = RunExportContext(run_dir, cfg, pm, template, before_training=True)
    try:
        problems = preflight_exporters(context, names)
    finally:
        context._cache.clear()
    lines = [f"  - {name}: {p}" for name, found in problems.items() for p in found]
    if lines:
        raise SftError("export.enabled: these exports cannot work, so training did not start (fix them, "
                       "or drop the exporter and run sft export later):\n" + "\n".join(lines))


def _result_json(result: ExportResult, seconds: float) -> dict[str, Any]:
    return {"ok": result.ok, "paths": result.paths, "details": result.details, "error": result.error,
            "seconds": round(seconds, 2)}


def _describe(result: ExportResult, seconds: float) -> str:
    if not result.ok:
        return f"export {result.exporter}: FAILED after {seconds:.1f}s: {result.error}"
    size = sum(dir_size(p) for p in result.paths if Path(p).exists())
    line = f"export {result.exporter}: ok, {len(result.paths)} path(s), {_gb(size)}, {seconds:.1f}s"
    verify = result.details.get("verify")
    if isinstance(verify, dict) and "summary" in verify:
        line += f"; verify: {verify['summary']}"
    return line


def _run(context: RunExportContext, names: Sequence[str], publishing: Publishing) -> list[ExportResult]:
    from sft.core.config import plugin_options

    if not names:
        return []
    problems = preflight_exporters(context, names)
    for name, found in problems.items():
        for p in found:
            notice(f"export {name}: preflight: {p}")
    results: list[ExportResult] = []
    for name in names:
        start = time.perf_counter()
        if problems[name]:
            result = ExportResult(name, ok=False, error="preflight: " + "; ".join(problems[name]))
        else:
            exporter = context.pm.get("exporter", name)
            options = plugin_options(context.config, "exporter", name, context.pm)
            notice(f"export {name}: starting")
            try:
                result = exporter.export(context, options)
                if not isinstance(result, ExportResult):
                    raise TypeError(f"exporter '{name}' returned {type(result).__name__}, not ExportResult")
            except SftError as exc:
                result = ExportResult(name, ok=False, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one exporter's crash must not lose the others
                mapped = as_user_error(exc)  # a path that is not writable or not a folder: one line, no traceback
                if mapped is None:
                    print(traceback.format_exc(limit=-3), file=sys.stderr)
                result = ExportResult(name, ok=False, error=str(mapped) if mapped else f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - start
        results.append(result)
        context.run_dir.update_summary(exports={name: _result_json(result, seconds)})
        notice(_describe(result, seconds))
        if result.ok:
            publishing.publish(context, result)  # records a failure and never raises
    return results


def run_exporters(cfg: "DictConfig", run_dir: str | Path | RunDir, pm: "PluginManager",
                  template: ChatTemplate) -> list[ExportResult]:
    """Run ``cfg.export.enabled`` on a finished run (the adapter is already saved) and publish each
    export as it is written. Never raises for an exporter's or a publisher's failure."""
    context = RunExportContext(run_dir, cfg, pm, template)
    try:
        publishing = Publishing(cfg, pm)
        publishing.start(context)
        return _run(context, list(cfg.export.enabled), publishing)
    finally:
        context.close()


def export_run(run_dir: str | Path, exporters: Sequence[str], overrides: Sequence[str] = (),
               pm: "PluginManager | None" = None, trust_remote_code: bool = False) -> list[ExportResult]:
    """``sft export RUN_DIR --exporter X [key=value ...]``: export a finished run from its adapter on disk.

    The run's ``config.yaml`` plus ``overrides`` is validated like any config (unknown
    exporters and options get a did-you-mean); ``exporters`` replaces ``export.enabled``.
    What that config cannot choose alone (remote code, a public repo) is in
    :func:`~sft.engine.configuration.load_run_config`; ``trust_remote_code`` is ``--trust-remote-code``.
    """
    rd = RunDir.of(run_dir)
    rd.refuse_links()
    if not rd.adapter.is_dir() and rd.config.is_file():
        raise SftError(f"{rd.adapter}: missing; the run has no saved adapter (did training finish?)")
    pm = pm or get_plugin_manager()
    cfg = _run_config(rd, overrides, pm, flags={"export.enabled": list(exporters)}, trust_remote_code=trust_remote_code)
    return run_exporters(cfg, rd, pm, resolve_template(cfg, pm))


def _run_config(rd: RunDir, overrides: Sequence[str], pm: "PluginManager", flags: dict | None = None,
                **trust: bool) -> "DictConfig":
    """A finished run's ``config.yaml`` plus ``overrides`` (:func:`~sft.engine.configuration.load_run_config`)."""
    from .configuration import load_run_config
    from .libraries import quiet_known_warnings, quiet_progress_bars

    # As quiet as `sft run`, whose exports print exactly these lines.
    quiet_known_warnings()
    quiet_progress_bars()
    if not rd.config.is_file():
        raise SftError(f"{rd.root}: no config.yaml; is this a run directory written by sft run?")
    return load_run_config(rd.config, overrides=list(overrides), flags=flags, pm=pm, **trust)


def publish_run(run_dir: str | Path, to: str, exporters: Sequence[str] = (), overrides: Sequence[str] = (),
                pm: "PluginManager | None" = None) -> dict[str, dict[str, Any]]:
    """``sft publish RUN_DIR --to NAME [--exporter X] [key=value ...]``: the run's exports on disk
    (every finished one, or ``exporters``) to the publisher ``to``, without exporting again.

    Returns exporter name -> the record written to ``summary.json`` (``publish.<to>.exports``).
    Raises :class:`SftError` when the publisher cannot start or nothing can be published.
    """
    pm = pm or get_plugin_manager()
    rd = RunDir.of(run_dir)
    rd.refuse_links()
    cfg = _run_config(rd, overrides, pm, loads_model=False)
    pm.get("publisher", to, "sft publish --to")
    exports = rd.read_summary().get("exports") or {}
    names = list(exporters) or [name for name, entry in exports.items() if entry.get("ok")]
    problems = []
    for name in names:
        if name not in pm.registry("exporter"):
            problems.append(f"'{name}' is not an exporter here; available: {', '.join(sorted(pm.registry('exporter')))}")
        elif not (exports.get(name) or {}).get("ok"):
            problems.append(f"{name}: no finished export in {rd.root} (run sft export {rd.root} --exporter {name} first)")
        else:
            try:  # every file is the run's own, before a publisher starts: nothing is sent otherwise
                rd.export_files(exports[name].get("paths") or [])
            except SftError as exc:
                problems.append(str(exc))
    if not names:
        problems.append(f"{rd.root} has no finished exports to publish (summary.json lists none)")
    if problems:
        raise SftError(f"sft publish --to {to}: " + "; ".join(problems))
    context = RunExportContext(rd, cfg, pm, resolve_template(cfg, pm))
    try:
        publishing = Publishing(cfg, pm, [to])
        failed = publishing.start(context)
        if failed:
            raise SftError(f"sft publish --to {to}: {failed[to]}")
        return {name: publishing.publish(context, ExportResult.from_summary(name, exports[name]))[to] for name in names}
    finally:
        context.close()
