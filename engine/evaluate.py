"""``sft eval RUN``: score the run's 16-bit model and each of its GGUF quants on the same lm-eval tasks.

1. Tasks: names of lm-eval tasks (the ones shipped with sft in ``engine/assets/eval/``, lm-eval's
   own, whose datasets come from the Hugging Face Hub) or paths of task YAML files in lm-eval's
   format. All are resolved before any model loads, so a typo fails in seconds.
2. Models: the run's own model (``run``: the base with the run's adapter, as ``sft generate``
   loads it, float32 on CPU), scored with lm-eval's ``hf`` model; then what the exporters wrote
   into ``exports/`` (:meth:`~sft.core.interfaces.Exporter.eval_models`: ``merged_16bit``'s folder,
   each ``gguf`` quant scored with llama.cpp in a worker process ...); with ``--base``, the base
   model too. Every model is prompted through the chat template the run trained with
   (lm-eval's ``apply_chat_template``).
3. Parity: for each exported model, every metric's difference from the run's model; a drop
   larger than ``eval.max_drop`` (default 0.05, five points of accuracy) is a failure, as is
   an export that cannot be scored. ``sft eval`` then exits 1.
4. ``eval.json`` in the run directory holds everything (a table per task and model, the parity
   rows); ``summary.json`` gets its verdict; the enabled loggers get the metrics.

``eval.after_export: [tasks]`` runs this at the end of ``sft run`` (:func:`evaluate_after_training`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sft.core.errors import ConfigError, ConfigProblem, SftError, UnknownPluginError, did_you_mean
from .metrics import eval_number as _num
from .metrics import print_eval
from sft.core.notices import notice
from sft.core.rundir import RunDir, atomic_write_text

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.interfaces import ChatTemplate
    from sft.core.plugins import PluginManager

__all__ = ["TASKS_DIR", "EVAL_EXTRA_INSTALL", "REFERENCE", "evaluate_run", "evaluate_after_training",
           "preflight_eval", "resolve_tasks", "run_lm_eval", "score_hf", "score_hf_folder", "parity_rows", "print_eval"]

#: The tasks shipped with sft (YAML in lm-eval's format + their JSONL data).
TASKS_DIR = Path(__file__).resolve().parent / "assets" / "eval"
EVAL_EXTRA_INSTALL = "pip install 'sft-forge[eval]' (lm-eval, the lm-evaluation-harness)"
#: The label of the run's own model (base + adapter), the reference of every parity row.
REFERENCE = "run"
BASE = "base"
EVAL_FILE = "eval.json"


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise SftError(f"sft eval runs lm-evaluation-harness, which is not installed: {EVAL_EXTRA_INSTALL}")


# -- tasks ------------------------------------------------------------------------------------
def _task_manager(tasks: Sequence[str] = ()) -> Any:
    """lm-eval's task index: sft's tasks, plus lm-eval's own (about 15,000, 11 s to index on 2 cores)
    only when a task is neither sft's nor a file."""
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notes (e.g. on custom_dataset) are not for users
    full = any(not _is_file_task(t) and not (TASKS_DIR / f"{t}.yaml").is_file() for t in tasks) or not tasks
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=full)


def _is_file_task(task: str) -> bool:
    return str(task).endswith((".yaml", ".yml"))


def resolve_tasks(tasks: Sequence[str], task_manager: Any = None) -> list[str]:
    """Task names, or absolute paths of task YAML files, checked against lm-eval's index.

    Raises :class:`SftError` naming every unknown task (with a did-you-mean) or missing file.
    """
    _require_lm_eval()
    if not tasks:
        raise SftError("no tasks to evaluate: name some with --tasks (e.g. --tasks sft_identity,sft_knowledge)")
    tm = task_manager or _task_manager(tasks)
    known = set(tm.all_tasks)
    resolved, problems = [], []
    for task in tasks:
        task = str(task).strip()
        if _is_file_task(task):
            path = Path(task).expanduser()
            if not path.is_file():
                problems.append(f"task file not found: {task}")
            else:
                resolved.append(str(path.resolve()))
        elif task in known:
            resolved.append(task)
        else:
            problems.append(f"unknown task '{task}'{did_you_mean(task, known)}; sft ships sft_identity and "
                            f"sft_knowledge, a .yaml path is a task file in lm-eval's format, and `lm-eval ls tasks` "
                            f"lists lm-eval's own")
    if problems:
        raise ConfigError([ConfigProblem("--tasks", problem) for problem in problems])
    return resolved


