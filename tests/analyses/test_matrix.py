"""`fsdpqdiag matrix` on CPU/gloo: evidence, positive controls, crash isolation, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jsonschema
import pytest

from fsdpqdiag.analyses import matrix as mx
from fsdpqdiag.report.model import json_schema
from tests.support import ROOT, matrix_default, worker_session


def _cells(report):
    return {r["config"]["cell"]["name"]: r for r in report["results"]}


def _record_lines(jsonl) -> list[str]:
    """The cell lines of a sweep's record, after checking that its first line is the header."""
    lines = jsonl.read_text().splitlines()
    assert lines and json.loads(lines[0]).get(mx.SWEEP_HEADER) == mx.SWEEP_VERSION, lines[:1]
    return lines[1:]


@pytest.mark.parametrize("ws", [1, 2])
def test_default_matrix_is_self_consistent(shared_cli, ws):
    result = shared_cli(*matrix_default(ws))
    csv = result.out / "m.csv"
    report = result.report
    jsonschema.validate(report, json_schema())
    cells = _cells(report)
    assert set(cells) == {"A", "B", "C", "D", "E", "F", "G", "H", "I"}
    for name, r in cells.items():
        ev = r["evidence"]
        if ev["status"] != "ok":
            # a cell that raises is a row; one FSDP2's own code refused is the stack's answer
            assert r["verdict"] == ("REFUSED" if ev["status"] == "refused" else "ERROR") and ev["error"], name
            if ev["status"] == "refused":
                assert ev["raised_at"]["file"].startswith("torch/distributed/fsdp/"), ev["raised_at"]
            continue
        assert ev["loss_bit_equal"] == (ev["delta"] == 0)
        assert (r["verdict"] == "NOT REPRODUCED") == (ev["differing_elements"] == 0 and ev["loss_bit_equal"])
        assert ev["weights_compared"] == 14
        # the control runs only for a cell that altered bytes
        assert ("controls" in ev) == (ev["differing_elements"] > 0), name
    assert (
        cells["D"]["evidence"].get("fsdp_units", 0) > cells["A"]["evidence"].get("fsdp_units", 0)
        or cells["D"]["evidence"]["status"] != "ok"
    )
    analysis = report["analysis"][str(ws)]
    assert analysis["exact"]["summary"].startswith("Invariant in:")
    assert "Depends on:" in analysis["verdict"]["summary"]
    # A (bf16 cast) against H and I (no cast): the cast question is answered where they ran
    cast = analysis["verdict"].get("param_dtype_cast")
    if cells["A"]["evidence"]["status"] == "ok" and cells["H"]["evidence"]["status"] == "ok":
        assert cast is not None and ["A", "H"] in cast["same_outcome"] + cast["different_outcome"]
        same = cells["A"]["verdict"] == cells["H"]["verdict"]
        assert (["A", "H"] in cast["same_outcome"]) == same
    # a refusal is not the tool's failure: the exit code follows the other verdicts alone
    verdicts = {r["verdict"] for r in cells.values()}
    found = verdicts & {"REPRODUCED", "CRASHED", "INCONCLUSIVE"}
    failed = verdicts & {"ERROR", "TIMEOUT", "UNSUPPORTED"}
    assert result.returncode == (1 if found else 3 if failed else 0), verdicts
    assert len(csv.read_text().splitlines()) == 10


# The two sweeps test_two_sweeps_at_once_both_complete starts side by side: the first is
# the injected sweep whose cells test_injected_canonicalization_shows_in_every_cell reads.
CONCURRENT_SWEEPS = (
    ["--cells", "A", "--cells", "E", "--inject", "nan-canonicalize"],
    ["--cells", "A"],
)


