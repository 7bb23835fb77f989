"""`sft`: supervised fine-tuning of LLMs through plugins.

For notebooks and scripts (see docs/python-api.md)::

    import sft
    run = sft.train(dataset="my.jsonl", max_steps=60)   # same config, plugins and run directory as `sft run`
    run.generate("Who are you?")
    run.export("gguf", quants=["q4_k_m"])

Plugin authors import from :mod:`sft.core`. Importing ``sft`` imports nothing heavy.
"""

from sft.api import Run, config, load, train
from sft.core.errors import ConfigError, DataError, SftError

__all__ = ["Run", "config", "load", "train", "SftError", "ConfigError", "DataError"]
