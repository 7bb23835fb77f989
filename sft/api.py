"""The Python API, for notebooks: ``import sft; run = sft.train(...)``.

It is a front end like :mod:`sft.cli`, over the same machinery: the config goes through
:func:`sft.engine.configuration.load_config` (every error at once, did-you-mean, flat keys such as
``learning_rate=``), training through :func:`sft.engine.run.run_training` into the same run
directory, exports through :func:`sft.engine.export.export_run`. In Jupyter the console logger
draws its rich progress bar in the cell's output.

::

    import sft
    run = sft.train(model="sft:smollm2", dataset="my.jsonl", max_steps=60)
    run.generate("Who are you?")
    run.export("gguf", quants=["q4_k_m"])
    run = sft.load("runs/20261201-101500")      # a finished run, from disk
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sft.core.errors import SftError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from sft.core.interfaces import ExportResult

__all__ = ["Run", "train", "load", "config"]

#: Keyword shortcuts, as the CLI's flags (``--model``, ``--dataset`` ...).
SHORTCUTS = {
    "model": "model.name",
    "dataset": "data.dataset",
    "format": "data.format",
    "template": "template.name",
    "objective": "objective.name",
    "from_run": "model.from_run",
    "exporters": "export.enabled",
    "loggers": "loggers.enabled",
    "output": "training.output_dir",
}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"max_steps": 5}}`` -> ``{"training.max_steps": 5}`` (dotted keys kept as given)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config(source: "str | Path | Mapping[str, Any] | None" = None, /, **overrides: Any) -> "DictConfig":
    """The validated config :func:`train` would use, without training (``sft validate`` minus the data).

    ``source``: a YAML path, a mapping (nested sections or dotted keys), or None. ``overrides``:
    the CLI's shortcuts (``model``, ``dataset``, ``template``, ``objective``, ``from_run`` (a
    run directory or a :class:`Run`), ``exporters``, ``loggers``, ``output``), section mappings (``training={"max_steps": 5}``), dotted keys
    (``**{"training.max_steps": 5}``) or the flat names of other tools (``learning_rate=1e-4``).
    """
    from omegaconf import DictConfig, OmegaConf

    from sft.engine.configuration import load_config
    from sft.core.presets import implied_preset

    path: str | None = None
    flags: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        path = str(source)
    elif isinstance(source, DictConfig):
        # Unresolved: load_config sees the interpolations as written and refuses a resolver (${oc.env:...}).
        flags.update(_flatten(OmegaConf.to_container(source, resolve=False)))  # type: ignore[arg-type]
    elif isinstance(source, Mapping):
        flags.update(_flatten(source))
    elif source is not None:
        raise SftError(f"sft.train: the config must be a YAML path, a dict or None, not {type(source).__name__}")
    for key, value in overrides.items():
        if isinstance(value, Mapping):  # a section: model={"name": ..., "method": ...}
            flags.update(_flatten(value, f"{key}."))
        elif key in SHORTCUTS:
            if key in ("exporters", "loggers") and isinstance(value, str):
                value = [value]
            if isinstance(value, Run):  # from_run=sft.train(...): the run it returned
                value = str(value.path)
            flags[SHORTCUTS[key]] = value
        else:
            flags[key] = list(value) if isinstance(value, tuple) else value
    preset = implied_preset(path, (), flags)
    if preset is not None:
        flags = {"preset": preset, **flags}
    from sft.engine.continuation import continued_run

    return load_config(path, (), flags, from_run=continued_run)


def train(source: "str | Path | Mapping[str, Any] | None" = None, /, *, resume: bool = False, **overrides: Any) -> "Run":
    """Train as ``sft run`` does and return the finished :class:`Run`.

    With no config and no dataset it runs the embedded default (``sft:smollm2`` on
    ``sft:identity``, preset ``embedded``), as ``sft run`` does. See :func:`config` for the
    arguments. An export that fails does not raise: check ``run.exports``.
    """
    from sft.engine.run import run_training

    cfg = config(source, **overrides)
    # Your own config chose its remote code, so the run it returns loads the same way.
    return Run(run_training(cfg, resume=resume), trust_remote_code=bool(cfg.model.trust_remote_code))


def load(run_dir: str | Path, *, trust_remote_code: bool = False) -> "Run":
    """A finished run from its directory (what ``sft generate``/``sft export`` take).

    ``trust_remote_code`` is ``--trust-remote-code``: a run whose config.yaml sets
    ``model.trust_remote_code`` runs the model's own Python only with it."""
    from sft.core.rundir import RunDir

    rd = RunDir.of(run_dir)
    if not rd.config.is_file():
        raise SftError(f"{rd.root}: not a run directory (no config.yaml)")
    return Run(rd.root, trust_remote_code=trust_remote_code)


