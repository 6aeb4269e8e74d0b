"""SIGTERM (a job scheduler, a shutdown) ends a command like Ctrl-C: runs end KILLED with the reason, exit 143.

Why not only raise from the signal handler: the exception lands on whatever bytecode the main thread is running.
In a weakref callback or a ``__del__`` Python swallows it ("Exception ignored in ..."), and the training went on
to FINISHED; inside a library's half-done database write it turned into another error on the way out. Both were
seen under load in tests/test_resume.py. So the handler records the request, and inside :func:`deferred` (the
training loop) it only records it: the loop calls :func:`check` between steps, where stopping is safe. Outside
it the handler raises at once, as before, and a raise that was swallowed is raised again by the next check.
"""

from __future__ import annotations

import contextlib
import signal

MESSAGE = "terminated by SIGTERM (a job scheduler or a shutdown)"
EXIT_CODE = 143  # 128 + SIGTERM, what shells and schedulers expect


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (``tracking.tracked_run`` ends the run KILLED with this message)."""


_requested = False
_deferring = 0


def _on_sigterm(signum, frame) -> None:
    global _requested
    if _requested:  # a second SIGTERM must not break into the clean-up of the first
        return
    # A second signal can only interrupt this handler before the flag is set; then it raises in here instead and
    # this raise never runs: one Terminated either way.
    _requested = True
    if not _deferring:
        raise Terminated(MESSAGE)


def check() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived: call it where stopping leaves nothing half-done."""
    if _requested:
        raise Terminated(MESSAGE)


@contextlib.contextmanager
def deferred():
    """Within this block SIGTERM waits for the next :func:`check`."""
    global _deferring
    check()
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def _ignore_during_exit(signum, frame) -> None:
    """A SIGTERM after the command was terminated: its exit is under way (the default action would end the
    process by the signal instead of exit 143)."""


@contextlib.contextmanager
def handling_sigterm():
    """Turn SIGTERM into :class:`Terminated` for the duration of a command. Once one arrived, later ones are
    ignored to the end of the process: a scheduler that repeats itself must not kill the exit under way."""
    global _requested
    _requested = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _ignore_during_exit if _requested else previous)
        _requested = False  # in-process callers (tests, notebooks) start their next command clean
