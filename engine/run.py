"""``sft run``: one training run, from a validated config to a finished run directory.

The order matters and is what makes a run safe to interrupt or to fail late:

1. the run directory (``training.output_dir``, else ``runs/<run_name or timestamp>``) and
   its resolved ``config.yaml``; with ``--resume``, the last *complete* checkpoint in it;
2. the backend (``model.backend``; ``auto`` picks the available one with the highest
   priority: Unsloth on CUDA, transformers + PEFT elsewhere);
3. tokenizer and data (:mod:`sft.engine.data`): every data error surfaces before the model
   weights load;
4. model + LoRA from the backend, then TRL's SFTTrainer (:mod:`sft.engine.trainer`) with the
   pre-tokenized rows: labels are built from the ``assistant_masks`` column, so only
   trained tokens get labels;
5. metrics to ``metrics.jsonl`` and the enabled loggers at every logging step;
6. ``adapter/`` (PEFT adapter + tokenizer carrying the template's chat_template), then
   ``loss.png``, the quick generation and ``summary.json``, so the result is on disk
   before any exporter starts;
7. the exporters in ``export.enabled``;
8. with ``eval.after_export``, ``sft eval`` on those tasks (:mod:`sft.engine.evaluate`).
"""

from __future__ import annotations

import contextlib
import math
import pickle
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed
from .backends import select_backend
from sft.core.errors import SftError, refused_pickle
from sft.core.notices import notice
from sft.core.rundir import RunDir, atomic_write_text, remove_inside, staged_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.plugins import PluginManager

__all__ = ["run_training", "resolve_run_dir"]

# -- the run directory ----------------------------------------------------------------------
def resolve_run_dir(cfg: "DictConfig", resume: bool = False, runs_root: str | Path = "runs") -> RunDir:
    """Where this run lives: ``training.output_dir``, else ``runs/<run_name>``, else ``runs/<timestamp>``.

    With ``resume`` and neither set, the one unfinished run under ``runs/`` whose config this
    config may resume (:func:`sft.engine.resume.find_resumable`); none or several is an error.
    """
    t = cfg.training
    if t.output_dir:
        return RunDir.of(Path(t.output_dir).expanduser())
    root = Path(runs_root)
    if t.run_name:
        return RunDir.of(root / str(t.run_name))
    if resume:
        from .resume import find_resumable

        chosen = find_resumable(root, cfg)
        notice(f"--resume: continuing the one unfinished run with this config, {chosen.root}")
        return chosen
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return RunDir.of(path)


def _check_fresh(run: RunDir, clean: bool = True) -> None:
    """A new (non-resumed) run must not overwrite a previous run's results.

    Checkpoints that are all incomplete (a run killed while saving its first one) hold nothing
    to resume, so a new run may start over there: they are removed, and the records of that
    earlier run are moved aside (:func:`_move_aside_earlier_run`); both when ``clean``: by rank
    0 of a distributed run, with a notice.
    """
    from . import checkpoints

    if run.adapter.exists() and any(run.adapter.iterdir()):
        raise SftError(f"{run.root} already holds a finished run's adapter/; choose another directory "
                       f"(--output or training.run_name)")
    if checkpoints.last_complete(run.checkpoints) is not None:
        raise SftError(f"{run.root} already holds a run (checkpoints/); continue it with --resume, "
                       f"or choose another directory (--output or training.run_name)")
    if not clean:
        return
    leftovers = checkpoints.scan(run.checkpoints)
    if leftovers:
        notice(f"{run.checkpoints} holds only incomplete checkpoint(s) ({', '.join(c.path.name for c in leftovers)}), "
               f"which cannot be resumed; starting this run over")
        remove_inside(run.root, run.checkpoints)
    _move_aside_earlier_run(run)


def _move_aside_earlier_run(run: RunDir) -> None:
    """A fresh run where an earlier one failed or was killed starts its own ``metrics.jsonl`` and
    ``summary.json`` (appending would record its steps twice): the earlier run's records move to
    ``previous/<n>/``, so nothing of it is lost."""
    earlier = [p for p in (run.metrics, run.summary_path, run.loss_plot, run.config) if p.is_file()]
    if not any(p != run.config for p in earlier):
        return  # no run recorded anything here: a config.yaml alone is written again
    try:
        status = run.read_summary().get("status") or "unknown"
    except (OSError, ValueError):
        status = "unreadable summary.json"
    n = 1
    while (run.root / "previous" / str(n)).exists():
        n += 1
    target = run.root / "previous" / str(n)
    target.mkdir(parents=True)
    for p in earlier:
        p.rename(target / p.name)
    notice(f"{run.root} holds an earlier run that did not finish (status {status}); its "
           f"{', '.join(p.name for p in earlier)} moved to {target}, and this run starts new ones")


