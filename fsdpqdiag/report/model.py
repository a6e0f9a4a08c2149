"""Reports are data with a schema: one dataclass tree, one JSON Schema, atomic writes.

Tables and Markdown are views of a ``Report``; ``compare`` reads two of them back. The
schema name carries its version: a reader refuses a version it does not know rather
than guess what an unknown field means.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from fsdpqdiag.core.verdict import VerdictKind
from fsdpqdiag.report.commands import EXIT_CLEAN, EXIT_FOUND, EXIT_PROBE_FAILED, kind_of  # noqa: F401 - importable from here
from fsdpqdiag.report.redact import redact_argv

SCHEMA = "fsdpqdiag.report/1"

# The verdicts, as names importable from here (fsdpqdiag.core.verdict holds the Enum and why).
REPRODUCED = VerdictKind.REPRODUCED
NOT_REPRODUCED = VerdictKind.NOT_REPRODUCED
CRASHED = VerdictKind.CRASHED
ERROR = VerdictKind.ERROR
TIMEOUT = VerdictKind.TIMEOUT
SKIPPED = VerdictKind.SKIPPED
INCONCLUSIVE = VerdictKind.INCONCLUSIVE
VERIFIED = VerdictKind.VERIFIED
NOT_VERIFIED = VerdictKind.NOT_VERIFIED
UNSUPPORTED = VerdictKind.UNSUPPORTED
STATE_LOST = VerdictKind.STATE_LOST
NO_FIX_NEEDED = VerdictKind.NO_FIX_NEEDED
REFUSED = VerdictKind.REFUSED
VERDICTS = tuple(VerdictKind)

# Exit codes: a contract, printed by --help (those that results decide: report.commands).
EXIT_BAD_INPUT = 2
# 128 + the signal's number, as a shell reports a process a signal ended: SIGINT 130,
# SIGTERM 143, SIGHUP 129 (each ends the run the same way).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_HUNG_UP = 129
# An output could not be written after the work was done: stdout closed or full, a file
# system full mid-write (sysexits.h's EX_IOERR).
EXIT_WRITE_ERROR = 74
# stdout was a pipe whose reader left (| head): quiet, 128 + SIGPIPE as git ends then.
EXIT_BROKEN_PIPE = 141
EXIT_CODES_HELP = (
    "Exit codes: 0 nothing reproduced; 1 something REPRODUCED, CRASHED or INCONCLUSIVE; "
    "2 bad input (nothing run, nothing written); 3 a probe ended in ERROR, TIMEOUT or UNSUPPORTED "
    "(and nothing was found); a configuration the stack's API REFUSED is its answer, not a failure; "
    "130 interrupted (Ctrl-C: every rank stopped, nothing half-written); "
    "143 / 129 the same after SIGTERM / SIGHUP; 74 an output could not be written (stdout closed or "
    "full, a disk full mid-write: 'write error: ...' on stderr; the files written before it are kept); "
    "141 stdout was a pipe closed by its reader (| head): quiet, as git. '-' as an output is stdout."
)


# Below this a report cannot be written whole; refuse before any work instead of after.
MIN_FREE_BYTES = 1 << 20


class ReportError(ValueError):
    """A file that is not a report this version of fsdpqdiag can read."""


@dataclass
class ProbeResult:
    probe: str
    verdict: str
    world_size: int
    device: str
    backend: str
    config: dict[str, Any]
    injected: str | None
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    duration_s: float = 0.0


@dataclass
class Report:
    command: str
    argv: list[str]
    env: dict[str, Any]
    results: list[ProbeResult]
    schema: str = SCHEMA
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    world_sizes: list[int] = field(default_factory=list)
    fsdpqdiag_version: str = ""
    # Conclusions computed over all results (e.g. the matrix's invariance analysis).
    analysis: dict[str, Any] = field(default_factory=dict)
    # The stack preflight of each run (fsdpqdiag.analyses.preflight); empty in reports made before it.
    preflight: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The report is a file that travels (attached to an issue, committed): the command line
        # it records keeps what reruns the run, not its output paths or a credential.
        self.argv = redact_argv(self.argv)
        if not self.fsdpqdiag_version:
            from fsdpqdiag import __version__

            self.fsdpqdiag_version = __version__
        if not self.world_sizes:
            self.world_sizes = sorted({r.world_size for r in self.results})

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Report:
        if not isinstance(data, dict) or "schema" not in data:
            raise ReportError("not an fsdpqdiag report (no 'schema' field)")
        if data["schema"] != SCHEMA:
            raise ReportError(
                f"unsupported report schema {data['schema']!r}; this fsdpqdiag reads {SCHEMA!r}"
            )
        # Whatever is rendered or compared is what the schema allows: a hand-edited verdict
        # or a missing field is refused here, not half-rendered.
        schema_violation(data)
        try:
            results = [ProbeResult(**item) for item in data["results"]]
            fields = {k: v for k, v in data.items() if k != "results"}
            return cls(results=results, **fields)
        except (KeyError, TypeError) as exc:
            raise ReportError(f"malformed {SCHEMA} report: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Report:
        from fsdpqdiag.core import bounded_json

        data = bounded_json.load_file(path, bounded_json.REPORT_LIMITS, error=ReportError)
        try:
            return cls.from_dict(data)
        except ReportError as exc:
            raise ReportError(f"{path}: {exc}") from exc

    def exit_code(self) -> int:
        """The exit status its command gives for these results (``report.commands``)."""
        return kind_of(self.command).exit_code(self)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become strings: strict JSON has no NaN, and a report must parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def output_target(path: str | Path) -> Path:
    """Where a write to ``path`` lands. A symlink is written through, deliberately: the
    link stays, its target gets the report (renaming over the link would replace it)."""
    return Path(os.path.realpath(path))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: never a torn file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``atomic_write_text`` for bytes (PNG, Parquet).

    The rename lands on whatever is at the target, so only a regular file (or nothing) may
    be there: renaming over /dev/full or a FIFO would replace the node (and leave a FIFO's
    reader blocked forever). An existing file keeps its mode.
    """
    target = output_target(path)
    existing_mode = _regular_file_mode(target)
    if existing_mode is None:
        # mkstemp creates 0600; a report is an ordinary file, so honour the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    else:
        mode = existing_mode
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _regular_file_mode(target: Path, subject: str = "") -> int | None:
    """The permission bits of the regular file at ``target``, None when nothing is there;
    ValueError for anything else (directory, device, FIFO, socket)."""
    subject = subject or str(target)
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(status.st_mode):
        raise ValueError(f"{subject} is a directory")
    if not stat.S_ISREG(status.st_mode):
        raise ValueError(f"{subject} is a {_file_kind(status.st_mode)}, not a regular file")
    return stat.S_IMODE(status.st_mode)


