"""Fixtures shared by sft's own test modules (the plugin-author kit is sft.core.testing)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_default_run(tmp_path_factory, smollm2_dir) -> Path:
    """``sft run`` exactly as a new user types it (the README's first command), in an empty
    folder and offline: the one real SmolLM2 training of the suite (about two minutes on a
    2-core CPU), shared by every test that needs the embedded default's result.
    ``cli-output.txt`` in the run holds what the command printed."""
    from sft.core import plugins
    from sft.core.testing import make_plugin_manager, run_sft

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
