"""Standard streams that fail, and ``-`` as an output: the conventions of git and coreutils.

- ``-`` names stdout for every output option; two outputs of one run cannot both be ``-``.
- A write to stdout that fails (closed, ``/dev/full``) is an error: ``write error: <cause>``
  on stderr and exit ``EXIT_WRITE_ERROR``; the files of a finished run are written before
  anything goes to stdout, so they are kept.
- stdout a pipe whose reader left (``| head -1``): quiet, exit ``EXIT_BROKEN_PIPE`` (141,
  what a shell reports for a process SIGPIPE ended, as git does). 1 would read as "found".
- stderr that fails loses its message, never the exit code the run chose.

stdlib only: ``doctor`` and ``env`` reuse ``is_stdout`` and ``write_output`` for their
outputs, and ``--help`` must stay torch-free.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from fsdpqdiag.report.model import EXIT_BROKEN_PIPE, EXIT_WRITE_ERROR, atomic_write_bytes

STDOUT = "-"


class StdoutWriteError(Exception):
    """A write to stdout failed. Not an OSError, so that click does not turn a broken pipe
    into its own exit 1 on the way out."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or str(cause))
        self.errno = cause.errno
        self.strerror = cause.strerror or os.strerror(cause.errno or errno.EIO)


class OutputWriteError(Exception):
    """An output file could not be written after the work was done (ENOSPC mid-write...)."""


def is_stdout(path: str | Path | None) -> bool:
    return path is not None and str(path) == STDOUT


def write_output(path: str | Path, data: str | bytes) -> None:
    """Write one output: to stdout for ``-``, else atomically to the file."""
    payload = data.encode() if isinstance(data, str) else data
    if is_stdout(path):
        sys.stdout.flush()
        view = memoryview(payload)
        # A pipe whose reader leaves mid-write answers with a short count, not EPIPE: the
        # next write is the one that fails.
        while view:
            written = sys.stdout.buffer.write(view)
            view = view[written:] if written else view[:0]
        sys.stdout.flush()
        return
    try:
        atomic_write_bytes(path, payload)
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {write_problem(exc)}") from None


def write_problem(exc: OSError) -> str:
    """The true cause of a failed write, as a user reads it."""
    name = errno.errorcode.get(exc.errno or 0)
    reason = exc.strerror or str(exc)
    return f"{reason} ({name})" if name else reason


class _Guarded:
    """A standard stream whose failures are turned into ``StdoutWriteError`` (stdout) or
    dropped (stderr)."""

    def __init__(self, stream, is_stdout_stream: bool) -> None:
        self._stream = stream
        self._stdout = is_stdout_stream
        self.buffer = _GuardedBuffer(self) if hasattr(stream, "buffer") else None

    def _call(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except OSError as exc:
            if self._stdout:
                raise StdoutWriteError(exc) from None
            return len(args[0]) if args else None

    def write(self, text):
        return self._call("write", text)

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _GuardedBuffer:
    def __init__(self, owner: _Guarded) -> None:
        self._owner = owner

    def write(self, data: bytes):
        try:
            return self._owner._stream.buffer.write(data)
        except OSError as exc:
            if self._owner._stdout:
                raise StdoutWriteError(exc) from None
            return len(data)

    def __getattr__(self, name):
        return getattr(self._owner._stream.buffer, name)


class _Closed:
    """What stdout is when the command started with it closed (``>&-``): every write fails
    as the write to a closed descriptor would."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self) -> None:
        self.buffer = self

    def write(self, data):
        raise StdoutWriteError(OSError(errno.EBADF, os.strerror(errno.EBADF)))

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 1


def install() -> None:
    """Guard the standard streams of this process (the CLI's entry calls it once).

    A closed descriptor 0, 1 or 2 is reopened on /dev/null first: otherwise the next file
    opened (a report's temporary file) would get that number and a rank would inherit it as
    its stdout.
    """
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
            reopened = os.open(os.devnull, os.O_RDWR)
            if reopened != fd:
                os.dup2(reopened, fd)
                os.close(reopened)
    sys.stdout = _Closed() if 1 in closed or sys.stdout is None else _Guarded(sys.stdout, True)
    if 2 in closed or sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's stderr until it exits)
    else:
        sys.stderr = _Guarded(sys.stderr, False)


def silence_stdout() -> None:
    """After a failed write, point descriptor 1 at /dev/null: the interpreter's last flush
    of what was buffered must not fail again ("Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def run_guarded(call) -> None:
    """``call()`` (the app), ending a stdout failure the documented way; SystemExit passes."""
    try:
        try:
            call()
        finally:
            sys.stdout.flush()
    except StdoutWriteError as exc:
        silence_stdout()
        if exc.errno == errno.EPIPE:
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        sys.stderr.write(f"error: write error: {exc.strerror}\n")
        sys.stderr.flush()
        raise SystemExit(EXIT_WRITE_ERROR) from None