def _load_tasks(tm: Any, tasks: Sequence[str]) -> None:
    """Build every task once (their datasets load here), so a hub task without network fails before any model."""
    for task in tasks:
        try:
            tm.load([task])
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types; the message says what
            hub = "" if _is_file_task(task) or Path(TASKS_DIR, f"{task}.yaml").is_file() else (
                " Its dataset comes from the Hugging Face Hub: it needs the network, or a copy in the datasets cache"
                " (HF_DATASETS_CACHE).")
            raise SftError(f"task '{task}' cannot be loaded: {type(exc).__name__}: {exc}.{hub}") from None


def run_lm_eval(lm: Any, tasks: Sequence[str], limit: int | None, torch_seed: bool = True,
                task_manager: Any = None) -> dict[str, dict[str, Any]]:
    """lm-eval's ``simple_evaluate`` of ``lm`` on ``tasks``, chat template applied; task -> metric -> value.

    Metric names lose lm-eval's ``,none`` filter suffix (other filters stay: ``exact_match,strict-match``);
    ``samples`` is how many examples were scored.
    """
    from unittest import mock

    from lm_eval import evaluator

    kwargs = {} if torch_seed else {"torch_random_seed": None}  # the llama.cpp worker never imports torch
    # lm-eval's environment report runs torch's collect_env (pip, conda and nvidia-smi in subprocesses:
    # 5 s of CPU, 65 s of wall time on a busy 2-core machine) for every model; eval.json has no use for it.
    # Nor for its git_hash: it asks git with git's stderr left on ours, and outside a repository
    # every `sft eval` printed "fatal: not a git repository".
    with mock.patch.object(evaluator, "add_env_info", lambda results: None), \
            mock.patch.object(evaluator, "get_git_commit_hash", lambda: None):
        out = evaluator.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, apply_chat_template=True,
                                        task_manager=task_manager or _task_manager(tasks), log_samples=False,
                                        bootstrap_iters=1000, **kwargs)
    if out is None:
        raise SftError("lm-eval returned no results")
    samples = out.get("n-samples") or {}
    results: dict[str, dict[str, Any]] = {}
    for task, values in out["results"].items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = key[:-len(",none")] if key.endswith(",none") else key
            row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        if task in samples:
            row["samples"] = int(samples[task].get("effective", samples[task].get("original", 0)))
        results[task] = row
    return results


# -- models -------------------------------------------------------------------------------------
def score_hf(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | None, task_manager: Any = None) -> dict[str, Any]:
    """lm-eval's ``hf`` model (``HFLM``) around a loaded transformers ``model``; see :func:`run_lm_eval`."""
    from lm_eval.models.huggingface import HFLM

    model.eval()
    device = next(model.parameters()).device.type
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device=device)
    return run_lm_eval(lm, tasks, limit, task_manager=task_manager)


