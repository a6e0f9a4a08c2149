"""Two nodes on one machine: two torchrun agents, as ``srun`` starts one per node.

``--nnodes 2``, c10d rendezvous on 127.0.0.1, each agent its own process tree; LOCAL_RANK
differs from RANK on one.

``watch`` runs once per agent, as it would once per node: with the injected fault both exit 1 and
one report (written by rank 0's node alone, gathered over the job, not a shared folder) holds both
nodes' ranks; without it both exit 0; a job that never shards is one "nothing checked" report
and both exit 3; a node killed mid-run leaves the other a bounded wait and a result naming the
lost rank. ``reproduce`` and ``matrix --out`` / ``--resume`` under the two agents: one node
writes, both exit with the same code, and a resumed sweep runs on both nodes what the writing
node's record holds. Each node has a folder of its own, as nodes without a shared file system.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsdpqdiag.report.model import Report
from tests.support import ROOT
from tests.support.procs import descendants_of

SCRIPT = ROOT / "tests" / "support" / "multinode_train.py"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agent(node: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
        "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
    ]  # fmt: skip


def _start_nodes(tmp: Path, command, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """``command(node, port)``: the argv each node runs, in its own folder and session."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200", OMP_NUM_THREADS="1", **(extra_env or {}))
    nodes = []
    for node in (0, 1):
        folder = tmp / f"node{node}"
        folder.mkdir(exist_ok=True)  # a test may have put files there first
        nodes.append(
            subprocess.Popen(
                command(node, port),
                cwd=folder,
                env=env,
                start_new_session=True,
                stdout=open(folder / "out", "w"),
                stderr=open(folder / "err", "w"),
            )  # fmt: skip
        )
    return nodes


