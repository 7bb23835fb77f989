"""``sft run --nproc N``: start the workers of a distributed run through accelerate's launcher.

:func:`launch` runs accelerate's ``launch_command`` in this process with the packaged preset
of ``distributed.strategy`` (``engine/assets/accelerate/<strategy>.yaml``), the way TRL's CLI
does; each worker is ``python -m sft.launch LAUNCH.yaml`` and runs
:func:`~sft.engine.run.run_training` as one rank (:mod:`sft.engine.distributed` has the rules a
rank keeps). The parent checks what it can before any worker starts (backend and strategy,
the batch, the checkpoint to resume), waits, and turns a dead worker into an error naming
its rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.engine.distributed import batch_plan, check_resume, check_strategy, current_world, preset
from sft.core.errors import SftError
from sft.core.notices import notice

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.plugins import PluginManager

__all__ = ["launch", "DistributedError"]


class DistributedError(SftError):
    """A worker of a distributed run failed (its rank and how are in the message)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def launch(cfg: "DictConfig", resume: bool = False, pm: "PluginManager | None" = None) -> Path:
    """Start ``distributed.num_processes`` workers of this run through accelerate's launcher; return the run dir.

    Before any worker starts: the run directory is fixed (every worker gets the same one),
    the backend and the strategy are checked, and so is the checkpoint to resume from. A
    worker that dies ends the job (the launcher stops the others); the error names the first
    rank that failed and keeps the last complete checkpoint.
    """
    from omegaconf import OmegaConf

    from sft.engine import checkpoints
    from sft.engine.backends import select_backend
    from sft.core.config import config_to_yaml
    from sft.core.env import current_environment
    from sft.engine.run import _check_fresh, resolve_run_dir

    if pm is None:
        from sft.core.plugins import get_plugin_manager

        pm = get_plugin_manager()
    n = int(cfg.distributed.num_processes)
    run = resolve_run_dir(cfg, resume)
    run.refuse_links()  # a received run folder: nothing is written through its links
    env = current_environment()
    check_strategy(cfg, select_backend(cfg, pm, env), env, n)
    from sft.engine.publish import Publishing

    Publishing(cfg, pm).preflight(list(cfg.export.enabled))  # a refused token fails before any worker starts
    if resume:
        last = checkpoints.last_complete(run.checkpoints)
        if last is None:
            raise SftError(f"--resume: no complete checkpoint in {run.checkpoints}; run again without --resume")
        check_resume(last.path, cfg, n)
    else:
        _check_fresh(run)
    run.root.mkdir(parents=True, exist_ok=True)
    worker_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    worker_cfg.training.output_dir = str(run.root.resolve())
    launch_file = run.root / ".launch-config.yaml"
    launch_file.write_text(config_to_yaml(worker_cfg))

    from accelerate.commands.launch import launch_command, launch_command_parser

    args = ["--config_file", str(preset(cfg.distributed.strategy)), "--num_processes", str(n),
            "--main_process_port", str(int(cfg.distributed.main_process_port)), "--monitor_interval", "0.5",
            "-m", "sft.launch", str(launch_file)] + (["--resume"] if resume else [])
    plan = batch_plan(cfg, n)
    notice(f"distributed: launching {n} processes ({cfg.distributed.strategy}, "
           f"{'NCCL' if env.cuda else 'gloo on CPU'}); {plan.describe()}")
    # No --quiet (nor --debug, which the presets leave off): accelerate 1.16 turns a worker's
    # failure into sys.exit(1) under either, and 1.0-1.12 swallow it under --debug. The
    # ChildFailedError is what names the rank that failed and how.
    parsed = launch_command_parser().parse_args(args)
    try:
        launch_command(parsed)
    except SystemExit as stop:  # accelerate 1.16 on SIGTERM/Ctrl-C (128 + N), or a future quiet default
        raise _launcher_exit(stop.code, run, checkpoints) from None
    except Exception as exc:  # noqa: BLE001 - ChildFailedError, or the launcher's own failure
        raise _worker_failure(exc, run, checkpoints) from None
    finally:
        launch_file.unlink(missing_ok=True)
    return run.root


def _kept(run: Any, checkpoints: Any) -> str:
    last = checkpoints.last_complete(run.checkpoints)
    return (f"the last complete checkpoint is kept: {last.path} (continue with sft run --resume)" if last
            else "no checkpoint had been written")


def _record(run: Any, message: str, status: str, **extra: Any) -> None:
    """Record the launcher's account in summary.json, unless rank 0 wrote a more precise one (a NaN stop)."""
    previous = run.read_summary() or {}
    if previous.get("status") == "nan":
        run.update_summary(**extra)
    else:
        run.update_summary(status=status, error=message, **extra)


def _launcher_exit(code: Any, run: Any, checkpoints: Any) -> SftError:
    """accelerate's launcher ended with ``sys.exit``: after a signal (128 + N, the workers stopped
    first), or for a worker's failure it did not hand on (then no rank is known here)."""
    import signal

    status = code if isinstance(code, int) else 1
    if status > 128:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = f"signal {status - 128}"
        message = f"distributed training stopped: the launcher got {name} and stopped every rank; {_kept(run, checkpoints)}"
        _record(run, message, "interrupted")
        return DistributedError(message, exit_code=status)
    message = (f"distributed training failed: accelerate's launcher exited with status {status} without naming "
               f"the rank (the workers' messages are above); {_kept(run, checkpoints)}")
    _record(run, message, "failed")
    return DistributedError(message, exit_code=status if status in (1, 2) else 1)


def _worker_failure(exc: Exception, run: Any, checkpoints: Any) -> SftError:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(exc, SignalException):  # accelerate before 1.16 hands on the signal the launcher got
        return _launcher_exit(128 + int(exc.sigval), run, checkpoints)
    if not isinstance(exc, ChildFailedError):
        return DistributedError(f"the distributed launch failed: {type(exc).__name__}: {exc}")
    rank, failure = _root_cause(exc)
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
        code = 1
    else:
        how = f"exited with status {failure.exitcode} (its message is above)"
        code = failure.exitcode if failure.exitcode in (1, 2) else 1
    others = sorted(r for r in exc.failures if r != rank)
    also = f"; rank(s) {', '.join(map(str, others))} stopped too" if others else ""
    message = (f"distributed training failed: rank {rank} (local rank {failure.local_rank}) {how}{also}; "
               f"{_kept(run, checkpoints)}")
    _record(run, message, "failed", failed_rank=rank)
    return DistributedError(message, exit_code=code)


def _root_cause(exc: Any) -> tuple[int, Any]:
    """The rank whose failure ended the job.

    A rank killed by a signal (kill -9, the OOM killer, a segfault) comes first: the others
    then fail in their next collective or get the launcher's SIGTERM, and the launcher's
    timestamps (whole seconds) cannot tell them apart. Otherwise the earliest failure.
    """
    import signal

    stopped_by_launcher = (-signal.SIGTERM, -signal.SIGINT)
    signalled = sorted(r for r, f in exc.failures.items() if f.exitcode < 0 and f.exitcode not in stopped_by_launcher)
    if signalled:
        return signalled[0], exc.failures[signalled[0]]
    return exc.get_first_failure()


def _worker_main(argv: list[str]) -> None:
    """A worker of :func:`launch`: ``python -m sft.launch LAUNCH.yaml [--resume]``."""
    from sft.engine.configuration import load_config
    from sft.engine.run import run_training

    try:
        cfg = load_config(argv[0])
        run_training(cfg, resume="--resume" in argv[1:])
    except SftError as exc:
        print(f"Error (rank {current_world().rank}): {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
