"""Data preparation at scale: memory that does not grow with the rows (issue 30).

A dataset's rows are held as a line index, checked and tokenized in chunks, and spooled to an
Arrow file that is mapped back; nothing keeps a Python object per row for the whole set. The
bound below is what the process needs besides the rows (Python, transformers, the tokenizer,
the workers' chunks): a pipeline that kept the parsed rows, their conversations or their token
lists would pass it by hundreds of megabytes at 200k rows.
"""

from __future__ import annotations

import json
import sys

from datakit import peak_rss

ROWS = 200_000
#: Peak resident memory of `sft validate` on ROWS short rows, cache written (measured 451 MB; parsing the rows into a list alone makes it 663 MB).
BOUND_MB = 560


def test_two_hundred_thousand_rows_validate_in_bounded_memory(smollm2_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    with path.open("w") as f:
        for i in range(ROWS):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                                             {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."}]})
                    + "\n")
    rc, peak_kb, report = peak_rss(sys.executable, "-m", "sft.cli", "validate", "--model", str(smollm2_dir),
                                   "--dataset", str(path), f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=2",
                                   "data.test_size=0.01")
    assert rc == 0, report
    assert f"{ROWS} rows" in report and f"{ROWS - ROWS // 100} train / {ROWS // 100} eval" in report, report
    assert peak_kb < BOUND_MB * 1024, f"peak RSS {peak_kb / 1024:.0f} MB at {ROWS:,} rows (bound {BOUND_MB} MB)"


def test_a_run_stopped_by_a_late_bad_row_leaves_no_temporary_file(smollm2_dir, tmp_path):
    # Rows are spooled to $TMPDIR chunk by chunk; a bad row on the last line stops the pipeline after
    # several chunks went there, and nothing of them may stay behind.
    import os
    import subprocess

    rows = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(1500)]
    rows[-1]["messages"][1]["content"] = ""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run([sys.executable, "-m", "sft.cli", "validate", "--model", str(smollm2_dir), "--dataset",
                             str(path), "data.cache_dir=off", "data.num_proc=1"],
                            capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 2 and "rows.jsonl:1500" in result.stderr, result.stderr[-2000:]
    assert list(scratch.iterdir()) == []
