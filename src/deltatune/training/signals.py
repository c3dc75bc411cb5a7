"""Stopping a run: Ctrl-C and SIGTERM become one exception where the run is, and the error that reports it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from deltatune.errors import DeltatuneError


class Interrupted(DeltatuneError):
    """Training was stopped with Ctrl-C or SIGTERM (in a single process, after a checkpoint was written).
    ``exit_code`` is the shell's convention for the signal: 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and containers send to stop a job), raised where the run is, as Ctrl-C is."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so a run stops as on Ctrl-C:
    checkpoint, one line. Only the main thread can set a handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], None]]:
    """Within the block, Ctrl-C and SIGTERM are held and raised only where the returned ``check()`` is called
    (the loop calls it between steps), as KeyboardInterrupt or :class:`Terminated`. So an interrupt never lands
    between an optimizer step and the counters that record it, and the checkpoint it writes resumes exactly.
    Only the main thread can hold signals; elsewhere ``check()`` does nothing."""
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    def check() -> None:
        if pending:
            first = pending[0]
            pending.clear()
            raise Terminated if first == signal.SIGTERM else KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield check
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
