"""Data preparation at scale: `sft validate` (cold and warm cache, 1 worker and all cores) against the
notebook path (``datasets`` + TRL SFTTrainer's own tokenizing and packing), wall time and peak memory.

    python bench/data_scale.py [--rows 10000,30000] [--json out.json]

Rows are ShareGPT conversations of realistic lengths: each row strings together a log-normal number
(1 to 40, median ~4) of the 500 conversations of ../shared/data/fastchat_dummy_conversation.json,
drawn with a fixed seed, so rows run from a few hundred to several thousand tokens. Every measurement
is a fresh Python process (imports included, as a user pays them); peak memory is the largest
resident set of that process and of the worker processes it waited for. Both sides use the SmolLM2
tokenizer and ChatML and train only the assistant turns.

- **sft cold**: ``sft validate`` with an empty data cache: read, check, render, mask, tokenize, write the cache.
- **sft warm**: the same command again: the prepared rows come from the cache.
- **notebook**: ``datasets.load_dataset("json")``, a ``map`` to OpenAI messages, then TRL's
  ``SFTTrainer`` on a tiny model with ``packing=True`` and ``assistant_only_loss=True`` (the
  tokenizing and packing the notebooks run before their first step), ``dataset_num_proc`` = cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from data_throughput import CHATML_TRAINING  # TRL's generation markers, as that bench uses them

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "shared" / "data" / "fastchat_dummy_conversation.json"

#: Run in a child: time the body, print {"s": wall, "rss_mb": peak of itself and its waited-for children}.
MEASURE = """
import json, resource, sys, time
t = time.perf_counter()
{body}
s = time.perf_counter() - t
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT " + json.dumps({{"s": round(s, 1), "rss_mb": peak // 1024}}))
"""

SFT_VALIDATE = """
from sft.cli import cli
try:
    cli(["validate", "data.dataset={data}", "template.name=chatml", "data.cache_dir={cache}", "data.num_proc={procs}",
          "model.max_seq_length=2048"])
except SystemExit as exc:
    assert exc.code == {code}, exc.code
"""

NOTEBOOK = """
import os, datasets
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
from sft.engine.models import embedded_model_dir
from sft.testing import make_tiny_llama
datasets.disable_progress_bars()
roles = {{"human": "user", "gpt": "assistant", "system": "system"}}
ds = datasets.load_dataset("json", data_files="{data}", split="train", cache_dir="{cache}")
ds = ds.map(lambda r: {{"messages": [{{"role": roles[t["from"]], "content": t["value"]}} for t in r["conversations"]]}},
            remove_columns=ds.column_names, num_proc={procs})
tok = AutoTokenizer.from_pretrained(embedded_model_dir())
tok.pad_token = "<|endoftext|>"
tiny = make_tiny_llama("{cache}/tiny", tokenizer_dir=embedded_model_dir())
args = SFTConfig(output_dir="{cache}/trl", assistant_only_loss=True, packing=True, max_length=2048, report_to=[],
                 chat_template_path="{template}", dataset_num_proc={procs}, use_cpu=True)
SFTTrainer(model=str(tiny), args=args, train_dataset=ds, processing_class=tok)
"""

def make_rows(n: int, out: Path, seed: int = 0, bad_last: bool = False) -> None:
    """``n`` rows; with ``bad_last`` the last one has an empty answer (a bad row, on line ``n``)."""
    source = json.loads(SOURCE.read_text())
    rng = random.Random(seed)
    with out.open("w") as f:
        for i in range(n):
            turns = []
            for _ in range(min(40, int(rng.lognormvariate(1.2, 1.0)) + 1)):
                turns += rng.choice(source)["conversations"]
            if bad_last and i == n - 1:
                turns = [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": ""}]
            f.write(json.dumps({"id": i, "conversations": turns}) + "\n")


def measure(body: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE.format(body=body)], capture_output=True, text=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "said": out.stderr.strip().splitlines()[-1:]}
    raise RuntimeError(f"measurement failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,30000")
    parser.add_argument("--workers", default=None, help="data.num_proc values to measure (default: 1 and the cores).")
    parser.add_argument("--no-notebook", action="store_true", help="Skip the notebook path (hours at 1M rows).")
    parser.add_argument("--bad-last", action="store_true",
                        help="The last row is bad: sft validate must name its line and exit 2 (the cold run only).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [1, cores]
    results = []
    for n in [int(x) for x in args.rows.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="sft-scale-"))
        data = work / "rows.jsonl"
        make_rows(n, data, bad_last=args.bad_last)
        (work / "chatml.jinja").write_text(CHATML_TRAINING)
        row = {"rows": n, "file_mb": round(data.stat().st_size / 2**20, 1)}
        for procs in workers:
            cache = work / f"cache{procs}"
            body = SFT_VALIDATE.format(data=data, cache=cache, procs=procs, code=2 if args.bad_last else 0)
            row[f"sft_cold_{procs}"] = measure(body)
            if args.bad_last:
                said = " ".join(row[f"sft_cold_{procs}"]["said"])
                assert f"rows.jsonl:{n}" in said, said  # the bad row, located by its line
            else:
                row[f"sft_warm_{procs}"] = measure(body)
        if not args.no_notebook:
            row["notebook"] = measure(NOTEBOOK.format(data=data, cache=work / "nb", procs=cores,
                                                      template=work / "chatml.jinja"))
        shutil.rmtree(work, ignore_errors=True)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'rows':>8} {'MB':>6} | {'setup':<28} {'wall s':>7} {'peak MB':>8} {'x notebook time':>16}")
    for row in results:
        nb = row["notebook"]["s"] if "notebook" in row else float("nan")
        for key in [k for k in row if k.startswith("sft_") or k == "notebook"]:
            label = {"notebook": f"notebook ({cores} procs)"}.get(key, key.replace("_", " ") + " worker(s)")
            r = row[key]
            print(f"{row['rows']:>8} {row['file_mb']:>6} | {label:<28} {r['s']:>7} {r['rss_mb']:>8} {r['s'] / nb:>16.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
