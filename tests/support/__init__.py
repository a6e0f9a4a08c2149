"""What the tests share besides fixtures: the checkout's root, the small layer and the command
lines several modules ask questions of, the worker's api session, a probe run through the real
launcher, and a finished command's result."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small enough for 2 CPU cores, large enough to hold NaN-class packed containers.
SMALL_FEATURES = 256
SMALL_LINEAR = ["--in-features", str(SMALL_FEATURES), "--out-features", str(SMALL_FEATURES)]

# Command lines several test modules ask questions of, each run once (``shared_cli``).
LOCALIZE_WS1 = ("localize", "--device", "cpu", "--in-features", "128", "--out-features", "128", "--ws", "1")


def reproduce_small(ws: int) -> tuple[str, ...]:
    """Every probe at world size ``ws``, uninjected, on the small layer (``shared_probe``)."""
    return ("reproduce", "--ws", str(ws), "--device", "cpu", *SMALL_LINEAR)


def fix_all(ws: int) -> tuple[str, ...]:
    """Every workaround, uninjected."""
    return ("fix", "--ws", str(ws), "--device", "cpu", "--steps", "2", "-q")


def matrix_default(ws: int) -> tuple[str, ...]:
    """Every default cell, uninjected; its CSV in the run's directory."""
    return ("matrix", "--ws", str(ws), "--device", "cpu", "--csv", "{out}/m.csv", "-q")


def forensics_default(ws: int) -> tuple[str, ...]:
    """The tiny-llama preset, uninjected, on this CPU's own bitsandbytes path."""
    return ("forensics", "--device", "cpu", "--ws", str(ws), "-q")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")


# The api session of this test worker (``worker_session``), made at its first use.
_WORKER: dict = {}


def worker_session():
    """The api session a test worker's in-process api calls share (``session=worker_session()``):
    their CPU ranks fork from zygotes it keeps between tests, as the launches of one command
    do, so torch and bitsandbytes are imported once per import environment in a worker, not
    per call. A plain api call (no session) starts and ends its own."""
    from fsdpqdiag import api

    if "session" not in _WORKER:
        _WORKER["session"] = api.Session()
    return _WORKER["session"]


def end_worker_session() -> None:
    """Close the worker's session, if one was made: its zygotes end."""
    if "session" in _WORKER:
        _WORKER.pop("session").close()


def end_worker_zygotes() -> None:
    """End the zygotes the worker's session keeps (the session itself stays open)."""
    if "session" in _WORKER:
        _WORKER["session"].zygotes.close()


class CliResult:
    def __init__(
        self,
        completed: subprocess.CompletedProcess,
        json_path: Path | None,
        markdown_path: Path | None = None,
    ):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.json_path = json_path
        self.markdown_path = markdown_path

    @property
    def report(self) -> dict:
        assert self.json_path is not None
        return json.loads(self.json_path.read_text())


def cpu_probe(name: str, ws: int, inject: str | None = None, **config):
    """One probe through the real launcher on CPU/gloo, on the tests' small layer, in the
    worker's session."""
    from fsdpqdiag import api
    from fsdpqdiag.core.config import LinearConfig, RunConfig

    config = dict(LinearConfig(in_features=SMALL_FEATURES, out_features=SMALL_FEATURES).__dict__, **config)
    run = RunConfig(world_size=ws, device="cpu", timeout_s=300, inject=inject)
    return api.run_probe(name, config, run, session=worker_session())


def common_dir(tmp_path_factory, name: str) -> Path:
    """A directory of the test session that every pytest-xdist worker shares."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


def session_cache(tmp_path_factory) -> Path:
    """The model cache (``FSDPQDIAG_CACHE``) of the test session, shared by its workers."""
    return common_dir(tmp_path_factory, "cache")


def made_once(lock_path: Path, record_path: Path, make: Callable[[], dict]) -> dict:
    """``make()``'s record (JSON), made by whichever worker asks first: the others wait on the
    lock and read it, so a run is neither made twice nor made twice in parallel."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record_path.exists():
            record_path.write_text(json.dumps(make()))
    return json.loads(record_path.read_text())


def recorded(ran: subprocess.CompletedProcess) -> dict:
    """A finished process as ``made_once`` keeps it."""
    return {"args": ran.args, "returncode": ran.returncode, "stdout": ran.stdout, "stderr": ran.stderr}


def replayed(record: dict) -> subprocess.CompletedProcess:
    """The finished process ``recorded`` kept."""
    return subprocess.CompletedProcess(
        record["args"], record["returncode"], record["stdout"], record["stderr"]
    )
