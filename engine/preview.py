"""``sft preview CONFIG`` and ``sft run --dry-run``: what training would see, with the tokenizer only.

It runs the real data pipeline (:func:`sft.engine.data.build_datasets`, so the cache is used
and filled) and shows:

- N training rows as the model sees them, decoded, with the trained tokens highlighted (for
  preference data: the prompt with each completion, chosen and rejected, the scored tokens highlighted);
- the counts (rows, skipped, truncated, fully masked, tokens);
- a histogram of token lengths.

``--json`` prints the same as one JSON object (see :func:`preview_data`). No model weights
are loaded.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence, TextIO

__all__ = ["preview", "preview_data", "length_histogram", "token_runs"]


def length_histogram(lengths: Sequence[int], bins: int = 10) -> list[dict[str, int]]:
    """Equal-width bins over ``[min, max]``: ``[{"lo", "hi", "count"}, ...]`` (``hi`` inclusive)."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))  # ceil, so the bins cover [lo, hi]
    edges = list(range(lo, hi + 1, width))
    counts = [0] * len(edges)
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [{"lo": e, "hi": min(e + width - 1, hi), "count": c} for e, c in zip(edges, counts)]


def preview_data(cfg: Any, samples: int = 3, pm: Any = None) -> dict[str, Any]:
    """The preview as a JSON-able dict: ``config``, ``stats``, ``samples``, ``lengths``.

    Each sample has ``row``, ``tokens``, ``trained_tokens``, ``text`` (the decoded row),
    ``segments`` (``[{"text", "trained"}]``, consecutive tokens with the same flag decoded
    together) and ``trained_text`` (the decoded trained segments only).
    """
    from .data import build_datasets
    from .models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prepared = build_datasets(cfg, pm, tokenizer)
    train = prepared.train
    rows = train.select(range(min(samples, len(train)))) if samples > 0 else []
    out_samples = []
    for i, row in enumerate(rows):
        for completion, ids, mask in _scored_views(row):
            segments = [{"text": tokenizer.decode(run, skip_special_tokens=False), "trained": trained}
                        for trained, run in token_runs(ids, mask)]
            out_samples.append({
                "row": i,
                **({"completion": completion} if completion else {}),
                "tokens": len(ids),
                "trained_tokens": int(sum(mask)),
                "text": "".join(s["text"] for s in segments),
                "segments": segments,
                "trained_text": [s["text"] for s in segments if s["trained"]],
            })
    lengths = [max(len(ids) for _c, ids, _m in _scored_views(row)) for row in train]
    return {
        "config": {
            "dataset": cfg.data.dataset,
            "split": cfg.data.split,
            "format": prepared.stats["format"],
            "template": prepared.stats["template"],
            "train_on": cfg.data.train_on,
            "max_seq_length": int(cfg.model.max_seq_length),
            "tokenizer": cfg.model.name,
        },
        "stats": prepared.stats,
        "samples": out_samples,
        "lengths": {
            "min": min(lengths),
            "max": max(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "histogram": length_histogram(lengths),
        },
    }


def _scored_views(row: dict[str, Any]) -> list[tuple[str, list[int], list[int]]]:
    """A prepared row as ``(completion, ids, trained mask)`` views: one for a conversation; for
    preference rows, the prompt followed by each completion, whose tokens are the scored ones."""
    if "input_ids" in row:
        return [("", row["input_ids"], row["assistant_masks"])]
    prompt = list(row["prompt_ids"])
    labels = {"chosen_ids": "chosen", "rejected_ids": "rejected",
              "completion_ids": "desirable" if row.get("label") else "undesirable"}
    return [(label, prompt + list(row[key]), [0] * len(prompt) + [1] * len(row[key]))
            for key, label in labels.items() if key in row]


def preview(cfg: Any, samples: int = 3, as_json: bool = False, file: TextIO | None = None) -> dict[str, Any]:
    """Print the preview (rich text, or JSON with ``as_json``) and return its data."""
    data = preview_data(cfg, samples)
    out = file or sys.stdout
    if as_json:
        out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return data
    _print_rich(data, out)
    return data


def _print_rich(data: dict[str, Any], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .data import describe_stats

    console = Console(file=out, highlight=False)
    c = data["config"]
    console.print(f"[bold]{c['dataset']}[/bold] ({c['format']}) rendered with template [bold]{c['template']}[/bold], "
                  f"tokenizer {c['tokenizer']}, train_on={c['train_on']}, max_seq_length={c['max_seq_length']}")
    # Without a terminal there are no colours, so trained text is bracketed instead.
    mark = ("", "") if console.is_terminal else ("«", "»")
    legend = Text("legend: ")
    legend.append(f"{mark[0]}trained tokens{mark[1]}", style="bold black on green")
    legend.append(" / ")
    legend.append("not trained", style="dim")
    console.print(legend)
    for sample in data["samples"]:
        body = Text()
        for seg in sample["segments"]:
            if seg["trained"]:
                body.append(mark[0] + seg["text"] + mark[1], style="bold black on green")
            else:
                body.append(seg["text"], style="dim")
        which = f" {sample['completion']}" if sample.get("completion") else ""
        scored = "scored" if which else "trained"
        console.rule(f"row {sample['row']}{which}: {sample['tokens']} tokens, {sample['trained_tokens']} {scored}",
                     align="left")
        console.print(body)
    if data["samples"]:
        console.rule()

    stats = data["stats"]
    table = Table("count", "value", title="data", title_justify="left")
    for key in ("rows", "train_rows", "eval_rows", "truncated", "truncated_dropped", "long_prompts", "truncated_eot_added", "chunked",
                "fully_masked", "train_tokens", "trained_tokens",
                "eval_tokens", "max_tokens"):
        table.add_row(key, f"{stats.get(key, 0):,}")
    table.add_row("skipped", f"{stats['skipped']['count']:,}")
    for reason, n in stats["skipped"]["reasons"].items():
        table.add_row(f"  {reason}", f"{n:,}")
    table.add_row("cache", f"{stats['cache']} ({stats['cache_key'][:12]})")
    console.print(table)

    hist = data["lengths"]["histogram"]
    peak = max((b["count"] for b in hist), default=1) or 1
    console.print(f"[bold]token lengths[/bold] (train rows; min {data['lengths']['min']}, "
                  f"mean {data['lengths']['mean']}, max {data['lengths']['max']})")
    for b in hist:
        bar = "█" * max(1 if b["count"] else 0, round(30 * b["count"] / peak))
        console.print(f"  {b['lo']:>6}–{b['hi']:<6} {bar} {b['count']}")
    console.print(describe_stats(stats))


def token_runs(input_ids: Sequence[int], mask: Sequence[int]) -> list[tuple[bool, list[int]]]:
    """Split a row into maximal runs of trained / untrained tokens: ``[(trained, ids), ...]``."""
    runs: list[tuple[bool, list[int]]] = []
    for token, flag in zip(input_ids, mask):
        trained = bool(flag)
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return runs
