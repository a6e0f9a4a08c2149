"""SIGINT, SIGTERM and SIGHUP end a run alike, as the exception Python raises for Ctrl-C.

The CLI makes SIGTERM and SIGHUP raise ``Stopped`` (``install_stop_handlers``); while ranks
run, ``launch`` latches all three (``interrupts_latched``) so that none is lost. Whatever
the signal, the exception is a KeyboardInterrupt, and the launcher, which owns the ranks,
kills and reaps them as it passes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

# SIGTERM (timeout, Slurm, Kubernetes) and SIGHUP (a closed terminal) end a run the way
# Ctrl-C does: ranks killed and reaped, the launch directory removed, nothing half-written;
# the exit code is 128 + the signal's number (130, 143, 129).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Python raises KeyboardInterrupt for SIGINT, so every
    path that cleans up after Ctrl-C cleans up after them too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signal_of(exc: BaseException) -> int:
    """The signal that raised ``exc`` (a KeyboardInterrupt): SIGINT unless it says otherwise."""
    return getattr(exc, "signum", signal.SIGINT)


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


# The signal the process-wide handler saw last: the CLI reads it where typer has already
# turned the exception into its own exit 130.
_stop_received: int | None = None


def raise_stop(signum, frame) -> None:
    """The process-wide SIGTERM/SIGHUP handler the CLI installs (see ``install_stop_handlers``)."""
    global _stop_received
    _stop_received = signum
    raise Stopped(signum)


def install_stop_handlers() -> None:
    """SIGTERM and SIGHUP raise ``Stopped`` from now on, where their action is the default
    (a SIGHUP ignored by nohup stays ignored)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, raise_stop)


def stop_received() -> int | None:
    return _stop_received


# A stop must never be lost. Python raises KeyboardInterrupt between bytecodes, and when that
# happens inside one of the at-fork callbacks subprocess.Popen runs (logging's _releaseLock),
# the exception is printed as "Exception ignored" and dropped: a sweep interrupted while
# spawning a rank ran on to the end (seen about one run in three). The latch remembers the
# signal, and the launch loop raises it again at its next step.
_interrupt_pending: int | None = None


def _latch_interrupt(signum, frame) -> None:
    global _interrupt_pending, _stop_received
    _interrupt_pending = signum
    if signum != signal.SIGINT:
        _stop_received = signum
    raise _stop_exception(signum)


def raise_if_interrupted() -> None:
    """Raise again the stop the latch remembers, if one arrived (see ``interrupts_latched``)."""
    if _interrupt_pending is not None:
        raise _stop_exception(_interrupt_pending)


def _handler_is_pythons_own(signum: int) -> bool:
    """SIGINT with Python's KeyboardInterrupt handler; SIGTERM/SIGHUP with their default
    action (which would kill the launcher with its temporary directory in place) or the
    CLI's ``raise_stop``. A caller that ignores or handles a signal itself keeps its choice."""
    handler = signal.getsignal(signum)
    if signum == signal.SIGINT:
        return handler is signal.default_int_handler
    return handler is signal.SIG_DFL or handler is raise_stop


@contextlib.contextmanager
def interrupts_latched() -> Iterator[None]:
    """Latch the stop signals while ranks run, where their handler is Python's own."""
    global _interrupt_pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        signum: signal.signal(signum, _latch_interrupt)
        for signum in STOP_SIGNALS
        if _handler_is_pythons_own(signum)
    }
    try:
        yield
    except KeyboardInterrupt:
        _interrupt_pending = None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
