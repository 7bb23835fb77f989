"""Training objectives: ``sft`` (supervised, the default), ``dpo``, ``orpo``, ``simpo``, ``kto`` (docs/preference.md)."""