def score_hf_folder(path: str | Path, tasks: Sequence[str], limit: int | None,
                    trust_remote_code: bool = False) -> dict[str, Any]:
    """:func:`score_hf` of the HF model folder ``path`` (weights and tokenizer), loaded in float32;
    ``trust_remote_code`` for a model with its own code (the run's ``model.trust_remote_code``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_files import check_model_folder

    check_model_folder(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code)
    return score_hf(model, AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code), tasks, limit)


def _base_model(cfg: "DictConfig", tokenizer: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from .models import pretrained_kwargs, resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name), dtype=torch.float32,
                                                 **pretrained_kwargs(cfg.model))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # the run's template added its end-of-turn token
    return model


def _exported_models(context: Any, exporters: Sequence[str] | None) -> list[Any]:
    """What each exporter (``exporters``, default: every one with a folder under ``exports/``) offers to score."""
    pm, run = context.pm, context.run_dir
    registered = sorted(pm.registry("exporter"))
    present = [name for name in registered if run.export_dir(name).is_dir()]
    names = present if exporters is None else list(exporters)
    models = []
    for name in names:
        if name not in registered:
            raise UnknownPluginError("exporter", name, registered, "--exporter")
        offered = pm.get("exporter", name).eval_models(context) if run.export_dir(name).is_dir() else []
        if not offered and exporters is not None:
            raise SftError(f"{run.root} has no '{name}' export that sft eval can score; write it with: "
                           f"sft export {run.root} --exporter {name}")
        models += offered
    return models


# -- parity --------------------------------------------------------------------------------------
def parity_rows(models: Mapping[str, Any], max_drop: float, reference: str = REFERENCE) -> list[dict[str, Any]]:
    """For each exported model and each task metric of the reference: the values, their difference and the verdict.

    A row fails when the export's value is lower than the reference's by more than ``max_drop``
    (every sft and lm-eval multiple-choice metric is higher-is-better), or when it has no value.
    """
    ref = (models.get(reference) or {}).get("results") or {}
    rows = []
    for label, record in models.items():
        if record.get("kind") != "export":
            continue
        for task, metrics in ref.items():
            for metric, value in metrics.items():
                if metric == "samples" or "_stderr" in metric or value is None:
                    continue
                got = ((record.get("results") or {}).get(task) or {}).get(metric)
                diff = None if got is None else round(got - value, 6)
                rows.append({"model": label, "task": task, "metric": metric, "reference": value, "value": got,
                             "diff": diff, "ok": diff is not None and -diff <= max_drop + 1e-9})
    return rows


# -- the command ----------------------------------------------------------------------------------
def preflight_eval(cfg: "DictConfig") -> None:
    """Before training: ``eval.after_export`` can run (lm-eval installed, tasks known, llama.cpp for GGUFs)."""
    tasks = list(cfg.eval.after_export)
    if not tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise SftError(f"eval.after_export: sft eval runs lm-evaluation-harness, which is not installed: "
                       f"{EVAL_EXTRA_INSTALL}; or drop eval.after_export")
    resolve_tasks(tasks)


def evaluate_run(run_dir: str | Path, tasks: Sequence[str] | None = None, exporters: Sequence[str] | None = None,
                 limit: int | None = None, base: bool = False, overrides: Sequence[str] = (),
                 pm: "PluginManager | None" = None, hub: Any = None, cfg: "DictConfig | None" = None,
                 template: "ChatTemplate | None" = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """``sft eval``: score the run's models, write ``eval.json``, return its content (``ok`` is the verdict).

    ``tasks`` defaults to ``eval.tasks``, ``limit`` to ``eval.limit``; ``exporters`` (default:
    every exporter with a folder under ``exports/``) picks the exported models; the run's own
    model is always scored, as the reference. ``hub``: an open
    :class:`~sft.engine.metrics.MetricsHub` to log to (``sft run``); else the enabled loggers are
    started for this evaluation. ``cfg`` and ``template``: the run's, when the caller (``sft run``)
    already holds them; else read from the run directory, which chooses neither remote code
    (``trust_remote_code``: ``--trust-remote-code``) nor a task file (it can run Python): those
    must come from the command line.
    """
    from .configuration import given_on_command_line, load_run_config
    from sft.core.templating import resolve_template

    from .export import RunExportContext

    run = RunDir.of(run_dir)
    run.refuse_links()
    if not run.config.is_file():
        raise SftError(f"{run.root}: no config.yaml; is this a run directory written by sft run?")
    if not run.adapter.is_dir():
        raise SftError(f"{run.adapter}: missing; the run has no trained model yet (train first: sft run)")
    _require_lm_eval()
    from .libraries import quiet_known_warnings

    quiet_known_warnings()
    if pm is None:
        from sft.core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    if cfg is None:
        cfg = load_run_config(run.config, overrides=list(overrides), pm=pm, trust_remote_code=trust_remote_code)
        files = [] if tasks or given_on_command_line(overrides, "eval.tasks") else \
            [t for t in cfg.eval.tasks if _is_file_task(t)]
        if files:
            raise SftError(f"eval.tasks: {run.config} names the task file {files[0]}, and a task file can run its own "
                           f"Python (!function); if you trust it, name it yourself: --tasks {','.join(files)}")
    if template is None:
        template = resolve_template(cfg, pm)
    tasks = list(tasks) if tasks else list(cfg.eval.tasks)
    limit = limit if limit is not None else cfg.eval.limit
    max_drop = float(cfg.eval.max_drop)
    started = time.perf_counter()

    tick = time.perf_counter()
    tm = _task_manager(tasks)
    specs = resolve_tasks(tasks, tm)
    context = RunExportContext(run, cfg, pm, template)
    exported = _exported_models(context, exporters)
    _load_tasks(tm, specs)
    if not exported and exporters is None:
        notice(f"no export in {run.root}/exports that sft eval can score: scoring the run's model alone; "
             f"sft export {run.root} --exporter gguf writes quants to compare with it")
    notice(f"eval: tasks {', '.join(tasks)}" + (f", at most {limit} examples each" if limit else "")
         + f" (loaded in {time.perf_counter() - tick:.1f}s)")

    models: dict[str, dict[str, Any]] = {}

    def record_score(label: str, kind: str, source: str, score: Any) -> None:
        tick = time.perf_counter()
        try:
            models[label] = {"kind": kind, "source": source, "results": score()}
            notice(f"eval {label}: {_brief(models[label]['results'])} ({time.perf_counter() - tick:.1f}s)")
        except SftError as exc:
            if kind != "export":
                raise
            models[label] = {"kind": kind, "source": source, "error": str(exc)}
            notice(f"eval {label}: FAILED: {exc}")
        models[label]["seconds"] = round(time.perf_counter() - tick, 2)

    from .generate import load_run

    model, tokenizer, _template, _cfg = load_run(run.root, cfg, template, pm)
    record_score(REFERENCE, "run", f"{run.adapter} on {cfg.model.name}",
                 lambda: score_hf(model, tokenizer, specs, limit, tm))
    if base:
        del model
        model = _base_model(cfg, tokenizer)
        record_score(BASE, "base", f"{cfg.model.name} (the run's template)",
                     lambda: score_hf(model, tokenizer, specs, limit, tm))
    del model
    try:
        for offered in exported:
            record_score(offered.label, "export", offered.source, lambda: offered.score(specs, limit))
    finally:
        context.close()

    parity = parity_rows(models, max_drop)
    failures = [f"{label}: {record['error']}" for label, record in models.items() if "error" in record]
    failures += [f"{r['model']} {r['task']} {r['metric']}: {_num(r['value'])} vs {_num(r['reference'])} "
                 f"({REFERENCE}), a drop of {_num(-(r['diff'] or 0))} > eval.max_drop={max_drop}"
                 for r in parity if not r["ok"] and r["diff"] is not None]
    record = {
        "ok": not failures,
        "tasks": tasks,
        "limit": limit,
        "max_drop": max_drop,
        "reference": REFERENCE,
        "chat_template": cfg.template.name,
        "models": models,
        "parity": parity,
        "failures": failures,
        "lm_eval_version": _version("lm_eval"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(run.root / EVAL_FILE, json.dumps(record, indent=2) + "\n")
    run.update_summary(eval={"ok": record["ok"], "path": str(run.root / EVAL_FILE), "tasks": tasks,
                             "failures": failures, "seconds": record["seconds"]})
    _log(record, run, cfg, pm, hub)
    return record


def _log(record: Mapping[str, Any], run: RunDir, cfg: "DictConfig", pm: "PluginManager", hub: Any) -> None:
    """Every metric to the loggers as ``eval/<model>/<task>/<metric>``, at the run's last step."""
    metrics = {f"eval_{label}/{task}/{metric}": value
               for label, model in record["models"].items()
               for task, values in (model.get("results") or {}).items()
               for metric, value in values.items() if isinstance(value, (int, float))}
    step = int(run.read_summary().get("steps") or 0)
    if hub is not None:
        hub.log(step, metrics)
        return
    names = [name for name in cfg.loggers.enabled]
    if not names or not metrics:
        return
    from omegaconf import OmegaConf

    from sft.core.interfaces import RunInfo
    from .metrics import MetricsHub

    hub = MetricsHub.for_config(run.root, cfg, pm)
    hub.start(RunInfo(name=run.root.name, run_dir=str(run.root), config=OmegaConf.to_container(cfg, resolve=True)))
    hub.log(step, metrics)
    hub.finish(run.read_summary())


