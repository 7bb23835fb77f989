"""The `sft` command line.

Every command imports its heavy machinery inside its body, so ``sft --help`` and
``sft plugins`` only import click, pluggy, omegaconf and the plugin modules.
Errors that users cause (:class:`SftError`) print without a traceback and exit with their
``exit_code`` (2 for config and data errors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from sft.core.errors import SftError

__all__ = ["main", "cli"]


def _fail(exc: SftError) -> None:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Turns :class:`SftError` into a clean message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        from sft.core.errors import as_user_error

        try:
            return super().invoke(ctx)
        except SftError as exc:
            _fail(exc)
        except Exception as exc:  # noqa: BLE001 - library errors that the user caused get one line too
            mapped = as_user_error(exc)
            if mapped is None:
                raise
            _fail(mapped)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sft-forge", prog_name="sft")
def cli() -> None:
    """Supervised fine-tuning of LLMs: QLoRA/LoRA on Unsloth (CUDA) or transformers (CPU),
    with dataset formats, chat templates, loggers and exporters as plugins."""


# -- config-taking commands --------------------------------------------------------------
def _config_args(func: Callable) -> Callable:
    """CONFIG.yaml (optional) and key=value overrides, plus the shortcut flags."""
    options = [
        click.argument("args", nargs=-1),
        click.option("--model", help="Base model: hub id or local folder (model.name)."),
        click.option("--dataset", help="Dataset file, folder or hub name (data.dataset)."),
        click.option("--format", "format_", help="Dataset-format plugin (data.format)."),
        click.option("--template", help="Chat-template plugin (template.name)."),
        click.option("--objective", help="Training objective plugin: sft, dpo, orpo, simpo, kto (objective.name)."),
        click.option("--from", "from_run", metavar="RUN", help="Continue this finished run: its base, tokenizer, template and adapter (model.from_run)."),
        click.option("--exporter", "exporters", multiple=True, help="Exporter plugin; repeatable (export.enabled)."),
        click.option("--logger", "loggers", multiple=True,
                     help="Add a logger plugin to loggers.enabled (the console stays on); -NAME removes one; repeatable."),
        click.option("--no-console", is_flag=True, help="Turn the console logger off (same as --logger -console)."),
        click.option("--output", help="Run directory (training.output_dir)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _logger_list(path: str | None, overrides: list[str], loggers: tuple[str, ...], no_console: bool) -> list[str] | None:
    """loggers.enabled after the --logger flags, which add to (or, as -NAME, remove from) the
    list the YAML or the schema default gives, so ``--logger csv`` keeps the console."""
    if not loggers and not no_console:
        return None
    from sft.core.config import LoggersConfig
    from sft.engine.configuration import read_yaml

    if any(o.startswith("loggers.enabled=") for o in overrides):
        raise click.UsageError("give the loggers either as --logger flags or as loggers.enabled=[...], not both")
    base = ((read_yaml(path) if path else {}).get("loggers") or {}).get("enabled")
    enabled = list(base if base is not None else LoggersConfig().enabled)
    for name in (*loggers, *(["-console"] if no_console else [])):
        if name.startswith("-"):
            if name[1:] not in enabled:  # removing what is not there would leave a misspelt logger on
                from sft.core.errors import did_you_mean

                raise click.UsageError(f"--logger {name}: '{name[1:]}' is not among the loggers "
                                       f"({', '.join(enabled) or 'none'}){did_you_mean(name[1:], enabled)}")
            enabled = [n for n in enabled if n != name[1:]]
        elif name not in enabled:
            enabled.append(name)
    return enabled


def _load_config(args, model, dataset, format_, template, exporters, loggers, output, no_console=False,
                 push_to_hub=None, nproc=None, objective=None, from_run=None):
    from sft.engine.configuration import load_config
    from sft.core.presets import implied_preset

    path = None
    overrides = []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif path is None and arg.endswith((".yaml", ".yml")):
            path = arg
        else:
            hint = f" (a dataset: --dataset {arg})" if Path(arg).suffix in (".json", ".jsonl", ".csv", ".parquet") else ""
            raise click.UsageError(f"expected CONFIG.yaml or key=value, got {arg!r}{hint}")
    for flag, value in (("--output", output), ("--dataset", dataset), ("--model", model)):
        if value is not None and not str(value).strip():  # an unset shell variable; not "use the default"
            raise click.UsageError(f"{flag} is empty")
    flags = {
        key: value
        for key, value in {
            "model.name": model,
            "data.dataset": dataset,
            "data.format": format_,
            "template.name": template,
            "objective.name": objective,
            "model.from_run": from_run,
            "export.enabled": list(exporters) if exporters else None,
            "loggers.enabled": _logger_list(path, overrides, loggers, no_console),
            "training.output_dir": output,
            "publish.hub.repo_id": push_to_hub,  # the hub's spelling; setting the repo turns the hub on
            "distributed.num_processes": nproc,
        }.items()
        if value is not None
    }
    preset = implied_preset(path, overrides, flags)
    if preset is not None:
        flags["preset"] = preset
    from sft.engine.continuation import continued_run

    return load_config(path, overrides, flags, from_run=continued_run)


@cli.command()
@_config_args
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint in the run directory.")
@click.option("--dry-run", is_flag=True, help="Validate and preview the data (tokenizer only), then stop.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO",
              help="Push each export to this Hugging Face Hub repo (publish.hub.repo_id); token from HF_TOKEN.")
@click.option("--nproc", type=click.IntRange(min=1), help="Train with N processes, one per GPU (distributed.num_processes); see docs/distributed.md.")
def run(resume: bool, dry_run: bool, **kwargs) -> None:
    """Train: sft run [CONFIG.yaml] [key=value ...]. With no config and no dataset, runs the
    embedded default (model sft:smollm2, data sft:identity, preset 'embedded')."""
    cfg = _load_config(**kwargs)
    if dry_run:
        from sft.engine.preview import preview

        preview(cfg)
        return
    from sft.engine.distributed import current_world, wants_launch
    from sft.core.rundir import RunDir
    from sft.engine.run import run_training

    if wants_launch(cfg):
        from .launch import launch

        run_dir = launch(cfg, resume=resume)
    else:
        run_dir = run_training(cfg, resume=resume)
    if not current_world().is_main:
        return  # one rank of a job another launcher started: rank 0 reports
    summary = RunDir.of(run_dir).read_summary()
    exports = summary.get("exports") or {}
    failed = sorted(name for name, result in exports.items() if not result.get("ok"))
    eval_failed = bool(list(cfg.eval.after_export)) and (summary.get("eval") or {}).get("ok") is False
    if eval_failed:
        click.echo(f"[sft] training finished, but eval.after_export failed: "
                   f"{'; '.join(summary['eval'].get('failures') or [])}", err=True)
    if failed:
        # The trained run is safe on disk; a pipeline must still see that an artifact it asked for is missing.
        again = " ".join(f"--exporter {name}" for name in failed)
        click.echo(f"[sft] training finished, but {', '.join(failed)} failed (see above); "
                   f"fix it and retry with: sft export {run_dir} {again}", err=True)
    if _report_failed_publications(run_dir, summary) or failed:
        sys.exit(1)
    if eval_failed:
        sys.exit(1)


def _report_failed_publications(run_dir, summary, exporters=None) -> bool:
    """Say which publications failed (of ``exporters``, default all) and the command that finishes each."""
    from sft.engine.publish import failed_publications, retry_command

    failed = failed_publications(summary, exporters)
    for publisher, names in failed.items():
        click.echo(f"[sft] publishing {', '.join(names)} to {publisher} failed (see above); the exports are on disk. "
                   f"Retry with: {retry_command(run_dir, publisher, names, summary)}", err=True)
    return bool(failed)


@cli.command()
@_config_args
def validate(**kwargs) -> None:
    """Check a config, its plugins, its data, its exports and its publishers without loading any model weights."""
    cfg = _load_config(**kwargs)
    from sft.core.plugins import get_plugin_manager
    from sft.core.templating import resolve_template
    from sft.engine.data import validate_data
    from sft.engine.export import preflight_before_training
    from sft.engine.publish import Publishing
    from sft.engine.run import resolve_run_dir

    from sft.core.env import current_environment
    from sft.engine.backends import check_method_hardware

    check_method_hardware(cfg, current_environment())  # model.method=fp8 on a GPU without FP8 (or no GPU)
    pm = get_plugin_manager()
    from sft.core.env import current_environment
    from sft.engine.backends import check_backend_config

    check_backend_config(cfg, pm, current_environment())  # a LoRA setting the backend cannot train
    template = resolve_template(cfg, pm)
    if cfg.data.streaming:
        from sft.engine.data.streaming import validate_streaming as validate_data
    report = validate_data(cfg, template)
    # The same preflights as sft run, before training: an export or a publisher that cannot work fails here too.
    preflight_before_training(cfg, resolve_run_dir(cfg), pm, template)
    Publishing(cfg, pm).preflight(list(cfg.export.enabled))
    exports = f"; exports OK: {', '.join(cfg.export.enabled)}" if cfg.export.enabled else ""
    published = f"; publishers OK: {', '.join(cfg.publish.enabled)}" if cfg.publish.enabled and cfg.export.enabled else ""
    click.echo(f"config OK; {report}{exports}{published}")


@cli.command()
@_config_args
@click.option("-n", "--samples", default=3, show_default=True, type=click.IntRange(min=1), help="Rendered samples to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check-template", is_flag=True,
              help="Compare every row's trained text with the model tokenizer's own chat_template, token for token "
                   "(exit 1 when a row differs).")
def preview(samples: int, as_json: bool, check_template: bool, **kwargs) -> None:
    """Render samples with their trained tokens highlighted, and count rows and tokens (tokenizer only)."""
    cfg = _load_config(**kwargs)
    if check_template:
        from sft.engine.render_check import check_template as run_check, print_check

        report = run_check(cfg)
        if as_json:
            click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        else:
            print_check(report)
        if report["differing"]:
            raise SystemExit(1)
        return
    from sft.engine.preview import preview as run_preview

    run_preview(cfg, samples=samples, as_json=as_json)


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(name: str | None, as_json: bool) -> None:
    """List every plugin (name, kinds, what it provides, distribution, version, status), or with
    NAME (a dataset format, template, logger, exporter, backend or publisher, or a plugin) its description,
    version and options with their types, defaults and choices."""
    from sft.core.config import build_schema
    from sft.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    build_schema(pm)  # a plugin whose options clash with a core key is disabled there, and listed so
    if name is not None:
        _show_plugin(pm, name, as_json)
        return
    listing = pm.listing()
    if as_json:
        click.echo(json.dumps([p.to_json() for p in listing], indent=2))
        return
    rows = [("plugin", "kinds", "provides", "distribution", "version", "status")]
    for p in listing:
        provides = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(p.provides.items()))
        status = "; ".join(["ok", *p.clashes]) if p.error is None else f"failed: {p.error}"
        rows.append((p.name, ", ".join(p.kinds), provides or "-", p.distribution or "-", p.version or "-", status))
    # Plain aligned columns, never truncated: the listing is read in pipes and CI logs too.
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    click.echo("\nsft plugins NAME shows one plugin's description and options.")


def _show_plugin(pm: Any, name: str, as_json: bool) -> None:
    from .describe import plugin_entries, yaml_value
    from sft.core.errors import did_you_mean
    from sft.core.interfaces import KINDS

    entries = plugin_entries(pm, name)
    if not entries:
        known = sorted({n for kind in KINDS for n in pm.registry(kind)} | {p.name for p in pm.listing()})
        failed = [p for p in pm.failures() if name in p.name]
        hint = f"; plugin '{failed[0].name}' failed to load: {failed[0].error}" if failed else ""
        raise SftError(f"no plugin named '{name}'{did_you_mean(name, known)}{hint}; sft plugins lists them")
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
        return
    for i, e in enumerate(entries):
        if i:
            click.echo("")
        source = e["distribution"] or "-"
        if e["distribution_version"]:
            source += f" {e['distribution_version']}"
        click.echo(f"{e['name']}  ({e['kind'].replace('_', ' ')}, version {e['version']}; plugin {e['plugin']} from {source})")
        click.echo(f"  {e['description'] or '(no description)'}")
        if not e["options"]:
            click.echo("  options: none")
            continue
        click.echo(f"  options ({e['options_key']}.KEY=VALUE, or under {e['options_key']} in the YAML):")
        for o in e["options"]:
            choices = f"  one of: {', '.join(map(str, o['choices']))}" if o["choices"] else ""
            click.echo(f"    {o['key'].rsplit('.', 1)[-1]}: {o['type']} = {yaml_value(o['default'])}{choices}")
            if o["help"]:
                click.echo(f"        {o['help']}")


def _trust_option(func: Callable) -> Callable:
    """--trust-remote-code: a run folder's config.yaml cannot turn model.trust_remote_code on by itself."""
    return click.option("--trust-remote-code", is_flag=True,
                        help="Allow the model's own Python files to run as it loads, when the run's config.yaml sets "
                             "model.trust_remote_code (a run folder cannot allow it by itself).")(func)


