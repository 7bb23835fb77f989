"""The one way `sft` tells the user something that is not an error: a line on stderr.

Used for choices the user did not make (a fallback, an ``auto`` setting resolved), stages
finished, and problems that do not stop the run. stdout stays for results (progress, the
quick generation, ``--json`` output).
"""

from __future__ import annotations

import os
import sys

__all__ = ["notice"]


def notice(message: str) -> None:
    """Print ``[sft] message`` on stderr (from rank 0 only, in a distributed run)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"[sft] {message}", file=sys.stderr, flush=True)
