"""What the GPU tests share: a synthetic chat set a random-init model can learn, and `sft run` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: Question -> answer pairs; a random-init model can only answer them by having learned them.
CODES = {"red": "4417", "blue": "9021", "green": "3385", "amber": "7702",
         "violet": "1268", "silver": "5530", "coral": "6149", "indigo": "8893"}
QUESTION = "What is the code for {}?"
ANSWER = "The code for {} is {}."


def learnable_rows(n: int = 320) -> list[dict[str, Any]]:
    """``n`` ShareGPT rows cycling through :data:`CODES`."""
    colors = list(CODES)
    return [{"conversations": [{"from": "human", "value": QUESTION.format(c)},
                               {"from": "gpt", "value": ANSWER.format(c, CODES[c])}]}
            for c in (colors[i % len(colors)] for i in range(n))]


def sft_run(*overrides: str, log: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``sft run OVERRIDES`` in a fresh interpreter, as a user runs it; output goes to ``log``.

    With ``check`` (the default) a non-zero exit fails the test.

    Unsloth patches transformers' classes process-wide when imported; keeping it out of the
    test process lets the tests reload exports with plain transformers, as users would.
    """
    proc = subprocess.run([sys.executable, "-m", "sft.cli", "run", *overrides],
                          capture_output=True, text=True, timeout=900)
    log.write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"sft run exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}", pytrace=False)
    return proc
