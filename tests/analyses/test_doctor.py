"""The stack preflight: `fsdpqdiag doctor`, the `preflight` section of reports, UNSUPPORTED.

What the stack does is measured, so the tests assert that each capability's `ok` agrees with
its own evidence, and use the `crash-collective` fault as the positive control: a backend
that kills its ranks in the gathers must be reported as such, and turn the Mechanism B probe
into UNSUPPORTED instead of CRASHED.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from fsdpqdiag.analyses import preflight
from fsdpqdiag.core.config import RunConfig
from fsdpqdiag.report.model import EXIT_PROBE_FAILED, UNSUPPORTED, VERDICTS, ProbeResult, Report, json_schema


def _assert_consistent(checked: dict) -> None:
    """Each capability's verdict follows from its evidence; the units follow FSDP2's rule."""
    assert [c["name"] for c in checked["capabilities"]] == list(preflight.CAPABILITIES)
    for capability in checked["capabilities"]:
        assert set(capability) >= {"name", "ok", "detail"} and capability["detail"]
        if capability["ok"]:
            assert capability["detail"].startswith("bytes equal after the round trip")
            assert set(capability["dtypes"]) == {"bfloat16", "uint8", "int8"}
            assert all(found["bytes_equal"] for found in capability["dtypes"].values())
            assert all(found["differing_elements"] == 0 for found in capability["dtypes"].values())
        else:
            assert not capability["detail"].startswith("bytes equal")
    path = checked["bitsandbytes_path"]
    assert path["device"] == checked["device"] and path["backend"]
    if checked["device"] == "cpu":
        assert path["kernel_path"] == path["cpu"]["path"]
        if path["isa_flags"] is not None and path["cpu"]["override"] is None:
            # bitsandbytes' own CPU probe and the kernel's flags name the same CPU.
            assert path["isa_flags"]["avx512_bf16"] == path["cpu"]["avx512_bf16"]
    units = checked["fsdp_units"]["units"]
    assert units and units[-1]["unit"] == "(root)"
    for unit in units:
        inputs = unit["all_gather_input_dtypes"]
        if len(inputs) == 1:
            assert unit["all_gather_dtype"] == inputs[0] and unit["all_gather_by"] == "value"
        else:
            assert unit["all_gather_dtype"] == "uint8" and unit["all_gather_by"] == "bytes"
        assert unit["source"] in ("fsdp2", "rule")
        assert unit["packed_storage_exposed"] == (
            unit["quantized_parameters"] > 0
            and unit["all_gather_by"] == "value"
            and unit["all_gather_dtype"] in preflight.FLOAT_DTYPES
        )


@pytest.mark.parametrize("world_size", [1, 2])
def test_doctor_json_is_consistent_with_its_evidence(run_cli, world_size):
    result = run_cli("doctor", "--ws", str(world_size), "--device", "cpu", "--json", "-")
    checked = json.loads(result.stdout)
    assert checked["world_size"] == world_size and checked["backend"] == "gloo"
    _assert_consistent(checked)
    all_ok = all(c["ok"] for c in checked["capabilities"])
    assert result.returncode == (0 if all_ok else EXIT_PROBE_FAILED), result.stderr
    # tiny-llama wrapped per decoder layer and at the root: 2 layers + root.
    assert [u["unit"] for u in checked["fsdp_units"]["units"]] == [
        "model.layers.0",
        "model.layers.1",
        "(root)",
    ]
    assert checked["launches"] >= 1 and (checked["launches"] == 1 or not all_ok)


def test_crashing_collectives_make_mechanism_b_unsupported_not_crashed(run_cli, tmp_path):
    markdown = tmp_path / "r.md"
    result = run_cli(
        "reproduce",
        "--ws",
        "2",
        "--device",
        "cpu",
        "--probe",
        "full-tensor-crash",
        "--in-features",
        "128",
        "--out-features",
        "128",
        "--inject",
        "crash-collective",
        "-q",
        "--markdown",
        str(markdown),
        json=True,
    )
    report = result.report
    jsonschema.validate(report, json_schema())
    assert result.returncode == EXIT_PROBE_FAILED, result.stderr
    (checked,) = report["preflight"]
    assert checked["injected"] == "crash-collective"
    failed = {c["name"]: c for c in checked["capabilities"] if not c["ok"]}
    assert set(failed) == {preflight.ALL_GATHER, preflight.FULL_TENSOR, preflight.REDISTRIBUTE}
    assert all("SIGSEGV" in c["detail"] for c in failed.values())
    # The collectives the fault leaves alone still carry every byte after the relaunches.
    _assert_consistent(checked)
    (probe,) = report["results"]
    assert probe["probe"] == "full-tensor-crash" and probe["verdict"] == UNSUPPORTED
    assert probe["evidence"]["instead"] in probe["summary"]  # what to run instead
    attribution = probe["evidence"]["attribution"]
    # An injected fault is always the component; the controls (the preflight's ordinary
    # tensors) point to the process-group backend, not to Mechanism B.
    assert attribution["component"] == "injected fault"
    assert attribution["controls_point_to"] == "process-group backend"
    assert attribution["report_to"] is None and attribution["known_issues"] == []
    assert (
        len(attribution["decided_by"]) == 4 and attribution["decided_by"][-1] == "--inject crash-collective"
    )
    assert any("DTensor.full_tensor()" in line and "SIGSEGV" in line for line in attribution["decided_by"])
    text = markdown.read_text()
    assert "**UNSUPPORTED** full-tensor-crash" in text and "| DTensor.full_tensor() | **NO** |" in text


def test_every_verdict_has_a_style_and_unsupported_exits_3():
    from fsdpqdiag.render.fix_table import FIX_STYLE
    from fsdpqdiag.render.table import VERDICT_STYLE

    assert set(VERDICTS) <= set(FIX_STYLE) and set(VERDICTS) - {"VERIFIED", "NOT VERIFIED"} <= set(
        VERDICT_STYLE
    )
    assert UNSUPPORTED in json_schema()["properties"]["results"]["items"]["properties"]["verdict"]["enum"]
    common = dict(world_size=2, device="cpu", backend="gloo", config={}, injected=None, summary="")
    unsupported = ProbeResult(probe="full-tensor-crash", verdict=UNSUPPORTED, **common)
    clean = ProbeResult(probe="nan-canonicalization", verdict="NOT REPRODUCED", **common)
    assert Report(command="reproduce", argv=[], env={}, results=[clean, unsupported]).exit_code() == 3
    found = ProbeResult(probe="nan-canonicalization", verdict="REPRODUCED", **common)
    assert Report(command="reproduce", argv=[], env={}, results=[found, unsupported]).exit_code() == 1


def test_a_report_made_before_the_preflight_still_loads_validates_and_renders():
    from rich.console import Console

    from fsdpqdiag.render.markdown import render
    from fsdpqdiag.render.table import reproduce_table
    from tests.support import ROOT

    data = json.loads((ROOT / "reports/reproduce-ws2-cpu-2core-torch2.13-bnb0.50.2.json").read_text())
    assert "preflight" not in data
    jsonschema.validate(data, json_schema())
    report = Report.from_dict(data)
    assert report.preflight == []
    assert render(report).startswith("## fsdpqdiag reproduce") and "Stack preflight" not in render(report)
    Console(file=open("/dev/null", "w")).print(reproduce_table(report))  # noqa: SIM115


def test_every_probe_names_preconditions_the_preflight_checks():
    from fsdpqdiag import tasks  # noqa: F401 - importing tasks registers every task
    from fsdpqdiag.core import registry

    for probe in registry.all_tasks().values():
        assert set(probe.preconditions) <= set(preflight.CAPABILITIES), probe.name


def test_unsupported_only_where_a_precondition_failed():
    run = RunConfig(world_size=2, device="cuda", backend="gloo")
    checked = {
        "capabilities": [
            {"name": preflight.ALL_GATHER, "ok": True, "detail": "bytes equal after the round trip"},
            {"name": preflight.FULL_TENSOR, "ok": False, "detail": "rank(s) 0, 1 died by SIGSEGV"},
        ]
    }
    assert preflight.unsupported_verdict("x", (preflight.ALL_GATHER,), checked, run) is None
    decided = preflight.unsupported_verdict("x", (preflight.ALL_GATHER, preflight.FULL_TENSOR), checked, run)
    assert decided.verdict == UNSUPPORTED and "use --backend nccl" in decided.summary
    assert decided.evidence["attribution"]["known_issues"] == ["pytorch/pytorch#152645"]


def test_byte_check_sees_a_canonicalized_nan_payload():
    """Positive control of the comparison the capabilities rest on."""
    import torch

    from fsdpqdiag.stack.faults import canonicalize_nans_

    payload = preflight._bf16_payload(rank=0)
    assert int(payload.view(torch.int16)[0]) == 0x7F81  # the first NaN payload
    altered = payload.clone()
    canonicalize_nans_(altered)
    found = preflight.compare_bytes(payload, altered)
    assert not found["bytes_equal"] and found["differing_elements"] == 253
    assert found["first_difference"] == {"index": 0, "expected": "0x7f81", "observed": "0x7fff"}
    assert preflight.compare_bytes(payload, payload.clone())["bytes_equal"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ws", "0"], "--ws must be >= 1"),
        (["--backend", "mpi"], "unknown backend"),
        (["--model", "/nonexistent/model-dir"], "does not exist"),
        (["--inject", "bitflip"], "unknown fault"),
    ],
)
def test_doctor_bad_input_is_one_line_exit_2(run_cli, args, message):
    result = run_cli("doctor", "--device", "cpu", *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_a_matrix_whose_preflight_fails_all_gather_runs_no_cell_as_its_row(monkeypatch):
    """The preflight leads the cells' launch: where it finds all_gather failing on ordinary
    tensors, every cell is UNSUPPORTED, the cells not yet run are not run, and one that ran
    beside it keeps its row as ``measured``. The launcher is replaced by a script of what
    its ranks report (no ranks start): the stack's failure is the premise, not a finding."""
    from fsdpqdiag import api
    from fsdpqdiag.core.outcome import RankOutcome
    from fsdpqdiag.launcher.session import LaunchSession

    healthy = {"dtypes": {"bfloat16": {"bytes_equal": True}}}
    capabilities = {name: healthy for name in preflight.CAPABILITIES}
    capabilities[preflight.ALL_GATHER] = {"status": "raised", "error": "RuntimeError: gather broke"}
    checked = {"capabilities": capabilities, preflight.UNITS_STAGE: {}, "bitsandbytes_path": None}
    launched = []

    def run_task(session, task, watch=None):
        keys = [item["key"] for item in task.extra["batch"]]
        launched.append(keys)
        finished = {
            preflight.NAME: {"evidence": checked, "stage": "done", "duration_s": 0.1},
            "A": {"evidence": {"status": "ok", "loss": 1.0}, "stage": "done", "duration_s": 0.1},
        }
        # the launch ends inside C: the casualty, and E after it is never relaunched
        running = {"probe": "C", "stage": "forward", "evidence": {}}
        return [RankOutcome(0, "crashed", {"finished": finished, "running": running}, signal="SIGSEGV")]

    monkeypatch.setattr(LaunchSession, "run_task", run_task)
    report = api.matrix(cells=["A", "C", "E"], world_sizes=[1], device="cpu")
    assert launched == [[preflight.NAME, "A", "C", "E"]]
    (ran,) = report.preflight
    assert ran["shared_launch"] and not ran["capabilities"][0]["ok"]
    rows = {r.config["cell"]["name"]: r for r in report.results}
    assert {name: r.verdict for name, r in rows.items()} == dict.fromkeys("ACE", UNSUPPORTED)
    assert rows["A"].evidence["measured"] == {"status": "ok", "loss": 1.0}
    assert rows["C"].evidence["measured"]["status"] == "crashed" and "measured" not in rows["E"].evidence
    assert rows["E"].evidence["attribution"]["component"] == preflight.COMPONENT
