"""The shared training engine: the order of a run, the trainer, the data pipeline, the export and
publish loops, generation and evaluation. It imports :mod:`sft.core` and never a plugin or the
front door; plugins reach it only where they need its machinery (model loading, scoring)."""
