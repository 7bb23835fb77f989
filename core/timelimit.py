"""A time limit on rendering a chat template (a hub template can loop for hours).

Jinja has no ``while``, but nested ``for`` loops over ``range(100000)``, recursive macros and
doubling strings run as long as they like, and validate, preview and training would hang on the
first row. :func:`render_time_limit` gives each render :data:`RENDER_SECONDS`: a watchdog thread
raises :class:`RenderTimeout` *in the rendering thread* at its next Python instruction once the
deadline passes (nothing is killed; the render unwinds like any exception), and the render ends
with :class:`TemplateTooSlow`, one line naming the template. A render costs one lock and two dict
operations; the watchdog sleeps while no render is running. A single C call that runs long (one
string repeated a billion times) finishes before the exception can land.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .errors import SftError

__all__ = ["RENDER_SECONDS", "TemplateTooSlow", "render_time_limit"]

#: Seconds one render of one conversation may take (a real one takes milliseconds).
RENDER_SECONDS = 30.0


class TemplateTooSlow(SftError):
    """A chat template's render ran past its time limit: the template's fault, never one row's."""

    exit_code = 2


class RenderTimeout(BaseException):
    """Raised in the rendering thread by the watchdog. A BaseException, so that no ``except Exception``
    on the way out (transformers', a template's own) turns it into a row's error."""


class _Watchdog:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.deadlines: dict[int, float] = {}  # thread id -> deadline of its render
        self.fired: set[int] = set()  # threads the timeout was sent to
        self.thread: threading.Thread | None = None

    def start(self, seconds: float) -> int:
        ident = threading.get_ident()
        with self.lock:
            self.deadlines[ident] = time.monotonic() + seconds
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="sft-render-time-limit", daemon=True)
                self.thread.start()
            elif len(self.deadlines) == 1:
                self.lock.notify()  # asleep with no render to watch
        return ident

    def stop(self, ident: int) -> None:
        with self.lock:
            self.deadlines.pop(ident, None)
            fired = ident in self.fired
            self.fired.discard(ident)
        if fired:
            # Sent as the render finished: withdraw it if it has not landed yet.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                for ident, deadline in self.deadlines.items():
                    if deadline <= now and ident not in self.fired:
                        self.fired.add(ident)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                                   ctypes.py_object(RenderTimeout))
                waiting = [d for i, d in self.deadlines.items() if i not in self.fired]
                self.lock.wait(max(0.01, min(waiting) - now) if waiting else None)


_WATCHDOG = _Watchdog()
# A forked data worker (data.num_proc) has none of its parent's threads: it starts its own watchdog.
os.register_at_fork(after_in_child=_WATCHDOG.__init__)


@contextmanager
def render_time_limit(what: str, seconds: float | None = None) -> Iterator[None]:
    """Run a render of ``what`` (``"chat template 'qwen3'"``) within ``seconds`` (default :data:`RENDER_SECONDS`);
    past them, raise :class:`TemplateTooSlow`. A render inside another (a probe) runs under the outer limit."""
    limit = RENDER_SECONDS if seconds is None else seconds
    if threading.get_ident() in _WATCHDOG.deadlines:
        yield
        return
    ident = _WATCHDOG.start(limit)
    try:
        yield
    except RenderTimeout:
        raise TemplateTooSlow(f"{what} took more than {limit:g} s to render one conversation and was stopped "
                              f"(a loop that does not end?); fix the template or choose another") from None
    finally:
        while True:
            try:
                _WATCHDOG.stop(ident)
                break
            except RenderTimeout:  # sent as the render finished, landed here: stopping again is harmless
                continue
