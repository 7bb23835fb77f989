"""The libraries sft drives, kept quiet and quick: their progress bars, their warnings, the Hub's reachability."""

from __future__ import annotations

import functools
import importlib
import os
import sys

__all__ = ["hub_reachable", "quiet_known_warnings", "quiet_progress_bars"]


def quiet_progress_bars() -> None:
    """`sft` reports progress itself (console logger, notices); the libraries' own bars
    (weight loading, dataset maps) would interleave with it, and so would their import-time prints.

    Called once the backend has prepared the environment (Unsloth must be imported before transformers).
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # transformers prints "[INFO] Running in WANDB offline mode" when its integrations module is
    # imported under WANDB_MODE=offline, W&B used or not. It is imported here with the variable
    # hidden for that moment: with the wandb logger off nothing of W&B shows, and with it on,
    # wandb.init gives W&B's own offline notice.
    module = "transformers.integrations.integration_utils"
    if os.environ.get("WANDB_MODE") == "offline" and module not in sys.modules:
        mode = os.environ.pop("WANDB_MODE")
        try:
            importlib.import_module(module)
        finally:
            os.environ["WANDB_MODE"] = mode


def quiet_known_warnings() -> None:
    """Hide library warnings a user can do nothing about (called where training or generation starts)."""
    import warnings

    # TRL 1.14 and PEFT read a property transformers 5 deprecated.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (False under ``HF_HUB_OFFLINE``).

    Checked before any hub load, so an offline machine fails in a second instead of after
    the libraries' retries (about 50 s for a model); the answer is kept for the process."""
    import huggingface_hub.constants as hub_constants

    return not hub_constants.HF_HUB_OFFLINE and _hub_answers(hub_constants.ENDPOINT)


@functools.lru_cache(maxsize=4)
def _hub_answers(endpoint: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