def evaluate_after_training(cfg: "DictConfig", run: RunDir, pm: "PluginManager", hub: Any,
                            template: "ChatTemplate", in_subprocess: bool = False) -> None:
    """``eval.after_export``: ``sft eval`` at the end of ``sft run``; a failure is recorded, never raised."""
    tasks = list(cfg.eval.after_export)
    if in_subprocess:
        import subprocess
        import sys

        trust = ["--trust-remote-code"] * bool(cfg.model.trust_remote_code)  # this run's own config chose it
        code = subprocess.run([sys.executable, "-m", "sft.cli", "eval", str(run.root), "--tasks", ",".join(tasks),
                               *trust]).returncode
        if code not in (0, 1):
            run.update_summary(eval={"ok": False, "failures": [f"sft eval stopped with exit status {code}"]})
        return
    try:
        record = evaluate_run(run.root, tasks, pm=pm, hub=hub, cfg=cfg, template=template)
        print_eval(record)
    except Exception as exc:  # noqa: BLE001 - the trained run and its exports are on disk; say so and go on
        if not isinstance(exc, SftError):
            import traceback

            traceback.print_exc()
        message = str(exc) if isinstance(exc, SftError) else f"{type(exc).__name__}: {exc}"
        notice(f"eval: FAILED: {message}; retry with: sft eval {run.root} --tasks {','.join(tasks)}")
        run.update_summary(eval={"ok": False, "tasks": tasks, "failures": [message]})


# -- output ------------------------------------------------------------------------------------
def _brief(results: Mapping[str, Mapping[str, Any]]) -> str:
    return ", ".join(f"{task} {metric} {_num(values[metric])}" for task, values in results.items()
                     for metric in list(values)[:1] if metric != "samples")


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None