@pytest.fixture(scope="module")
def two_sweeps_at_once(tmp_path_factory):
    """(exit code, stderr, report, --out directory) of two WS=2 sweeps run at once."""
    tmp_path = tmp_path_factory.mktemp("two-sweeps")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sweeps = [
        subprocess.Popen(
            [sys.executable, "-m", "fsdpqdiag", "matrix", "--ws", "2", "--device", "cpu", *extra]
            + ["--out", str(tmp_path / f"out{i}"), "--json", str(tmp_path / f"m{i}.json"), "-q"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, extra in enumerate(CONCURRENT_SWEEPS)
    ]
    done = []
    for i, sweep in enumerate(sweeps):
        _, stderr = sweep.communicate(timeout=600)
        path = tmp_path / f"m{i}.json"
        report = json.loads(path.read_text()) if path.exists() else {"results": []}
        done.append((sweep.returncode, stderr, report, tmp_path / f"out{i}"))
    return done


def test_injected_canonicalization_shows_in_every_cell(two_sweeps_at_once):
    code, stderr, report, _ = two_sweeps_at_once[0]
    assert set(_cells(report)) == {"A", "E"}, stderr
    for name, r in _cells(report).items():
        ev = r["evidence"]
        assert r["verdict"] == "REPRODUCED", name
        assert ev["differing_elements"] > 0 and not ev["loss_bit_equal"]
        assert set(ev["post_bit_patterns"]) == {"0x7fff"}
        assert ev["differing_nan_class"] == ev["differing_elements"]
        # The fault rewrites every float unshard: the cell's control, the same bits in plain
        # parameters through the cell's own fully_shard, alters them too and decides (torch).
        control = ev["controls"]["plain_parameters_same_bits"]
        assert control["outcome"] == "altered", name
        assert sorted(control["altered_weights"]) == sorted(ev["altered_modules"])
        assert control["differing_elements"] == ev["differing_elements"]
        assert set(control["post_bit_patterns"]) == {"0x7fff"}
        attribution = ev["attribution"]
        assert attribution["controls_point_to"] == "torch.distributed.fsdp", name
        assert attribution["decided_by"][0].startswith("control: the same bits"), name
    assert code == 1


def test_cell_attribution_follows_its_control():
    row = {
        "status": "ok",
        "differing_elements": 4,
        "differing_nan_class": 4,
        "post_bit_patterns": {"0x7fff": 4},
        "first_altered_module": "m",
    }
    control = {"weights": 1, "altered_weights": [], "differing_elements": 0, "outcome": "byte-true"}
    kept = {**row, "controls": {"plain_parameters_same_bits": control}}
    # the same signature, yet plain parameters kept every byte: not FSDP2's unshard
    assert mx.cell_attribution(kept)[0] == "bitsandbytes"
    raised = {**row, "controls": {"plain_parameters_same_bits": {"outcome": "raised", "exception": "E"}}}
    assert mx.cell_attribution(raised)[0] == "undetermined"
    component, decided_by = mx.cell_attribution(row)  # a row recorded before controls existed
    assert component == "torch.distributed.fsdp" and "no control ran" in decided_by[-1]


def test_crashing_cell_leaves_the_others_intact(tmp_path):
    # D (the per-Linear wrap) crashes under the fault; A ran before it in the same launch,
    # E and F after it in a fresh one. Asked of the library in the worker's session:
    # fsdpqdiag matrix --ws 1 --device cpu --cells A,D,E,F --inject segfault-linear-wrap --out OUT
    from fsdpqdiag import api

    out = tmp_path / "out"
    report = api.matrix(
        cells=list("ADEF"),
        world_sizes=[1],
        device="cpu",
        inject="segfault-linear-wrap",
        out_dir=str(out),
        session=worker_session(),
    )
    cells = _cells(json.loads(report.to_json()))
    assert cells["D"]["verdict"] == "CRASHED" and cells["D"]["evidence"]["signal"] == "SIGSEGV"
    assert all(cells[n]["evidence"]["status"] == "ok" for n in "AEF")
    lines = _record_lines(out / "cells.jsonl")
    assert sorted(json.loads(line)["cell"]["name"] for line in lines) == list("ADEF")


def test_resume_after_an_interrupted_sweep_loses_and_redoes_nothing(tmp_path, run_cli):
    # Ctrl-C; kill -9 and its resume are test_resume's test_killed_sweep_resumes_exactly_its_recorded_plan.
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsdpqdiag",
            "matrix",
            "--ws",
            "1",
            "--device",
            "cpu",
            *("--cells", "A", "--cells", "C", "--cells", "E", "--cells", "G"),
            "--isolate-cells",
            "--out",
            str(out),
            "-q",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    jsonl = out / "cells.jsonl"
    # the header and two finished cells
    while time.monotonic() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 3):
        time.sleep(0.2)
    sweep.send_signal(signal.SIGINT)
    sweep.communicate(timeout=120)
    assert sweep.returncode == 130
    before = _record_lines(jsonl)
    assert 2 <= len(before) < 4
    time.sleep(1.0)  # no orphaned rank may append after its launcher is gone
    assert _record_lines(jsonl) == before
    result = run_cli("matrix", "--ws", "1", "--device", "cpu", "--resume", str(out), "-q", json=True)
    lines = [json.loads(line) for line in _record_lines(jsonl)]
    names = [line["cell"]["name"] for line in lines]
    assert sorted(names) == list("ACEG") and len(names) == len(set(names))
    assert [json.loads(line) for line in before] == lines[: len(before)]
    assert set(_cells(result.report)) == set("ACEG")


def test_invariance_on_synthetic_tables():
    base = dict(
        wrap="layer",
        mp="bf16/fp32",
        cast_forward_inputs=True,
        double_quant=True,
        quant_storage="bfloat16",
        quant_type="nf4",
        reshard_after_forward=True,
    )
    table = [
        {**base, "name": "A", "outcome": 1},
        {**base, "name": "D", "wrap": "linear", "outcome": 1},
        {**base, "name": "E", "wrap": "root", "outcome": 1},
        {**base, "name": "C", "mp": "bf16/bf16", "outcome": 2},
        {**base, "name": "X", "wrap": "root", "mp": "bf16/bf16", "outcome": 3},
    ]
    result = mx.invariance(table)
    assert result["wrap"]["status"] == "depends"  # C vs X differ in wrap only, outcomes 2 vs 3
    assert ["A", "D"] in result["wrap"]["same_outcome"] and ["C", "X"] in result["wrap"]["different_outcome"]
    assert result["mp"]["status"] == "depends"
    assert result["cast_forward_inputs"]["status"] == "untested"
    with_failure = [
        *table[:3],
        {**base, "name": "B", "mp": "none", "outcome": ("failed", "error"), "comparable": False},
    ]
    assert mx.invariance(with_failure)["mp"] == {
        "status": "untested",
        "same_outcome": [],
        "different_outcome": [],
        "not_comparable": ["B"],
    }
    # the cast question: A (bf16 cast) and H (no cast) differ in mp alone
    cast_table = [*table[:1], {**base, "name": "H", "mp": "no-cast", "outcome": 2}]
    assert mx.invariance(cast_table)["param_dtype_cast"]["different_outcome"] == [["A", "H"]]
    assert mx.invariance(cast_table)["summary"].endswith("needs the bf16 param_dtype cast: yes")
    uncast = [*table[:1], {**base, "name": "I", "mp": "omitted", "outcome": 1}]
    assert mx.invariance(uncast)["param_dtype_cast"]["status"] == "invariant"
    assert "param_dtype_cast" not in mx.invariance(with_failure)
    only_wrap = [row for row in table if row["name"] in "ADE"]
    assert mx.invariance(only_wrap)["wrap"]["status"] == "invariant"
    assert mx.invariance(only_wrap)["summary"] == "Invariant in: wrap; Depends on: nothing"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cells", "Z"], "unknown cell"),
        (["--grid", "colour=red"], "bad --grid"),
        (["--grid", "quant_storage=bf17"], "unknown dtype"),
        (["--grid", "quant_type=nf4,fp4", "--cells", "B"], "give --cells or --grid, not both"),
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--resume", "/nonexistent/sweep"], "no cells.jsonl"),
    ],
)
def test_matrix_bad_input(run_cli, args, message):
    result = run_cli("matrix", "--device", "cpu", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_model_directory_that_is_not_a_model(run_cli, tmp_path):
    (tmp_path / "notes.txt").write_text("no config here")
    result = run_cli("matrix", "--device", "cpu", "--model", str(tmp_path))
    assert result.returncode == 2 and "not a Hugging Face model directory" in result.stderr


def test_matrix_runs_under_torchrun_and_rank0_writes_before_anyone_exits(tmp_path):
    out, report_path = tmp_path / "sweep", tmp_path / "r.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "fsdpqdiag",
            "matrix",
            "--device",
            "cpu",
            "--cells",
            "A",
            "--cells",
            "B",
            "--inject",
            "nan-canonicalize",
            "--json",
            str(report_path),
            "--out",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    # no rank was killed by torchrun because a peer left early; rank 0 gives the exit code
    assert "SIGTERM" not in done.stderr, done.stderr[-3000:]
    assert done.returncode != 0  # cell A REPRODUCED under the injected fault: exit 1
    report = json.loads(report_path.read_text())
    assert report["world_sizes"] == [2]
    cells = _cells(report)
    assert list(cells) == ["A", "B"]
    assert cells["A"]["verdict"] == "REPRODUCED"
    # rank 0 alone wrote the header and the per-cell lines
    assert len(_record_lines(out / "cells.jsonl")) == 2


def test_cells_are_reported_while_their_launch_still_runs():
    """One launch runs every cell; each finished cell reaches the caller (progress bar)
    before the launch ends, not all at once after it."""
    from fsdpqdiag.core.config import RunConfig
    from fsdpqdiag.launcher.launch import launch
    from fsdpqdiag.stack import models

    seen: dict[str, float] = {}
    returned: list[float] = []

    def execute(task, watch):
        outcomes = launch(task, watch=watch, zygotes=worker_session().zygotes).outcomes
        returned.append(time.monotonic())
        return outcomes

    cells = mx.select_cells(["A", "C", "E"])
    base_config = {"model": str(models.preset_dir("tiny-llama")), "lora": False, "out_dir": None}
    rows = mx.sweep(
        cells,
        RunConfig(world_size=1, device="cpu", timeout_s=300),
        base_config,
        execute,
        on_cell=lambda name, row: seen.setdefault(name, time.monotonic()),
    )
    assert list(rows) == ["A", "C", "E"] and list(seen) == ["A", "C", "E"]
    assert len(returned) == 1  # one launch for all cells
    assert seen["A"] < returned[0] and seen["C"] < returned[0]


def test_two_sweeps_at_once_both_complete(two_sweeps_at_once):
    for i, (code, stderr, report, out) in enumerate(two_sweeps_at_once):
        assert code in (0, 1), stderr
        cells = _cells(report)
        assert cells["A"]["evidence"]["status"] == "ok"
        assert len(_record_lines(out / "cells.jsonl")) == len(cells), i
