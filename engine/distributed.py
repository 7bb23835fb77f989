"""Training with several processes: the launch, rank discipline, batch arithmetic and the preflight.

Two ways a run becomes distributed (docs/distributed.md):

- **sft launches it** (:mod:`sft.launch`): ``distributed.num_processes: N`` (``sft run
  --nproc N``) without a launcher around.
- **A launcher runs sft.** ``LOCAL_RANK`` is set (``torchrun``, ``accelerate launch``, a
  scheduler): ``sft run`` is one rank of that job; ``num_processes`` is not used.

Inside a worker, :func:`setup` joins the process group (gloo on CPU, NCCL on CUDA), and the
run keeps to these rules: the local main process of each node fills the data cache first
and the others read it (:func:`main_first`); only rank 0 writes the run directory (config,
metrics, loggers, loss.png, the adapter, summary.json) and exports; every rank takes part in
a checkpoint save, and rank 0 commits it once all have written (:mod:`sft.engine.trainer`);
the NaN guard and the token count are decided across ranks (:func:`sum_across_ranks`).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from sft.core.errors import ConfigError, ConfigProblem, SftError
from sft.core.notices import notice

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.env import Environment
    from sft.core.interfaces import TrainingBackend

__all__ = ["STRATEGIES", "World", "current_world", "under_launcher", "wants_launch", "preset", "fsdp_config",
           "BatchPlan", "batch_plan", "check_strategy", "setup", "check_same_config", "barrier", "broadcast",
           "main_first", "sum_across_ranks", "min_across_ranks", "device_map", "device", "is_fsdp", "NullHub", "plain_env",
           "write_layout", "check_resume", "LAYOUT_FILE"]

#: The values of ``distributed.strategy``; each has a preset ``engine/assets/accelerate/<name>.yaml``.
STRATEGIES = ("ddp", "fsdp2")
#: Written into every checkpoint: how it was trained (world size, strategy, batch), read on resume.
LAYOUT_FILE = "distributed.json"
#: The environment variables a launcher sets for its workers.
_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_ERROR_FILE",
                  "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_CPU_RAM_EFFICIENT_LOADING")


# -- who am I ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """This process's place in the job (from the launcher's environment; one process when none)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or under_launcher()


def under_launcher() -> bool:
    """True inside a worker of torchrun, ``accelerate launch``, a scheduler or :func:`launch`."""
    return "LOCAL_RANK" in os.environ


def current_world() -> World:
    env = os.environ
    if not under_launcher():
        return World()
    return World(rank=int(env.get("RANK", 0)), local_rank=int(env["LOCAL_RANK"]),
                 world_size=int(env.get("WORLD_SIZE", 1)))


def wants_launch(cfg: "DictConfig") -> bool:
    """``sft run`` should start the workers itself: several processes asked for and no launcher around."""
    return int(cfg.distributed.num_processes) > 1 and not under_launcher()


def is_fsdp(cfg: "DictConfig") -> bool:
    """FSDP2 is in force: asked for, in a distributed process."""
    return cfg.distributed.strategy == "fsdp2" and current_world().distributed


# -- presets ----------------------------------------------------------------------------------
def preset(strategy: str) -> Path:
    """The packaged accelerate config file of ``strategy``."""
    return Path(__file__).parent / "assets" / "accelerate" / f"{strategy}.yaml"


def fsdp_config() -> dict[str, Any]:
    """The ``fsdp_config`` of the fsdp2 preset, as ``TrainingArguments(fsdp_config=...)`` takes it.

    One source for both launch modes: under torchrun no accelerate config is read, so the
    trainer carries the same settings.
    """
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(preset("fsdp2")))["fsdp_config"])


def trainer_arguments(cfg: "DictConfig") -> dict[str, Any]:
    """The ``TrainingArguments`` a distributed run adds (nothing for one process)."""
    if not current_world().distributed:
        return {}
    if cfg.distributed.strategy == "fsdp2":
        return {"fsdp": True, "fsdp_config": fsdp_config()}
    # Every LoRA parameter gets a gradient at every step; searching the graph for unused
    # ones costs a traversal per step and breaks with gradient checkpointing.
    return {"ddp_find_unused_parameters": False}


# -- batch arithmetic ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """``global batch = per_device × gradient_accumulation_steps × world_size``."""

    per_device: int
    gradient_accumulation_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.gradient_accumulation_steps * self.world_size

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device} per device × "
                f"{self.gradient_accumulation_steps} accumulation × {self.world_size} process"
                f"{'es' if self.world_size != 1 else ''}")

    def as_json(self) -> dict[str, int]:
        return {"per_device": self.per_device, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "world_size": self.world_size, "global_batch": self.global_batch}


