"""SIGTERM stops a run the way Ctrl-C does, and saves a checkpoint when that can be done in time.

Slurm, Kubernetes and ``docker stop`` send SIGTERM, then SIGKILL after a grace period
(docker 10 s, Kubernetes 30 s). Python's default for SIGTERM is to die at once, with no
summary and no message. :func:`sigterm_stops_training` installs a handler for the run:

- outside the training loop (data, model loading, saving, exports) the run stops at once with
  :class:`Interrupted`, recorded as status ``interrupted`` like Ctrl-C. A library that catches
  the stop and raises its own error (huggingface_hub's lazy imports wrap it in a RuntimeError)
  does not turn it into a failure: :func:`as_recorded` gives the stop back;
- during training, the step in progress finishes, a checkpoint is saved and training stops
  (:func:`stop_callback` asks the Trainer for both); if that has not happened within
  ``training.stop_grace_seconds``, or a second SIGTERM comes, it stops at once without one.
  A checkpoint is atomic, so being stopped while writing one costs only that checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from sft.core.errors import SftError
from sft.core.notices import notice

__all__ = ["Interrupted", "StopRequest", "as_recorded", "sigterm_stops_training", "stop_callback"]


class Interrupted(SftError):
    """The run was stopped by a signal. Exit status 128 + the signal number, as the shell reports it."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        super().__init__(message)


@dataclass
class StopRequest:
    grace_seconds: float
    requested: bool = False
    training: bool = False
    saved_step: int | None = None
    signalled: bool = False  # a SIGTERM came, whatever the phase


def as_recorded(exc: BaseException, request: StopRequest) -> BaseException:
    """``exc`` as the run records it: an error raised after a SIGTERM came is that stop (an
    :class:`Interrupted`, with ``exc`` as its cause), so every phase is recorded ``interrupted``."""
    if not request.signalled or isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return exc
    stopped = Interrupted("stopped by SIGTERM")
    stopped.__cause__ = exc
    return stopped


@contextlib.contextmanager
def sigterm_stops_training(grace_seconds: float) -> Iterator[StopRequest]:
    """Turn SIGTERM into a graceful stop for the duration of the block (main thread only)."""
    request = StopRequest(float(grace_seconds))
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by SIGTERM: no checkpoint could be saved within "
                          f"training.stop_grace_seconds={request.grace_seconds:g}")

    def on_term(signum: int, frame: Any) -> None:
        request.signalled = True
        if request.requested or not request.training or request.grace_seconds <= 0:
            raise Interrupted("stopped by SIGTERM")
        request.requested = True
        notice(f"SIGTERM: finishing this step and saving a checkpoint (at most "
               f"{request.grace_seconds:g} s; a second SIGTERM stops at once)")
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, request.grace_seconds)

    previous_term = signal.signal(signal.SIGTERM, on_term)
    previous_alarm = signal.getsignal(signal.SIGALRM)
    try:
        yield request
    except Exception as exc:
        recorded = as_recorded(exc, request)
        if recorded is exc:
            raise
        raise recorded from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGALRM, previous_alarm)


def stop_callback(request: StopRequest) -> Any:
    """A ``TrainerCallback`` that marks the training loop and, once SIGTERM came, saves and stops."""
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            request.training = True

        def on_step_end(self, args, state, control, **kwargs):
            if request.requested:
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            if request.requested:
                request.saved_step = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            request.training = False
            if request.requested:
                signal.setitimer(signal.ITIMER_REAL, 0)  # saved in time: the grace alarm is no longer needed

    return _Stop()
