"""Shared test fixtures.

The repository root goes first on sys.path so the tests exercise this checkout (and the
ranks the launcher spawns, which inherit the package's location) even where another copy
of fsdpqdiag is installed.
"""

from __future__ import annotations

import hashlib
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

from tests.support import (  # noqa: E402 - the checkout first on sys.path
    SMALL_FEATURES,
    CliResult,
    common_dir,
    end_worker_session,
    end_worker_zygotes,
    made_once,
    recorded,
    replayed,
    reproduce_small,
    session_cache,
)

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


@pytest.fixture(scope="session", autouse=True)
def _zygotes_kept_between_tests():
    """The worker's session closes with the test session: no zygote outlives the tests."""
    yield
    end_worker_session()


@pytest.fixture(scope="session", autouse=True)
def _script_runs_shared(tmp_path_factory):
    """A standalone script's line is run once per session, by whichever worker asks first."""
    from tests.support import scripts

    scripts.RUNS_DIR = common_dir(tmp_path_factory, "script-runs")
    yield
    scripts.RUNS_DIR = None


@pytest.fixture
def single_use_zygotes():
    """For tests of what a launch leaves behind: the zygotes the worker's session kept end
    first, so that the test's own launches (a plain api call: a short session of its own)
    are the only processes it can find."""
    end_worker_zygotes()
    yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Presets are built once per test session, in a cache every worker shares (a preset is
    built atomically, so two workers may race), never in the user's real cache. Session-wide,
    so that it is set before a module's fixtures run their commands too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSDPQDIAG_CACHE", str(session_cache(tmp_path_factory)))
        yield


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


@pytest.fixture(scope="session")
def shared_cli(tmp_path_factory):
    """Run ``python -m fsdpqdiag ARGS`` once for the whole session, with ``--json`` and
    ``--markdown``: every test that asks a question of the same command line reads the same
    run. Starting ranks is what the suite's time goes to, so tests in different modules that
    need, say, an uninjected forensics run at world size 1 share one. The result is read-only.

    Under pytest-xdist the runs are shared by all workers (a lock per command line in the
    session's common directory), so a run is never made twice in parallel either.
    """
    root = common_dir(tmp_path_factory, "shared-runs")
    root.mkdir(parents=True, exist_ok=True)

    def run(*args: str, env: dict | None = None, timeout: float = 900) -> CliResult:
        """``{out}`` in ARGS is the run's own directory (``CliResult.out``), for other files it writes."""
        key = json.dumps([args, sorted((env or {}).items())])
        out = root / hashlib.sha256(key.encode()).hexdigest()[:16]
        out.mkdir(exist_ok=True)
        args = tuple(arg.replace("{out}", str(out)) for arg in args)
        json_path, markdown_path = out / "report.json", out / "report.md"
        argv = [sys.executable, "-m", "fsdpqdiag", *args]
        argv += ["--json", str(json_path), "--markdown", str(markdown_path)]
        # The preset cache of the worker that runs it; a preset is built once per cache.
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200", **(env or {}))

        def make() -> dict:
            return recorded(
                subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full_env)
            )

        completed = replayed(made_once(out / "lock", out / "completed.json", make))
        result = CliResult(completed, json_path, markdown_path)
        result.out = out
        if args[0] == "reproduce" and json_path.exists():  # its scripts' lines run as one batch
            from tests.support import scripts

            scripts.register_report(result.report)
        if markdown_path.exists():  # every Markdown a test run writes is fit to publish
            from tests.support.publishable import check_markdown

            check_markdown(markdown_path.read_text(), " ".join(args))
        return result

    return run


@pytest.fixture(scope="session")
def shared_probe(shared_cli):
    """``shared_probe(NAME, WS)``: probe NAME's result in the shared uninjected
    ``reproduce_small(WS)`` run, as the ``ProbeResult`` that
    ``test_reproducers.cpu_probe(NAME, WS)`` returns: the same question (the same probe, layer,
    world size and device, no fault, no environment of its own), answered by the run every
    module shares instead of a launch of its own. Where the run asked anything else, this
    fails rather than hand a test another question's answer."""
    from fsdpqdiag.core.config import LinearConfig
    from fsdpqdiag.report.model import UNSUPPORTED, ProbeResult

    expected = dict(LinearConfig(in_features=SMALL_FEATURES, out_features=SMALL_FEATURES).__dict__)

    def get(name: str, ws: int) -> ProbeResult:
        run = shared_cli(*reproduce_small(ws), timeout=600)
        assert run.json_path.exists(), run.stderr[-3000:]
        (found,) = [r for r in run.report["results"] if r["probe"] == name]
        result = ProbeResult(**found)
        assert result.config == expected, (name, result.config, expected)
        assert (result.world_size, result.device, result.injected) == (ws, "cpu", None), name
        # cpu_probe runs no preflight: a probe it refused answers another question.
        assert result.verdict != UNSUPPORTED, (name, result.summary)
        return result

    return get