def batch_plan(cfg: "DictConfig", world_size: int | None = None) -> BatchPlan:
    """The batch of this run. With ``distributed.keep_global_batch`` the configured
    ``gradient_accumulation_steps`` is the single-process value and is divided by the world
    size, so adding processes does not change the optimisation."""
    t = cfg.training
    world = current_world().world_size if world_size is None else world_size
    per_device, accumulation = int(t.per_device_train_batch_size), int(t.gradient_accumulation_steps)
    if cfg.distributed.keep_global_batch and world > 1:
        if accumulation % world:
            divisors = [n for n in range(1, accumulation + 1) if accumulation % n == 0]
            raise ConfigError([ConfigProblem(
                "distributed.keep_global_batch",
                f"gradient_accumulation_steps={accumulation} cannot be split over {world} processes; "
                f"use a world size among {divisors}, or set gradient_accumulation_steps to a multiple of {world}")])
        accumulation //= world
    return BatchPlan(per_device, accumulation, world)


# -- preflight ----------------------------------------------------------------------------------
def strategy_problems(cfg: "DictConfig", backend: "TrainingBackend", env: "Environment",
                      world_size: int) -> list[ConfigProblem]:
    """Why ``cfg`` cannot train with ``world_size`` processes here (empty when it can)."""
    if world_size <= 1 and cfg.distributed.strategy != "fsdp2":
        return []
    problems: list[ConfigProblem] = []
    strategy = cfg.distributed.strategy
    reason = backend.distributed_reason(cfg, strategy)
    if reason:
        problems.append(ConfigProblem("distributed.strategy", reason))
    if strategy == "fsdp2" and not env.cuda:
        problems.append(ConfigProblem(
            "distributed.strategy",
            "fsdp2 needs CUDA GPUs: accelerate shards a model only on accelerator devices, and on CPU "
            "(gloo) it would silently train unsharded; use distributed.strategy=ddp on CPU"))
    if env.cuda and not under_launcher():
        import torch

        gpus = torch.cuda.device_count()
        if world_size > gpus:
            problems.append(ConfigProblem(
                "distributed.num_processes", f"{world_size} processes need {world_size} GPUs; this machine has {gpus}"))
    return problems


def check_strategy(cfg: "DictConfig", backend: "TrainingBackend", env: "Environment", world_size: int) -> None:
    problems = strategy_problems(cfg, backend, env, world_size)
    try:
        batch_plan(cfg, world_size)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)


# -- resume across world sizes -------------------------------------------------------------------
def write_layout(checkpoint: str | Path, strategy: str, plan: BatchPlan) -> None:
    """Record how ``checkpoint`` was trained (``single``, ``ddp`` or ``fsdp2``; the batch), for
    :func:`check_resume`. Rank 0 writes it before the checkpoint is committed."""
    layout = {"strategy": strategy, **plan.as_json()}
    (Path(checkpoint) / LAYOUT_FILE).write_text(json.dumps(layout, indent=1) + "\n")


def check_resume(checkpoint: str | Path, cfg: "DictConfig", world_size: int) -> None:
    """Refuse a resume that cannot continue the same optimisation.

    Supported: DDP (or one process) to any world size with the same global batch
    (``distributed.keep_global_batch: true`` keeps it): the optimizer, scheduler and data
    position are global, and each rank's RNG state is restored where the old rank existed.
    FSDP2: the same world size only (the sharded run's state is not re-sharded here).
    """
    path = Path(checkpoint) / LAYOUT_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {"strategy": "single", "world_size": 1, "global_batch": None}
    new = batch_plan(cfg, world_size)
    strategy = cfg.distributed.strategy if world_size > 1 else "single"
    where = f"{Path(checkpoint).name} was trained"
    if "fsdp2" in (old["strategy"], strategy) and (old["strategy"] != strategy or old["world_size"] != world_size):
        raise SftError(f"--resume: {where} with {old['strategy']} on {old['world_size']} process(es); an FSDP2 run "
                       f"resumes with fsdp2 on the same number of processes only (this launch: {strategy} on "
                       f"{world_size})")
    if old.get("global_batch") not in (None, new.global_batch):
        raise SftError(
            f"--resume: {where} with a global batch of {old['global_batch']} ({old['world_size']} process(es)); "
            f"this launch has {new.describe()}. Resume with the same global batch: set "
            f"distributed.keep_global_batch=true, or adjust training.gradient_accumulation_steps")
    if old["world_size"] != world_size:
        notice(f"--resume: {where} on {old['world_size']} process(es), continuing on {world_size} "
               f"with the same global batch ({new.global_batch})")


