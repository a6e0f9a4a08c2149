"""The standalone reproducers run as a maintainer runs them, each command line once per session.

A script's run is the test suite's dearest step after the tool's own launches (torchrun and a
fresh interpreter per rank, importing torch and bitsandbytes), and several tests ask questions
of the same line. So a line's run is kept in the session's common directory (``RUNS_DIR``, set
by ``conftest``) and shared by every test and every xdist worker that asks for the same line in
the same environment.

The probes' comparisons with their scripts (``standalone``) read the lines of one shared
``reproduce`` run (``register_report``): those run together, in one launch at the run's world
size (``tests/support/script_batch.py``: each script's ``main()`` after the other in one interpreter
per rank, its own argv, process group and output), their exit status the one torchrun would
give. The check that each line a report prints gives the tool's verdict runs the line itself,
as a maintainer would (``run_script``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, made_once, recorded, replayed

# Set by conftest to a directory every worker of the session shares; None runs every line anew.
RUNS_DIR: Path | None = None
# A line (script and options, with --json) -> every line of the shared run it came from, at its
# world size: the lines that run in one launch (``register_report``).
_BATCH_OF: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {}

EXIT_STATUS = {"REPRODUCED": 1, "NOT REPRODUCED": 0, "INCONCLUSIVE": 2}


def exit_status(verdict: str, ws: int) -> int:
    """A script's exit status for the tool's verdict: torchrun turns any rank's failure into 1."""
    status = EXIT_STATUS.get(verdict, 2)
    return min(status, 1) if ws > 1 else status


def json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in ``text``: ranks under torchrun may share a line."""
    decoder, found, index = json.JSONDecoder(), [], text.find("{")
    while index != -1:
        obj, end = decoder.raw_decode(text, index)
        found.append(obj)
        index = text.find("{", end)
    return found


def line_arguments(result) -> tuple[list[str], int]:
    """The script and options of the line a report prints for ``result`` (a ``ProbeResult`` or
    its dict), and the world size it runs at."""
    from fsdpqdiag.render import reproducer
    from fsdpqdiag.report.model import ProbeResult

    if isinstance(result, dict):
        result = ProbeResult(**result)
    words = shlex.split(reproducer.command(result))
    script_at = next(i for i, word in enumerate(words) if word.endswith(".py"))
    ws = int(words[words.index("--nproc-per-node") + 1]) if words[0] == "torchrun" else 1
    return words[script_at:], ws


def register_report(report: dict) -> None:
    """The lines of a shared ``reproduce`` run's results, by world size, to run as one batch."""
    from fsdpqdiag.render import reproducer
    from fsdpqdiag.report.model import ProbeResult

    by_ws: dict[int, list[tuple[str, ...]]] = {}
    for found in report["results"]:
        result = ProbeResult(**found)
        if reproducer.command(result) is not None:
            args, ws = line_arguments(result)
            by_ws.setdefault(ws, []).append((*args, "--json"))
    for lines in by_ws.values():
        for line in lines:
            _BATCH_OF.setdefault(line, tuple(lines))


def standalone(result) -> list[dict]:
    """The line a report prints for ``result``, run with ``--json``: its ranks' JSON objects,
    after checking that it printed the result's verdict and exited with that verdict's status."""
    args, ws = line_arguments(result)
    verdict = result["verdict"] if isinstance(result, dict) else result.verdict
    line = (*args, "--json")
    if RUNS_DIR is None or line not in _BATCH_OF:
        return run_script(list(line), ws, verdict=verdict)
    return check_script(run_batched(line, _BATCH_OF[line], ws), ws, verdict)


def run_script(args: list[str], ws: int, *, verdict: str) -> list[dict]:
    """A standalone script (path and options, from the checkout's root) at world size ``ws``,
    which must print one line starting ``verdict`` and exit with its status; its ranks' JSON
    objects (``--json``), by rank."""
    return check_script(launch_script(args, ws), ws, verdict)


def check_script(done: subprocess.CompletedProcess, ws: int, verdict: str) -> list[dict]:
    assert done.returncode == exit_status(verdict, ws), (verdict, done.stdout[-2000:], done.stderr[-3000:])
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(tuple(EXIT_STATUS))]
    assert len(verdicts) == 1, done.stdout[-3000:]
    assert verdicts[0].split(" ws=")[0] == verdict, (verdicts[0], verdict)
    return sorted(json_objects(done.stdout), key=lambda line: line["rank"])


def _launcher(ws: int) -> list[str]:
    """How a maintainer starts a script at world size ``ws``: python alone, or torchrun."""
    if ws == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ws)]


def _environment() -> dict[str, str]:
    """This environment less the rank variables a test run under torchrun would pass on."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def launch_script(args: list[str], ws: int) -> subprocess.CompletedProcess:
    """``python SCRIPT ...`` (``torchrun`` for several ranks), once per line and environment."""
    env, argv = _environment(), [*_launcher(ws), *args]

    def make() -> dict:
        return recorded(subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env))

    if RUNS_DIR is None:
        return replayed(make())
    # What a script reads besides its options: the tool's own switches (the bitsandbytes CPU path).
    settings = sorted((k, v) for k, v in env.items() if k.startswith("FSDPQDIAG_") and k != "FSDPQDIAG_CACHE")
    key = hashlib.sha256(json.dumps([args, ws, settings]).encode()).hexdigest()[:16]
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    return replayed(made_once(RUNS_DIR / f"{key}.lock", RUNS_DIR / f"{key}.json", make))


def run_batched(
    line: tuple[str, ...], batch: tuple[tuple[str, ...], ...], ws: int
) -> subprocess.CompletedProcess:
    """``line``'s run within ``batch``'s one launch (made once per session): what it printed,
    by rank, and the exit status ``python`` (one rank) or torchrun (any failing rank: 1) gives.
    Where the batch's launch itself fails (a script that kills its process), each line of it
    runs alone instead."""
    key = hashlib.sha256(json.dumps([batch, ws]).encode()).hexdigest()[:16]
    where = RUNS_DIR / f"batch-{key}"
    where.mkdir(parents=True, exist_ok=True)

    def make() -> dict:
        (where / "plan.json").write_text(json.dumps([list(args) for args in batch]))
        port = str(_free_ports(len(batch)))
        argv = [*_launcher(ws), "tests/support/script_batch.py", str(where / "plan.json"), str(where), port]
        ran = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_environment())
        return recorded(ran)

    made_once(where / "lock", where / "launched.json", make)
    ranks = [where / f"rank{rank}.json" for rank in range(ws)]
    if not all(path.exists() for path in ranks):
        return launch_script(list(line), ws)
    index = batch.index(line)
    ran = [json.loads(path.read_text())[index] for path in ranks]
    statuses = [r["status"] for r in ran]
    status = statuses[0] if ws == 1 else int(any(statuses))
    return subprocess.CompletedProcess(list(line), status, "".join(r["stdout"] for r in ran), "")


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    import random
    import socket

    for _ in range(50):
        first = random.randrange(20000, 60000 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports")