class Run:
    """A run directory with the things a notebook does next.

    ``path``, ``summary`` (summary.json), ``config`` (the validated config.yaml),
    ``metrics`` (metrics.jsonl records), ``exports`` (exporter -> result in summary.json).
    The model is loaded on the first :meth:`generate` and kept for the next ones.
    """

    def __init__(self, path: str | Path, *, trust_remote_code: bool = False):
        self.path = Path(path)
        self.trust_remote_code = trust_remote_code
        self._loaded: tuple[Any, Any, Any, Any] | None = None

    def __repr__(self) -> str:
        s = self.summary
        loss = s.get("train_loss")
        return (f"Run('{self.path}', status={s.get('status')!r}, steps={s.get('steps')}, "
                f"train_loss={loss if loss is None else round(loss, 4)})")

    @property
    def summary(self) -> dict[str, Any]:
        from sft.core.rundir import RunDir

        return RunDir.of(self.path).read_summary()

    @property
    def config(self) -> "DictConfig":
        from sft.engine.configuration import load_config
        from sft.core.rundir import RunDir

        return load_config(str(RunDir.of(self.path).config))

    @property
    def metrics(self) -> list[dict[str, Any]]:
        from sft.engine.metrics import read_metrics
        from sft.core.rundir import RunDir

        path = RunDir.of(self.path).metrics
        return read_metrics(path) if path.exists() else []

    @property
    def exports(self) -> dict[str, Any]:
        return self.summary.get("exports") or {}

    def generate(self, prompt: str, *, max_new_tokens: int = 128, system: str | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stream: bool = False) -> str:
        """The run's answer to ``prompt`` (greedy unless ``temperature`` > 0), as ``sft generate`` gives it."""
        from sft.engine.generate import generate_reply, load_run, sampling_kwargs, with_system
        from sft.core.interfaces import Message

        sampling_kwargs(temperature, top_p)
        if self._loaded is None:
            self._loaded = load_run(self.path, trust_remote_code=self.trust_remote_code)
        model, tokenizer, template, _cfg = self._loaded
        messages = with_system([Message("user", prompt)], system)
        return generate_reply(model, tokenizer, template, messages, max_new_tokens, stream=stream,
                              temperature=temperature, top_p=top_p, seed=seed)

    def export(self, exporter: str, /, **options: Any) -> "ExportResult":
        """Run one exporter on the run, as ``sft export RUN --exporter NAME export.NAME.KEY=VALUE``.

        ``options`` are the exporter's options (``quants=["q4_k_m"]``); ``sft plugins NAME`` lists
        them. Returns the :class:`ExportResult`; raises :class:`SftError` when the export failed.
        """
        import json

        from sft.engine.export import export_run

        overrides = [f"export.{exporter}.{key}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                     for key, v in options.items()]
        [result] = export_run(self.path, [exporter], overrides, trust_remote_code=self.trust_remote_code)
        if not result.ok:
            raise SftError(f"export {exporter} failed: {result.error}")
        return result

    def publish(self, to: str, /, *, exporters: Sequence[str] = (), **options: Any) -> dict[str, Any]:
        """Send the run's exports on disk to the publisher ``to``, as ``sft publish RUN --to NAME``.

        ``exporters`` narrows it to some exports; ``options`` are ``publish.<to>`` keys.
        Returns the per-export records; raises :class:`SftError` when one failed.
        """
        import json

        from sft.engine.export import publish_run

        overrides = [f"publish.{to}.{key}={json.dumps(value)}" for key, value in options.items()]
        records = publish_run(self.path, to, list(exporters), overrides)
        failed = {name: record.get("error") for name, record in records.items() if not record.get("ok")}
        if failed:
            raise SftError(f"publishing to {to} failed for " + "; ".join(f"{name}: {error}" for name, error in failed.items())
                           + f"; the exports are on disk, send them again with run.publish(...) or sft publish --to {to}")
        return records

    def push(self, repo_id: str | None = None, /, *, exporters: Sequence[str] = (), force: bool = False,
             **options: Any) -> dict[str, Any]:
        """Push the run's exports on disk to the Hugging Face Hub, as ``sft push RUN [--repo R]``
        (the hub's spelling of :meth:`publish`).

        ``repo_id`` defaults to the run's ``publish.hub.repo_id`` (else its last push's);
        ``options`` are further ``publish.hub`` keys (``private=False`` creates public repos: the run's own
        config.yaml cannot choose that, nor ``force``).
        """
        if repo_id:
            options["repo_id"] = repo_id
        if force:
            options["force"] = True
        return self.publish("hub", exporters=exporters, **options)
