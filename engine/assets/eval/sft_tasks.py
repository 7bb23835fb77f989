"""Datasets of the tasks shipped with sft, read from the JSONL files beside this module.

lm-eval calls these through ``custom_dataset: !function sft_tasks.<name>`` in the task YAMLs:
``datasets.load_dataset("json", data_files=...)`` would resolve a relative path against the
current directory, not against the installed package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def jsonl_test_split(data_file: str, **_metadata: Any) -> Any:
    """A ``DatasetDict`` whose ``test`` split holds the rows of ``data_file`` (a file beside this module)."""
    import datasets

    lines = (HERE / data_file).read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])})
