"""Bundled publishers: where a run's finished exports go (the Hugging Face Hub)."""