# -- inside a worker -------------------------------------------------------------------------------
def setup(cfg: "DictConfig", env: "Environment") -> World:
    """Join the job's process group (nothing to do for one process) and return this rank.

    accelerate's ``PartialState`` initialises it as the Trainer later expects: gloo on CPU,
    NCCL on CUDA with this rank's GPU as the current device.
    """
    world = current_world()
    if not world.distributed:
        return world
    if cfg.distributed.strategy == "fsdp2":
        # transformers reads these while loading (rank 0 loads, the others start on meta),
        # before any TrainingArguments exist; `sft launch` sets them, torchrun does not.
        settings = fsdp_config()
        os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
        os.environ.setdefault("FSDP_VERSION", str(settings.get("fsdp_version", 2)))
        os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING",
                              str(settings.get("fsdp_cpu_ram_efficient_loading", False)).lower())
    from accelerate import PartialState

    PartialState(cpu=not env.cuda)
    check_same_config(cfg, world)
    return world


def check_same_config(cfg: "DictConfig", world: World) -> None:
    """Refuse, on every rank, a job whose ranks were started with different configs.

    A launcher that starts each rank with its own command line (a per-node script, a stale
    file on one node) would otherwise train a mix. Rank 0's config is the reference; the
    message names the first differing key, never a value (a value may be a secret).
    """
    import hashlib

    import torch.distributed as dist
    from omegaconf import OmegaConf

    mine = OmegaConf.to_container(cfg, resolve=True)
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[Any] = [None] * world.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    configs: list[Any] = [None] * world.world_size
    dist.all_gather_object(configs, mine)  # only on a mismatch: every rank then names the same key
    rank = next(r for r, d in enumerate(digests) if d != digests[0])
    keys = _differing_keys(configs[0], configs[rank])
    more = f" (and {len(keys) - 1} more key(s))" if len(keys) > 1 else ""
    raise SftError(f"rank {rank}'s config differs from rank 0's at {keys[0]}{more}: every rank of a job must be "
                   f"started with the same config file and key=value overrides")


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config mappings (sorted)."""
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return [] if a == b else [prefix.rstrip(".") or "(the whole config)"]
    keys: list[str] = []
    for key in sorted(set(a) | set(b), key=str):
        keys += _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    return keys


def _ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The local main process of each node runs the block first (it fills the data cache),
    the others after it (they read the cache)."""
    world = current_world()
    if not _ready():
        yield
        return
    if not world.is_local_main:
        barrier()
    try:
        yield
    finally:
        if world.is_local_main:
            barrier()


def _all_reduce(values: list[float], op: str) -> list[float]:
    if not _ready():
        return values
    import torch
    import torch.distributed as dist

    # NCCL reduces only tensors on this rank's GPU; gloo takes CPU tensors.
    where = f"cuda:{current_world().local_rank}" if "nccl" in str(dist.get_backend()) else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over every rank (one all-reduce); ``values`` itself for one process."""
    return _all_reduce(values, "SUM")


def min_across_ranks(value: float) -> float:
    """The smallest ``value`` over every rank; ``value`` itself for one process."""
    return _all_reduce([value], "MIN")[0]


def device_map(cfg: "DictConfig") -> dict[str, int] | None:
    """Where a DDP rank loads its whole model: its own GPU. None for one process and for FSDP2
    (which loads on the CPU / meta device and places the shards itself)."""
    world = current_world()
    if not world.distributed or cfg.distributed.strategy == "fsdp2":
        return None
    return {"": world.local_rank}


def device(env: "Environment") -> str:
    """This rank's device: ``cuda:<local_rank>`` on CUDA, else ``cpu``."""
    return f"cuda:{current_world().local_rank}" if env.cuda else "cpu"


def finish() -> None:
    """Leave the process group (after the last collective: the adapter save)."""
    if _ready():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


class NullHub:
    """The metrics hub of ranks other than 0: they log nothing (rank 0 logs the gathered loss)."""

    def start(self, run: Any) -> None: ...

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, summary: Mapping[str, Any]) -> None: ...


def plain_env() -> dict[str, str]:
    """This environment without the launcher's variables, for a child that must run as one process
    (the exporters' subprocess)."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
