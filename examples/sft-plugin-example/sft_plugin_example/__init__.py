"""Example third-party plugins for `sft`: a dataset format, a chat template, a logger and a publisher.

Each module is its own entry point in the ``sft`` group (see ``pyproject.toml``):

- :mod:`.dolly`: the ``dolly`` dataset format (``instruction``/``context``/``response``);
- :mod:`.vicuna`: the ``vicuna`` chat template (Vicuna v1.1);
- :mod:`.csv_logger`: the ``csv`` logger (``metrics.csv`` in the run directory);
- :mod:`.folder`: the ``folder`` publisher (exports copied into a folder with ``manifest.json``
  and a model card, rendered by :mod:`.modelcard`).

Nothing heavy is imported here: ``sft plugins`` and ``sft --help`` import every plugin.
"""

__version__ = "0.1.0"