# -- the run ----------------------------------------------------------------------------------
def _announce_setup(cfg: "DictConfig") -> None:
    """The run log names the preset in force and the loggers that are on, so neither surprises."""
    if cfg.get("preset"):
        from sft.core.presets import describe_preset

        notice(describe_preset(str(cfg.preset), cfg))
    enabled = list(cfg.loggers.enabled)
    line = f"loggers: {', '.join(enabled) or 'none'} (metrics.jsonl and loss.png are always written)"
    if "console" not in enabled:
        line += "; the console logger is off, so no progress or summary is printed (add --logger console)"
    notice(line)


def _save_adapter(model: Any, tokenizer: Any, run: RunDir, state_dict: Any = None, initial: Path | None = None) -> None:
    """Write ``adapter/`` whole (a crash never leaves half an adapter). ``state_dict``: the
    gathered weights of a sharded (FSDP) model; ``initial``: the adapter as it started, when
    it must be converted for the original base (:mod:`sft.engine.lora_init`). Only the trained
    adapter is written: a preference trainer's frozen reference copy (TRL's ``ref`` adapter) stays behind."""
    from .lora_init import forget_initial_adapter, save_adapter

    kwargs: dict[str, Any] = {"state_dict": state_dict} if state_dict is not None else {}
    if len(getattr(model, "peft_config", None) or {}) > 1:
        kwargs["selected_adapters"] = [model.active_adapter]
    with staged_dir(run.adapter) as tmp:
        save_adapter(model, tmp, initial, **kwargs)
        tokenizer.save_pretrained(tmp)
    forget_initial_adapter(initial)


def _objective_record(objective: Any, source: RunDir | None, cfg: "DictConfig") -> dict[str, Any]:
    """What ``summary.json`` says about the objective: its name, the run it continued (with that
    run's objective and dataset), its reference model, and one sentence for model cards."""
    record: dict[str, Any] = {"name": objective.name, "from_run": None, "reference": None}
    if objective.uses_reference:
        record["reference"] = f"{source.root} (its adapter, frozen)" if source is not None else "the base model"
    story = f"{objective.name} on `{cfg.data.dataset}`"
    if source is not None:
        from .configuration import read_yaml

        earlier = read_yaml(str(source.config))
        their_objective = (earlier.get("objective") or {}).get("name", "sft")
        their_data = (earlier.get("data") or {}).get("dataset")
        record["from_run"] = str(source.root)
        record["from_run_objective"] = their_objective
        record["from_run_dataset"] = their_data
        story += f", on top of the run `{source.root.name}` ({their_objective} on `{their_data}`)"
    record["description"] = story
    return record