def _file_kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def check_writable(path: str | Path) -> None:
    """Fail before any work when ``path`` cannot be written as a regular file; creates
    nothing. The message completes "cannot write PATH: ..."."""
    target = output_target(path)
    subject = "it" if str(target) == os.path.abspath(path) else f"its link target {target}"
    try:
        mode = _regular_file_mode(target, subject)
    except OSError as exc:
        raise ValueError(exc.strerror) from None
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"directory {parent} does not exist")
    _check_name_length(target)
    _check_file_system(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"directory {parent} is not writable (permission denied, EACCES)")
    # root passes os.access on anything, so a file nobody may write is refused by its mode.
    if mode is not None and (not os.access(target, os.W_OK) or not mode & 0o222):
        raise ValueError(f"{subject} is read-only (permission denied, EACCES)")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise ValueError(f"the file system of {parent} is full (no space left on device, ENOSPC)")


def _check_name_length(target: Path) -> None:
    """The write goes through ".NAME.XXXXXXXX.tmp" in the same directory: a name that fits
    alone but not with that around it would fail only after the run."""
    try:
        name_max = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(f".{target.name}.xxxxxxxx.tmp".encode(errors="surrogateescape")) > name_max:
        raise ValueError(f"its file name is too long (ENAMETOOLONG: at most {name_max - 14} bytes here)")


# Kernel interfaces mounted as file systems: a report can never be a file there.
PSEUDO_FILE_SYSTEMS = frozenset(
    "proc sysfs cgroup cgroup2 debugfs tracefs securityfs pstore bpf configfs efivarfs devpts "
    "mqueue fusectl binfmt_misc autofs".split()
)


def _check_file_system(directory: Path) -> None:
    """Pseudo file systems (/proc, /sys) and read-only mounts, named as such: neither is
    "full" (a pseudo file system reports no free blocks)."""
    kind = _file_system_type(directory)
    if kind in PSEUDO_FILE_SYSTEMS:
        raise ValueError(f"{directory} is on the {kind} pseudo file system, not writable")
    try:
        status = os.statvfs(directory)
    except OSError:
        return
    if status.f_flag & os.ST_RDONLY:
        raise ValueError(f"the file system of {directory} is mounted read-only (EROFS)")


def _file_system_type(directory: Path) -> str | None:
    """The type of the mount holding ``directory`` (Linux /proc/self/mounts), else None."""
    resolved = os.path.realpath(directory)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    best, kind = "", None
    for entry in entries:
        if len(entry) < 3:
            continue
        point = entry[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, entry[2]
    return kind


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when writing ``a`` would overwrite ``b`` (links, ``..``, hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return output_target(a) == output_target(b)


def json_schema() -> dict[str, Any]:
    return json.loads(resources.files("fsdpqdiag.report").joinpath("schema/report-1.json").read_text())


def schema_violation(data: Any) -> None:
    """ReportError (one line: where and what) when ``data`` does not match ``json_schema()``."""
    try:
        import jsonschema
    except ImportError:  # a declared dependency, missing where the package was copied, not installed
        raise ReportError(
            "cannot check the report against its schema: jsonschema is not installed (pip install jsonschema)"
        ) from None

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(json_schema()).iter_errors(data))
    if error is None:
        return
    where = "/".join(str(part) for part in error.absolute_path) or "the top level"
    message = " ".join(error.message.split())
    if len(message) > 160:
        message = message[:157] + "..."
    raise ReportError(f"does not match the {SCHEMA} schema at {where}: {message}")