def _finish(nodes: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [node.wait(timeout=max(1, deadline - time.monotonic())) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                _kill_tree(node.pid)


def _kill_tree(pid: int) -> None:
    """A node dies: its watch, its agent and the agent's workers (in sessions of their own)."""
    for victim in [pid, *descendants_of(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _watch(watch_args: list[str], script_args: list[str]):
    def command(node: int, port: int) -> list[str]:
        return [
            sys.executable, "-m", "fsdpqdiag", "watch", *watch_args, "--",
            *_agent(node, port), str(SCRIPT), *script_args,
        ]  # fmt: skip

    return command


def _text(tmp: Path, node: int, name: str) -> str:
    return (tmp / f"node{node}" / name).read_text()


def _reproduce(node: int, port: int) -> list[str]:
    return [
        *_agent(node, port), "-m", "fsdpqdiag", "reproduce", "--device", "cpu",
        "--probe", "nan-canonicalization", "--inject", "nan-canonicalize", "--json", "r.json", "-q",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, tuple[Path, list[int]]]:
    """The module's two-node jobs that need nothing from one another, started together: each
    spends much of its time waiting (rendezvous, the guard's gather, the agents' exit barrier),
    and one launch after another would add those waits up. Name: (its folder, both exit codes)."""
    commands = {
        "injected": _watch(["--json", "w.json", "--inject", "nan-canonicalize"], ["2"]),
        "clean": _watch(["--json", "w.json"], ["2"]),
        "unsharded": _watch(["--json", "w.json", "-q"], ["unsharded"]),
        "sweep": _matrix(*SWEEP_OPTIONS, "--out", "sweep"),
        "reproduce": _reproduce,
    }
    started = {}
    for name, command in commands.items():
        tmp = tmp_path_factory.mktemp(f"two-nodes-{name}")
        started[name] = (tmp, _start_nodes(tmp, command))
    return {name: (tmp, _finish(nodes, timeout=600)) for name, (tmp, nodes) in started.items()}


@pytest.fixture(scope="module")
def injected(jobs):
    return jobs["injected"]


def test_two_watches_exit_1_and_one_report_holds_both_nodes(injected):
    tmp, codes = injected
    assert codes == [1, 1], [_text(tmp, n, "err")[-3000:] for n in (0, 1)]
    written = [node for node in (0, 1) if (tmp / f"node{node}" / "w.json").exists()]
    assert len(written) == 1, "exactly one node writes the job's report"
    (writer,) = written
    other = 1 - writer
    report = Report.load(tmp / f"node{writer}" / "w.json")
    (result,) = report.results
    assert result.verdict == "REPRODUCED" and result.world_size == 2
    assert sorted(rank["rank"] for rank in result.ranks) == [0, 1]
    assert result.evidence["job"]["ranks_answered"] == [0, 1] and result.evidence["job"]["lost_ranks"] == []
    nan_weights = set(_text(tmp, 0, "out").split("nan-weights ", 1)[1].split()[0].split(","))
    assert {m["module"] for m in result.evidence["modules"]} == nan_weights
    # every altered weight was seen by both nodes' ranks, each in its own slice
    assert all(sorted(m["ranks"]) == [0, 1] for m in result.evidence["modules"])
    assert f"writes the job's report: {tmp / f'node{writer}' / 'w.json'}" in _text(tmp, other, "err")
    assert "REPRODUCED" in _text(tmp, other, "out")


def test_a_node_killed_mid_run_leaves_the_other_a_result_naming_the_lost_rank(tmp_path):
    nodes = _start_nodes(
        tmp_path,
        _watch(["--json", "w.json"], ["100000", "0.2"]),
        {"FSDPQDIAG_GUARD_GATHER_TIMEOUT": "5"},
    )
    deadline = time.monotonic() + 300
    while not any("step 2 " in _text(tmp_path, n, "out") for n in (0, 1)):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes)
        time.sleep(0.3)
    _kill_tree(nodes[1].pid)
    began = time.monotonic()
    (code,) = _finish(nodes[:1], timeout=240)
    assert time.monotonic() - began < 240
    assert code != 0, "a job that lost a node is not a clean run"
    report = Report.load(tmp_path / "node0" / "w.json")
    (result,) = report.results
    lost = result.evidence["job"]["lost_ranks"]
    assert len(lost) == 1 and lost[0] in (0, 1)
    assert f"rank(s) {lost[0]} lost" in result.summary
    assert result.verdict == "ERROR"


def test_reproduce_under_two_agents_one_node_writes_both_exit_alike(jobs):
    tmp_path, codes = jobs["reproduce"]
    assert codes[0] == codes[1] == 1, [_text(tmp_path, n, "err")[-3000:] for n in (0, 1)]
    written = [n for n in (0, 1) if (tmp_path / f"node{n}" / "r.json").exists()]
    assert len(written) == 1
    report = json.loads((tmp_path / f"node{written[0]}" / "r.json").read_text())
    assert report["world_sizes"] == [2] and report["results"][0]["verdict"] == "REPRODUCED"


def _one_writer(tmp: Path, name: str) -> tuple[int, int]:
    """(the node that wrote ``name``, the other one): exactly one wrote it."""
    written = [node for node in (0, 1) if (tmp / f"node{node}" / name).exists()]
    assert len(written) == 1, f"exactly one node writes {name}: {written}"
    return written[0], 1 - written[0]


@pytest.fixture(scope="module")
def clean(jobs):
    return jobs["clean"]


def test_two_watches_of_a_clean_run_exit_0_and_one_report_holds_both_nodes(clean):
    tmp, codes = clean
    assert codes == [0, 0], [_text(tmp, n, "err")[-3000:] for n in (0, 1)]
    writer, other = _one_writer(tmp, "w.json")
    (result,) = Report.load(tmp / f"node{writer}" / "w.json").results
    assert result.verdict == "NOT REPRODUCED" and result.world_size == 2
    assert sorted(rank["rank"] for rank in result.ranks) == [0, 1]
    assert result.evidence["job"]["ranks_answered"] == [0, 1] and result.evidence["job"]["lost_ranks"] == []
    assert result.evidence["checks"] > 0 and result.evidence["modules"] == []
    assert f"writes the job's report: {tmp / f'node{writer}' / 'w.json'}" in _text(tmp, other, "err")


@pytest.fixture(scope="module")
def unsharded(jobs):
    return jobs["unsharded"]


def test_a_job_that_never_shards_is_one_nothing_checked_report_and_both_exit_3(unsharded):
    tmp, codes = unsharded
    assert codes == [3, 3], [_text(tmp, n, "err")[-3000:] for n in (0, 1)]
    assert all("all-reduce 2.0" in _text(tmp, n, "out") for n in (0, 1)), "the job itself ran"
    writer, other = _one_writer(tmp, "w.json")
    (result,) = Report.load(tmp / f"node{writer}" / "w.json").results
    assert result.verdict == "SKIPPED" and result.world_size == 2
    assert result.evidence["job"]["ranks_answered"] == [0, 1] and result.evidence["checks"] == 0
    assert f"writes the job's report: {tmp / f'node{writer}' / 'w.json'}" in _text(tmp, other, "err")
    assert all("nothing checked" in _text(tmp, n, "err") for n in (0, 1)), "said even with -q"


SWEEP_OPTIONS = ("--device", "cpu", "--cells", "A", "--cells", "H", "--inject", "nan-canonicalize")


def _matrix(*options: str):
    def command(node: int, port: int) -> list[str]:
        return [*_agent(node, port), "-m", "fsdpqdiag", "matrix", *options, "--json", "m.json", "-q"]

    return command


@pytest.fixture(scope="module")
def sweep(jobs):
    """A new sweep of two cells with the fault injected, recorded in --out, under two agents."""
    return jobs["sweep"]


def _node_files(tmp: Path, node: int) -> list[str]:
    return sorted(
        str(p.relative_to(tmp / f"node{node}")) for p in (tmp / f"node{node}").rglob("*") if p.is_file()
    )


def _record(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]


def test_matrix_out_under_two_agents_one_node_records_both_exit_alike(sweep):
    tmp, codes = sweep
    writer, other = _one_writer(tmp, "m.json")
    report = Report.load(tmp / f"node{writer}" / "m.json")
    assert report.exit_code() != 0, "the injected fault is a finding"
    assert codes == [1, 1], [_text(tmp, n, "err")[-3000:] for n in (0, 1)]
    assert _node_files(tmp, other) == ["err", "out"], "the other node writes nothing"
    header, *rows = _record(tmp / f"node{writer}" / "sweep")
    assert [c["name"] for c in header["cells"]] == ["A", "H"] and header["world_sizes"] == [2]
    assert sorted(row["cell"]["name"] for row in rows) == ["A", "H"], "each cell recorded once"
    assert {r.config["cell"]["name"] for r in report.results} == {"A", "H"}


def test_matrix_resume_under_two_agents_runs_what_the_writing_nodes_record_holds(sweep, tmp_path):
    """Each node holds a different cut of the sweep: one kept cell A, the other cell H. Whichever
    node holds rank 0, both run what its record leaves to do; a node that read its own copy
    would run the other cell, and the job's collectives would not match."""
    earlier, _ = sweep
    (recorded,) = [n for n in (0, 1) if (earlier / f"node{n}" / "sweep").is_dir()]
    header, *cells = (
        (earlier / f"node{recorded}" / "sweep" / "cells.jsonl").read_text().splitlines(keepends=True)
    )
    kept = {}
    for node, line in zip((0, 1), cells):
        (tmp_path / f"node{node}" / "sweep").mkdir(parents=True)
        (tmp_path / f"node{node}" / "sweep" / "cells.jsonl").write_text(header + line)
        kept[node] = json.loads(line)["cell"]["name"]
    codes = _finish(_start_nodes(tmp_path, _matrix("--resume", "sweep")))
    writer, other = _one_writer(tmp_path, "m.json")
    assert codes == [1, 1], [_text(tmp_path, n, "err")[-3000:] for n in (0, 1)]
    report = Report.load(tmp_path / f"node{writer}" / "m.json")
    assert report.analysis["resume"]["recorded_cells"] == 1
    assert {r.config["cell"]["name"] for r in report.results} == {"A", "H"}
    _, *rows = _record(tmp_path / f"node{writer}" / "sweep")
    assert [row["cell"]["name"] for row in rows] == [kept[writer], kept[other]], "the other cell, run once"
    assert (tmp_path / f"node{other}" / "sweep" / "cells.jsonl").read_text() == header + cells[other]
    assert _node_files(tmp_path, other) == ["err", "out", "sweep/cells.jsonl"]