def _objective_metrics(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """The last logged value of each of the objective's metrics, on train and (``eval_*``) on eval."""
    out = {}
    for key in keys:
        for name in (key, f"eval_{key}"):
            value = _last(records, name)
            if value is not None:
                out[name] = value
    return out


def _total_steps(cfg: "DictConfig", trainer: Any) -> int:
    """The optimizer steps the trainer will take, counted the way transformers' Trainer counts them:
    a last short batch is a batch, and a last short accumulation is a step, in every epoch."""
    t = cfg.training
    if t.max_steps > 0:
        return int(t.max_steps)
    plan = distributed.batch_plan(cfg)
    # Each rank reads every world_size-th batch (accelerate's even_batches pads the last round).
    batches = math.ceil(len(trainer.train_dataset) / (plan.per_device * plan.world_size))
    per_epoch = max(1, math.ceil(batches / plan.gradient_accumulation_steps))
    return math.ceil(per_epoch * float(t.num_train_epochs))


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(records):
        if key in record and isinstance(record[key], (int, float)):
            return float(record[key])
    return None


def run_training(cfg: "DictConfig", resume: bool = False, pm: "PluginManager | None" = None) -> Path:
    """Train as ``cfg`` says and return the run directory. See the module docstring for the stages.

    Raises :class:`SftError` (data, config, NaN loss, no checkpoint to resume) with a message
    that says what to change; the run directory keeps whatever was finished, and a run that
    stops before training (bad data, a model that cannot load) still gets a ``summary.json``
    with ``status: failed`` and the error, and the steps it trained.
    """
    from .stopping import Interrupted

    # "run": the run directory once this process (rank 0) writes in it; "steps": the step training reached.
    progress: dict[str, Any] = {"run": None, "steps": 0}
    try:
        return _run_training(cfg, resume, pm, progress)
    except BaseException as exc:
        run = progress["run"]
        if run is not None and "status" not in run.read_summary():
            stopped = isinstance(exc, (KeyboardInterrupt, Interrupted))
            run.update_summary(run_name=run.root.name, run_dir=str(run.root), model=cfg.model.name,
                               preset=cfg.get("preset"), status="interrupted" if stopped else "failed",
                               error=str(exc) or type(exc).__name__, steps=progress["steps"])
        raise


def _run_training(cfg: "DictConfig", resume: bool, pm: "PluginManager | None", progress: dict[str, Any]) -> Path:
    from sft.core.env import current_environment
    from .libraries import quiet_known_warnings

    quiet_known_warnings()  # before the backend: PEFT already trips one while attaching LoRA
    if pm is None:
        from sft.core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    from .publish import Publishing

    # A missing or refused token of a publisher fails here, before the run directory exists.
    Publishing(cfg, pm).preflight(list(cfg.export.enabled))
    started = time.perf_counter()

    env = current_environment()
    world = distributed.setup(cfg, env)  # one rank of a distributed run: join its process group
    run = distributed.broadcast(resolve_run_dir(cfg, resume))  # rank 0's choice (a timestamp differs)
    from .resume import run_lock
    from .stopping import sigterm_stops_training

    # Rank 0 holds the run directory; the other ranks of the same run work under its lock.
    lock = run_lock(run.root) if world.is_main else contextlib.nullcontext()
    with lock, sigterm_stops_training(cfg.training.stop_grace_seconds) as stop:
        return _train_in(run, cfg, resume, pm, stop, started, env, world, progress)


def _refused_file(checkpoint: Path) -> str:
    """The pickle file of ``checkpoint`` that ``torch.load(weights_only=True)`` refuses (the Trainer does
    not say which one it was loading), else the checkpoint itself."""
    import torch

    for path in sorted(checkpoint.iterdir()):
        if path.suffix in (".pt", ".pth", ".bin") and path.is_file():
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return str(path)
            except Exception:  # noqa: BLE001 - any other trouble is not the refusal being located
                continue
    return str(checkpoint)


def _resume_point(run: RunDir, cfg: "DictConfig", world_size: int = 1) -> Any:
    """The checkpoint ``--resume`` continues from, once :func:`~sft.engine.resume.check_resume` allows it."""
    from . import checkpoints
    from .resume import ResumeError, check_resume, run_name_of

    if not cfg.training.run_name:  # a resume found by its folder keeps the name the run was given
        cfg.training.run_name = run_name_of(run)
    changed = check_resume(run, cfg)
    last = checkpoints.last_complete(run.checkpoints, notify=notice, verify=True)
    if last is None:
        found = checkpoints.scan(run.checkpoints)
        what = (f"only {', '.join(c.path.name for c in found)}, which cannot be resumed (incomplete or damaged)"
                if found else "none at all")
        raise ResumeError(f"--resume: no complete checkpoint in {run.checkpoints} ({what}); nothing to resume, so "
                          f"run the same command without --resume to start this run over in {run.root}")
    distributed.check_resume(last.path, cfg, world_size)
    if changed:
        notice(f"--resume: the config differs from the run's config.yaml in {', '.join(changed)} "
               f"(logging, checkpointing, evaluation or exports only)")
    notice(f"resuming {run.root} from {last.path.name} (step {last.step})")
    return last


def _train_in(run: RunDir, cfg: "DictConfig", resume: bool, pm: "PluginManager", stop: Any, started: float,
              env: Any, world: Any, progress: dict[str, Any]) -> Path:
    from sft.core.config import config_to_yaml, shareable_container

    durations: dict[str, float] = {}
    resume_from = None
    if resume:
        resume_from = _resume_point(run, cfg, world.world_size)  # decided before anything in the run is written
    else:
        _check_fresh(run, clean=world.is_main)
    run.root.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        progress["run"] = run
        atomic_write_text(run.config, config_to_yaml(cfg))
        _announce_setup(cfg)

    from .backends import check_cuda_dependencies, check_method_hardware

    check_method_hardware(cfg, env)  # model.method=fp8 without FP8 tensor cores
    check_cuda_dependencies(cfg, env)  # a missing bitsandbytes stops the run before the data stage
    backend = select_backend(cfg, pm, env)
    if world.distributed:
        distributed.check_strategy(cfg, backend, env, world.world_size)
        notice(f"distributed: {world.world_size} process(es), {cfg.distributed.strategy}; "
               f"{distributed.batch_plan(cfg).describe()}")
        if cfg.distributed.num_processes not in (1, world.world_size):
            notice(f"distributed.num_processes={cfg.distributed.num_processes} is not used: "
                   f"the launcher started {world.world_size}")
    backend.prepare_environment()
    from .libraries import quiet_progress_bars

    quiet_progress_bars()
    if not env.cuda:
        notice(f"no CUDA GPU: training with the '{backend.name}' backend on CPU (float32, no gradient checkpointing)")

    # Data before weights: a bad row fails in seconds, not after the model loads.
    from .data import build_datasets, describe_stats
    from .models import load_tokenizer
    from sft.core.templating import resolve_template

    from sft.core.config import plugin_options

    objective = pm.get("objective", cfg.objective.name, "objective.name")
    objective_options = plugin_options(cfg, "objective", objective.name, pm)
    source = RunDir.of(Path(str(cfg.model.from_run)).expanduser()) if cfg.model.from_run else None

    tick = time.perf_counter()
    # A continued run's tokenizer is the one it saved: with any tokens it added.
    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(cfg, pm, tokenizer)
    if cfg.data.streaming:  # read as training goes (engine/data/streaming.py), which says what it does
        from .data.streaming import build_streaming

        data = build_streaming(cfg, pm, tokenizer, template=template, row_kind=objective.row_kind)
    else:
        with distributed.main_first():  # one process per node fills the data cache, the others read it
            data = build_datasets(cfg, pm, tokenizer, template=template, row_kind=objective.row_kind)
        notice(f"data: {describe_stats(data.stats)}")
    durations["data"] = time.perf_counter() - tick
    from .export import preflight_before_training

    preflight_before_training(cfg, run, pm, template)  # an export that cannot work stops the run before training
    from .evaluate import preflight_eval

    preflight_eval(cfg)  # so does an evaluation (eval.after_export) that cannot run

    tick = time.perf_counter()
    model, backend_tokenizer = backend.load(cfg)
    loaded_rows = model.get_input_embeddings().num_embeddings
    # Rows past the base vocabulary belong to added tokens, even where the embedding was padded beyond it.
    base_vocabulary = min(len(backend_tokenizer), loaded_rows)
    if loaded_rows < len(tokenizer):
        # The template's end-of-turn or pad token, or model.add_tokens, was added to the vocabulary.
        model.resize_token_embeddings(len(tokenizer))
    from .lora_init import remember_initial_adapter
    from .tokens import initialise_new_rows

    initial_adapter = None
    if source is not None and cfg.model.method != "full" and (source.adapter / "adapter_config.json").is_file():
        # The continued run's adapter brings its trained rows (added tokens included) with it.
        model = backend.continue_training(model, cfg, source.adapter)
        notice(f"model.from_run: training continues from {source.adapter}"
               + (" (it is also the reference model)" if objective.uses_reference else ""))
    else:
        initialise_new_rows(model, tokenizer, cfg, base_vocabulary, loaded_rows)
        model = backend.prepare_for_training(model, cfg, new_token_rows=range(base_vocabulary, len(tokenizer)))
        initial_adapter = remember_initial_adapter(model, run.root / "initial_adapter") if world.is_main else None
    durations["load"] = time.perf_counter() - tick

    from sft.core.interfaces import RunInfo
    from .metrics import MetricsHub, read_metrics
    from .trainer import NonFiniteLossError, RunTrainerSetup, metrics_callback, objective_trainer

    hub = MetricsHub.for_config(run.root, cfg, pm) if world.is_main else distributed.NullHub()
    callback = metrics_callback(hub, objective.metrics)
    from .stopping import stop_callback

    setup = RunTrainerSetup(cfg, model, tokenizer, data, env, run.checkpoints, [callback, stop_callback(stop)], backend)
    trainer = objective_trainer(objective, setup, objective_options)
    name = run.root.name
    hub.start(RunInfo(name=name, run_dir=str(run.root), config=shareable_container(cfg),
                      total_steps=_total_steps(cfg, trainer),
                      resumed_from_step=resume_from.step if resume_from else 0, model=model))
    base_summary: dict[str, Any] = {
        "run_name": name,
        "run_dir": str(run.root),
        "backend": backend.name,
        "device": env.device_name,
        "method": cfg.model.method,
        "model": cfg.model.name,
        "preset": cfg.get("preset"),
        "dataset": data.stats,
        "resumed_from": str(resume_from.path) if resume_from else None,
        "objective": _objective_record(objective, source, cfg),
        # What training.packing (auto: decided from the data) came to; preference trainers never pack.
        "packed": bool(getattr(trainer.args, "packing", False)),
    }
    if world.distributed:
        base_summary["distributed"] = {"strategy": cfg.distributed.strategy, **distributed.batch_plan(cfg).as_json()}

    tick = time.perf_counter()
    tokens_before = _resumed_tokens(resume_from.path) if resume_from is not None else 0
    from .stopping import Interrupted, as_recorded

    try:
        try:
            if resume_from is not None and resume_from.step >= _total_steps(cfg, trainer):
                result = _load_finished_checkpoint(trainer, resume_from)
            else:
                result = trainer.train(resume_from_checkpoint=str(resume_from.path) if resume_from else None)
        except pickle.UnpicklingError as exc:
            where = _refused_file(resume_from.path) if resume_from else "the checkpoint"
            raise refused_pickle(exc, f"--resume: {where}") from None
        if stop.requested:
            saved = (f"checkpoint-{stop.saved_step} was saved; continue with --resume" if stop.saved_step
                     else "no checkpoint was saved")
            raise Interrupted(f"stopped by SIGTERM at step {trainer.state.global_step}; {saved}")
        if data.eval is not None and trainer.args.eval_strategy != "no":
            # The trainer's own history, the same on every rank (evaluate() is a collective).
            evaluated = any("eval_loss" in r and r.get("step") == trainer.state.global_step
                            for r in trainer.state.log_history)
            if not evaluated:
                trainer.evaluate()
    except BaseException as raised:
        exc = as_recorded(raised, stop)  # an error that a SIGTERM caused is that stop
        status = "nan" if isinstance(exc, NonFiniteLossError) else (
            "interrupted" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "failed")
        if world.is_main:
            summary = run.update_summary(**base_summary, status=status, error=str(exc) or type(exc).__name__,
                                         steps=trainer.state.global_step,
                                         durations={**durations, "train": time.perf_counter() - tick})
            hub.finish(summary)
        raise
    durations["train"] = time.perf_counter() - tick
    progress["steps"] = int(trainer.state.global_step)  # what a failure from here on records

    tick = time.perf_counter()
    # A sharded model's weights are gathered by every rank together; rank 0 writes them.
    gathered = trainer.accelerator.get_state_dict(trainer.model) if distributed.is_fsdp(cfg) else None
    if world.is_main:
        _save_adapter(trainer.model, tokenizer, run, gathered, initial_adapter)
    distributed.finish()
    if not world.is_main:
        return run.root  # rank 0 writes the rest of the run directory and exports
    durations["save"] = time.perf_counter() - tick
    notice(f"adapter saved: {run.adapter}")

    from .metrics import write_loss_plot

    if run.metrics.exists():
        try:
            write_loss_plot(run.root)
        except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished run
            notice(f"could not write loss.png: {exc}")

    if distributed.is_fsdp(cfg):
        # The model is still sharded over processes that have left; sft generate RUN reads the adapter.
        generation = {"prompt": None, "text": None, "seconds": 0.0}
    else:
        generation = _quick_generation(cfg, trainer.model, tokenizer, template, data)
    durations["generation"] = generation.pop("seconds")

    records = read_metrics(run.metrics) if run.metrics.exists() else []
    tokens = int(trainer.state.num_input_tokens_seen)
    # The Trainer's own figures cover only the steps of this process: none at all when a resume
    # finds the run already trained to its last step. Keep what the earlier process measured then.
    trained_here = resume_from is None or trainer.state.global_step > resume_from.step
    earlier = {} if trained_here else run.read_summary()
    base_summary["objective"].update(_objective_metrics(records, objective.metrics))
    summary = run.update_summary(
        **base_summary,
        status="ok",
        error=None,
        steps=int(trainer.state.global_step),
        epochs=round(float(trainer.state.epoch or 0.0), 4),
        tokens=tokens,
        tokens_per_second=(round((tokens - tokens_before) / max(durations["train"], 1e-9), 2) if trained_here
                           else earlier.get("tokens_per_second")),
        train_loss=_last(records, "loss"),
        eval_loss=_last(records, "eval_loss"),
        mean_train_loss=_mean_train_loss(records, result, resume_from is not None),
        generation=generation,
        durations={k: round(v, 2) for k, v in {**durations, "total": time.perf_counter() - started}.items()},
    )
    # The loggers finish after the exports, so their summary (console table, W&B) has the export paths.
    try:
        if list(cfg.export.enabled):
            if backend.exports_in_subprocess:
                _export_in_subprocess(run, cfg, pm)
            else:
                from .export import run_exporters

                run_exporters(cfg, run, pm, template)
        if list(cfg.eval.after_export):
            from .evaluate import evaluate_after_training

            evaluate_after_training(cfg, run, pm, hub, template, in_subprocess=backend.exports_in_subprocess)
    finally:
        hub.finish(run.read_summary() or summary)
    return run.root


def _export_in_subprocess(run: RunDir, cfg: "DictConfig", pm: Any) -> None:
    """``sft export RUN --exporter ...`` in a fresh interpreter, for a backend that patches libraries process-wide.

    Unsloth rewrites transformers' model classes in place when imported; the exporters load
    plain transformers models (the merge, the reference generation) that those patches break.
    Like the in-process path, a failed export is reported (by the child) and never raises.
    The child reads the run's config.yaml as ``sft export`` reads any run's; what this run's own
    config chose (remote code, a public repo) is said again on its command line.
    """
    import subprocess

    from .configuration import confirmed_overrides

    exporters = list(cfg.export.enabled)
    args = [sys.executable, "-m", "sft.cli", "export", str(run.root)]
    for name in exporters:
        args += ["--exporter", name]
    args += ["--trust-remote-code"] * bool(cfg.model.trust_remote_code) + confirmed_overrides(cfg, pm)
    code = subprocess.run(args, env=distributed.plain_env()).returncode
    if code not in (0, 1):  # 1: some exporter failed and said so
        notice(f"the exporters stopped with exit status {code}; retry with: sft export {run.root} "
               + " ".join(f"--exporter {name}" for name in exporters))


def _load_finished_checkpoint(trainer: Any, checkpoint: Any) -> None:  # noqa: D401
    """Load a checkpoint taken at the run's last step, instead of training.

    Resuming there, transformers' Trainer takes one step more than ``max_steps``; a run killed
    after its last checkpoint (while saving the adapter or the summary) has nothing left to train.
    """
    from transformers import TrainerState

    notice(f"--resume: {checkpoint.path.name} is the run's last step; nothing left to train, finishing the run")
    trainer._load_from_checkpoint(str(checkpoint.path))
    trainer.state = TrainerState.load_from_json(str(checkpoint.path / "trainer_state.json"))
    return None


def _mean_train_loss(records: list[dict[str, Any]], result: Any, resumed: bool) -> float | None:
    """The mean training loss of the whole run. The Trainer's figure sums only this process's steps
    (and divides by all of them), so a resumed run takes the mean of its logged losses instead."""
    if not resumed:
        return round(float(result.training_loss), 6)
    by_step = {r["step"]: r["loss"] for r in records if isinstance(r.get("loss"), (int, float))}
    return round(sum(by_step.values()) / len(by_step), 6) if by_step else None


def _resumed_tokens(checkpoint: Path) -> int:
    import json

    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))
    except (OSError, ValueError):
        return 0


