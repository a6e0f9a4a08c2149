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
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA = "fsdpqdiag.report/1"

REPRODUCED = "REPRODUCED"
NOT_REPRODUCED = "NOT REPRODUCED"
CRASHED = "CRASHED"
ERROR = "ERROR"
TIMEOUT = "TIMEOUT"
SKIPPED = "SKIPPED"
# The evidence contradicts itself (e.g. the output moved while every byte survived):
# something is wrong, but not the mechanism this probe detects.
INCONCLUSIVE = "INCONCLUSIVE"
# Verdicts of `fix`: a workaround is bit-identical to training without FSDP, or not.
VERIFIED = "VERIFIED"
NOT_VERIFIED = "NOT VERIFIED"
# A precondition of the probe failed in the stack preflight (a collective it relies on fails
# on ordinary tensors, a device/backend that cannot run it): the stack decided, not the bug.
UNSUPPORTED = "UNSUPPORTED"
VERDICTS = (
    REPRODUCED,
    NOT_REPRODUCED,
    CRASHED,
    ERROR,
    TIMEOUT,
    SKIPPED,
    INCONCLUSIVE,
    VERIFIED,
    NOT_VERIFIED,
    UNSUPPORTED,
)

# Exit codes: a contract, printed by --help.
EXIT_CLEAN = 0
EXIT_FOUND = 1
EXIT_BAD_INPUT = 2
EXIT_PROBE_FAILED = 3
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = (
    "Exit codes: 0 nothing reproduced; 1 something REPRODUCED, CRASHED or INCONCLUSIVE; "
    "2 bad input (nothing run, nothing written); 3 a probe ended in ERROR, TIMEOUT or UNSUPPORTED "
    "(and nothing was found); 130 interrupted (Ctrl-C: every rank stopped, nothing half-written)."
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
    # The stack preflight of each run (fsdpqdiag.preflight); empty in reports made before it.
    preflight: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
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
        try:
            results = [ProbeResult(**item) for item in data["results"]]
            fields = {k: v for k, v in data.items() if k != "results"}
            return cls(results=results, **fields)
        except (KeyError, TypeError) as exc:
            raise ReportError(f"malformed {SCHEMA} report: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Report:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ReportError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ReportError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        return cls.from_dict(data)

    def exit_code(self) -> int:
        if self.command == "fix":
            # The unfixed reference row is expected to break where the bug reproduces.
            fixed = {r.verdict for r in self.results if r.config.get("workaround") != "none"}
            if NOT_VERIFIED in fixed:
                return EXIT_FOUND
            return EXIT_PROBE_FAILED if fixed & {ERROR, TIMEOUT, CRASHED, UNSUPPORTED} else EXIT_CLEAN
        verdicts = {r.verdict for r in self.results}
        if verdicts & {REPRODUCED, CRASHED, INCONCLUSIVE}:
            return EXIT_FOUND
        if verdicts & {ERROR, TIMEOUT, UNSUPPORTED}:
            return EXIT_PROBE_FAILED
        return EXIT_CLEAN


def _json_safe(value: Any) -> Any:
    """Non-finite floats become strings: strict JSON has no NaN, and a report must parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: never a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a report is an ordinary file, so honour the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path) -> None:
    """Fail before any work when ``path`` cannot be written; creates nothing."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"{path} is a directory")
    if not parent.is_dir():
        raise ValueError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{path} is not writable")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise ValueError(f"the file system of {parent} is full")


def json_schema() -> dict[str, Any]:
    return json.loads(resources.files("fsdpqdiag").joinpath("schema/report-1.json").read_text())
