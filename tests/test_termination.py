"""SIGTERM ends a command cleanly even where Python would swallow the exception (training.core.termination)."""

import os
import signal
import weakref

import pytest

from training.core import termination
from training.core.termination import Terminated


def sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(autouse=True)
def pytest_keeps_its_sigterm_handler():
    """A command that was terminated keeps ignoring SIGTERM to its exit; this process goes on, so restore."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_outside_the_training_loop_sigterm_raises_at_once_and_later_ones_are_ignored():
    with termination.handling_sigterm():
        with pytest.raises(Terminated, match="terminated by SIGTERM"):
            sigterm_self()
            for _ in range(10**6):  # the handler runs between bytecodes
                pass
    sigterm_self()  # the exit is under way: the default action would end the process by the signal
    for _ in range(10**6):
        pass
    assert signal.getsignal(signal.SIGTERM) is termination._ignore_during_exit
    termination.check()  # and nothing is left pending for the next command in this process


def test_a_command_that_was_not_terminated_gives_the_previous_handler_back():
    previous = signal.getsignal(signal.SIGTERM)
    with termination.handling_sigterm():
        assert signal.getsignal(signal.SIGTERM) is termination._on_sigterm
    assert signal.getsignal(signal.SIGTERM) is previous


def test_two_signals_close_together_raise_once_and_the_clean_up_runs():
    raised, cleaned = [], []
    with termination.handling_sigterm():
        for _ in range(20):  # the second signal lands before, inside or after the first one's handler
            termination._requested = False
            try:
                try:
                    sigterm_self()
                    sigterm_self()
                    for _ in range(10**5):
                        pass
                finally:
                    for _ in range(10**5):
                        pass
                    cleaned.append(True)
            except Terminated:
                raised.append(True)
    assert len(raised) == 20 and len(cleaned) == 20


def test_inside_the_training_loop_sigterm_waits_for_the_next_check():
    reached = []
    with termination.handling_sigterm(), pytest.raises(Terminated):
        with termination.deferred():
            sigterm_self()
            for _ in range(10**6):
                pass
            reached.append("after the signal")  # nothing broke into the step
            termination.check()
            reached.append("after the check")
    assert reached == ["after the signal"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing is the point
def test_a_sigterm_swallowed_by_a_weakref_callback_is_raised_again_by_the_next_check():
    class Thing:
        pass

    def callback(_):
        sigterm_self()  # the handler's exception is raised here, inside the callback, and Python ignores it

    with termination.handling_sigterm():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # "Exception ignored in: <function ...callback>": the work would go on
        assert ref() is None
        with pytest.raises(Terminated):
            termination.check()


def test_a_second_sigterm_does_not_break_into_the_clean_up_of_the_first():
    cleaned = []
    with termination.handling_sigterm(), pytest.raises(Terminated):
        try:
            sigterm_self()
            for _ in range(10**6):
                pass
        finally:
            sigterm_self()  # a scheduler repeating itself while the run is being marked KILLED
            for _ in range(10**6):
                pass
            cleaned.append(True)
    assert cleaned == [True]
