"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

Offers `GracefulStop`, a context manager that turns the first SIGINT or SIGTERM into a
request (the trainer finishes the step it is in, writes a checkpoint and raises
`TrainingInterrupted`) and a second one into an immediate KeyboardInterrupt, and
`TrainingInterrupted`, which carries the checkpoint written and the exit status (128 + the
signal number, as a shell reports a process the signal killed).

Outside the main thread signal handlers cannot be installed; there the context does nothing
and a signal keeps its default behaviour.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint` at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, Path(checkpoint)
        super().__init__(f"{signal.Signals(signum).name} at step {step}; saved {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """`with GracefulStop() as stop:` ... `if stop.signum is not None:` finish up."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: the user does not want to wait
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
