"""The data pipeline: sources → rows → conversations → token ids + trained-token masks.

Which file does what:

- :mod:`.readers`: dataset files (json, jsonl, csv, parquet) → rows with file:line;
- :mod:`.sources`: ``data.dataset`` → packaged asset, local files or a Hub dataset; splits;
- :mod:`.cache`: the content-addressed cache of tokenized datasets;
- :mod:`.pipeline`: formats, bad rows, the eval split, rendering and tokenizing
  (:func:`build_datasets`), and ``sft validate``'s data check;
- :mod:`.streaming`: ``data.streaming``, the train split read lazily through the same stages.

Fitting the tokenizer to the chat template is the template's business:
:func:`sft.core.templating.resolve_template`.
"""

from .pipeline import PreparedData, build_datasets, describe_stats, resolve_format, validate_data
from .readers import RowRef
from .sources import read_rows

__all__ = ["PreparedData", "RowRef", "build_datasets", "describe_stats", "read_rows", "resolve_format", "validate_data"]
