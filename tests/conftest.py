"""Shared test fixtures.

The repository root goes first on sys.path so the tests exercise this checkout (and the
ranks the launcher spawns, which inherit the package's location) even where another copy
of fsdpqdiag is installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# hypothesis keeps caches in ./.hypothesis unless told otherwise: not in the checkout.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "fsdpqdiag-hypothesis")
)

# A suite started in the background (`cmd &` in a script, nohup, some CI runners) inherits
# SIGINT and SIGHUP ignored, and so would every command the tests start: the tests that
# interrupt a run would wait out their timeouts. Python's own dispositions, as a terminal
# gives them; the test of an ignored SIGHUP ignores it itself.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

# Small enough for 2 CPU cores, large enough to hold NaN-class packed containers.
SMALL_LINEAR = ["--in-features", "256", "--out-features", "256"]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Presets are built once per test session, never in the user's real cache.
    monkeypatch.setenv("FSDPQDIAG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


class CliResult:
    def __init__(self, completed: subprocess.CompletedProcess, json_path: Path | None):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.json_path = json_path

    @property
    def report(self) -> dict:
        assert self.json_path is not None
        return json.loads(self.json_path.read_text())


@pytest.fixture
def run_cli(tmp_path):
    """Run ``python -m fsdpqdiag ARGS`` as a user would; ``json=True`` adds --json."""

    def run(*args: str, json: bool = False, timeout: float = 600, env: dict | None = None) -> CliResult:
        json_path = tmp_path / "report.json" if json else None
        argv = [sys.executable, "-m", "fsdpqdiag", *args]
        if json_path is not None:
            argv += ["--json", str(json_path)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200", **(env or {}))
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        return CliResult(completed, json_path)

    return run