def _continued(text: str, indent: str = "          ") -> str:
    """Multi-line text under its label: later lines indented past ``  prompt: ``, their own indentation kept."""
    return text.replace("\n", "\n" + indent)


def _quick_generation(cfg: "DictConfig", model: Any, tokenizer: Any, template: Any, data: Any) -> dict[str, Any]:
    """Answer the configured prompt (default: the first eval row's user turn, else the first train row's)."""
    from .generate import first_user_prompt, generate_reply
    from sft.core.interfaces import Message

    tick = time.perf_counter()
    if cfg.training.generation_max_new_tokens == 0:
        return {"prompt": None, "text": None, "seconds": 0.0}
    if cfg.training.generation_prompt:
        messages = [Message("user", str(cfg.training.generation_prompt))]
    else:
        messages = first_user_prompt(data.eval_conversations) or first_user_prompt(data.train_conversations) or []
    if not messages:
        return {"prompt": None, "text": None, "seconds": 0.0}
    text = generate_reply(model, tokenizer, template, messages, cfg.training.generation_max_new_tokens)
    prompt = messages[-1].content
    print(f"\nquick generation\n  prompt: {_continued(prompt)}\n  answer: {_continued(text)}\n", flush=True)
    return {"prompt": prompt, "text": text, "seconds": time.perf_counter() - tick}
