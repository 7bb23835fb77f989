"""Fixtures shared by sft's own test modules (the plugin-author kit is sft.testing)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_default_run(tmp_path_factory, smollm2_dir) -> Path:
    """``sft run`` exactly as a new user types it, in an empty folder: the embedded default
    (SmolLM2-135M-Instruct learns sft:identity, 32 steps), offline: the one real SmolLM2 training
    of the suite, shared by every test that needs its result; tests that change a run work on a
    copy. ``cli-output.txt`` in the run holds what the command printed.

    ``SFT_TEST_DEFAULT_RUN=<run dir>`` reuses a run trained that way before (``sft run`` with no
    arguments), to iterate on the tests that read it without training again; CI never sets it."""
    import os

    reuse = os.environ.get("SFT_TEST_DEFAULT_RUN")
    if reuse:
        return Path(reuse)
    from sft.core import plugins
    from sft.testing import make_plugin_manager, run_sft

    work = tmp_path_factory.mktemp("default")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("HF_HUB_OFFLINE", "1")  # it must not need the network
    mp.setattr(plugins, "_manager", make_plugin_manager())
    try:
        result = run_sft("run")
    finally:
        mp.undo()
        plugins.reset_plugin_manager()
    [run] = (work / "runs").iterdir()
    (run / "cli-output.txt").write_text(result.output)
    return run


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """``family_models(name)``: a tiny model of that family (:mod:`families`), built once a session."""
    from families import make_tiny_family

    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = make_tiny_family(root / name, name)
        return built[name]
    return get