@cli.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--exporter", "exporters", multiple=True, required=True, help="Exporter plugin; repeatable.")
@_trust_option
@click.argument("overrides", nargs=-1)
def export_cmd(run_dir: str, exporters: tuple[str, ...], trust_remote_code: bool, overrides: tuple[str, ...]) -> None:
    """Re-run exporters on a finished run, from the adapter on disk: sft export RUN_DIR --exporter gguf [key=value ...]."""
    from sft.engine.export import export_run

    results = export_run(run_dir, list(exporters), list(overrides), trust_remote_code=trust_remote_code)
    from sft.core.rundir import RunDir

    summary = RunDir.of(run_dir).read_summary()
    published_failed = _report_failed_publications(run_dir, summary, list(exporters))
    if not all(r.ok for r in results) or published_failed:
        sys.exit(1)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", required=True, metavar="PUBLISHER", help="The publisher plugin (sft plugins lists them): hub, ...")
@click.option("--exporter", "exporters", multiple=True, help="Publish only this export; repeatable (default: every finished one).")
@click.argument("overrides", nargs=-1)
def publish(run_dir: str, to: str, exporters: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Send a run's exports on disk to a publisher: sft publish RUN_DIR --to hub [--exporter X] [key=value ...]."""
    _publish(run_dir, to, list(exporters), list(overrides))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--exporter", "exporters", multiple=True, help="Push only this export; repeatable (default: every finished one).")
@click.option("--repo", "repo_id", metavar="REPO", help="Hub repo (publish.hub.repo_id; default: the run's, else its last push's).")
@click.option("--force", is_flag=True, help="Push into an existing repo that sft did not create.")
@click.option("--public", is_flag=True, help="Create missing repos public (publish.hub.private=false; the run's "
                                             "config.yaml cannot choose it). Default: private.")
@click.argument("overrides", nargs=-1)
def push(run_dir: str, exporters: tuple[str, ...], repo_id: str | None, force: bool, public: bool,
         overrides: tuple[str, ...]) -> None:
    """Push a run's exports on disk to the Hugging Face Hub, skipping files already there: sft push RUN_DIR [--repo R]
    (the hub's spelling of sft publish RUN_DIR --to hub). Only the regular files inside the run's exports/ go."""
    hub = [f"publish.hub.repo_id={repo_id}"] if repo_id else []
    flags = ["publish.hub.force=true"] * force + ["publish.hub.private=false"] * public
    _publish(run_dir, "hub", list(exporters), [*hub, *flags, *overrides])


def _publish(run_dir: str, to: str, exporters: list[str], overrides: list[str]) -> None:
    from sft.core.rundir import RunDir
    from sft.engine.export import publish_run

    records = publish_run(run_dir, to, exporters, overrides)
    if _report_failed_publications(run_dir, RunDir.of(run_dir).read_summary(), list(records)):
        sys.exit(1)


def _csv(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@cli.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--tasks", "tasks", multiple=True, help="lm-eval tasks, comma-separated or repeated: sft_identity, sft_knowledge, a task .yaml file, or lm-eval's own (default: eval.tasks; a task file the run's config.yaml names must be named here, since it can run Python).")
@click.option("--exporter", "exporters", multiple=True, help="Exports to score and compare with the run's own model (always scored), comma-separated or repeated: gguf (each quant), merged_16bit (default: every export in the run).")
@click.option("--limit", type=int, default=None, help="At most this many examples per task (default: eval.limit, else all).")
@click.option("--base", is_flag=True, help="Score the base model too, to see what fine-tuning changed.")
@_trust_option
@click.argument("overrides", nargs=-1)
def eval_cmd(run_dir: str, tasks: tuple[str, ...], exporters: tuple[str, ...], limit: int | None, base: bool,
             trust_remote_code: bool, overrides: tuple[str, ...]) -> None:
    """Score the run's model and its exports (each GGUF quant) on lm-eval tasks; exit 1 when an export drops more than eval.max_drop."""
    from sft.engine.evaluate import evaluate_run, print_eval

    if limit is not None and limit < 1:
        raise click.BadParameter("must be at least 1", param_hint="--limit")
    record = evaluate_run(run_dir, _csv(tasks) or None, _csv(exporters) or None, limit=limit, base=base,
                          overrides=list(overrides), trust_remote_code=trust_remote_code)
    print_eval(record)
    if not record["ok"]:
        sys.exit(1)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report(run_dir: str) -> None:
    """Regenerate loss.png from metrics.jsonl and print the run summary."""
    from sft.engine.metrics import report_run

    report_run(run_dir)


def _sampling_options(func: Callable) -> Callable:
    """--system, --temperature, --top-p and --seed, shared by generate and chat."""
    options = [
        click.option("--system", help="A system prompt put before the conversation."),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 decodes greedily; above 0 samples."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (with --temperature > 0)."),
        click.option("--seed", type=int, help="Seed for sampling, so an answer can be repeated."),
        click.option("--export", "export", help="Answer with this exporter's files instead of the adapter "
                                                "(an exporter that can: gguf, through llama.cpp)."),
        click.option("--gguf", "gguf", is_flag=True, help="Answer with the exported GGUF in llama.cpp (--export gguf)."),
        click.option("--file", "file", type=click.Path(exists=True, dir_okay=False),
                     help="With --export/--gguf: this exported file (default: the first the export wrote)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--tools", "tools_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON file of tool specs (OpenAI function schema) the prompt declares.")
@_sampling_options
@_trust_option
def generate(run_dir: str, prompt: str, max_new_tokens: int, tools_file: str | None, gguf: bool, **sampling) -> None:
    """Answer PROMPT with the run's adapter and template, streaming the text (--gguf: with the exported GGUF)."""
    from sft.engine.generate import generate_from_run, read_tools

    tools = read_tools(tools_file) if tools_file else None
    generate_from_run(run_dir, prompt, max_new_tokens=max_new_tokens, tools=tools, **_export_choice(gguf, sampling))


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@_sampling_options
@_trust_option
def chat(run_dir: str, max_new_tokens: int, gguf: bool, **sampling) -> None:
    """Chat with the run's adapter in the terminal (empty line or Ctrl-D to quit); --gguf: with the exported GGUF."""
    from sft.engine.generate import chat_with_run

    chat_with_run(run_dir, max_new_tokens=max_new_tokens, **_export_choice(gguf, sampling))


def _export_choice(gguf: bool, options: dict[str, Any]) -> dict[str, Any]:
    # --gguf is the shortcut the GGUF export is asked for by; the core itself knows exporters only by --export NAME.
    if gguf:
        if options.get("export") not in (None, "gguf"):
            raise click.UsageError("--gguf and --export name different exports; give one")
        options["export"] = "gguf"
    if options.get("file") and not options.get("export"):
        raise click.UsageError("--file names an exported file: give --gguf or --export NAME too")
    return options


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
