"""`fsdpqdiag reproduce` end to end on CPU/gloo with real FSDP2 and real bitsandbytes.

Verdicts of uninjected runs belong to the stack: the tests check that the evidence is
self-consistent, and that injected faults are caught.
"""

import jsonschema
import pytest

from fsdpqdiag.report.model import json_schema
from tests.support import reproduce_small

BATCH_AROUND_CRASH = ("nan-canonicalization", "full-tensor-crash", "non-float-params")


def _expected_exit_code(report) -> int:
    """The documented contract: 1 if anything was found, else 3 if a probe failed, else 0."""
    verdicts = {r["verdict"] for r in report["results"]}
    if verdicts & {"REPRODUCED", "CRASHED", "INCONCLUSIVE"}:
        return 1
    return 3 if verdicts & {"ERROR", "TIMEOUT", "UNSUPPORTED"} else 0


@pytest.fixture(scope="module")
def runs(shared_cli):
    """Each (world size, fault) run once: every run starts real ranks. The table on stdout
    and the Markdown report are kept for the tests of the outputs."""
    made = {}
    for ws in (1, 2):
        for inject in (None, "nan-canonicalize", "segfault"):
            argv = list(reproduce_small(ws))
            if inject:
                argv += ["--inject", inject]
            if inject == "segfault":
                # Mechanism B's probe between two others: its crash must cost only itself.
                for name in BATCH_AROUND_CRASH:
                    argv += ["--probe", name]
            made[(ws, inject)] = shared_cli(*argv, timeout=600)
    return made


@pytest.fixture(scope="module")
def reports(runs):
    return {key: (run.returncode, run.report, run.stderr) for key, run in runs.items()}


def _result(report, probe):
    return next(r for r in report["results"] if r["probe"] == probe)


@pytest.mark.parametrize("ws", [1, 2])
def test_uninjected_evidence_is_self_consistent(reports, ws):
    code, report, stderr = reports[(ws, None)]
    jsonschema.validate(report, json_schema())
    assert report["world_sizes"] == [ws]
    assert report["env"]["torch"]["version"] and report["env"]["bitsandbytes"]["version"]
    nan = _result(report, "nan-canonicalization")
    ev = nan["evidence"]
    assert nan["injected"] is None and nan["backend"] == "gloo" and len(nan["ranks"]) == ws
    swap = ev["swap_target"]
    assert ev["ranks_agree"] is True
    assert ev["nan_elements"] == ev["original_classes"]["qNaN"] + ev["original_classes"]["sNaN"]
    assert ev["nan_elements"] > 0, "the payload must hold NaN-class containers to test anything"
    if set(swap["original_classes"]) <= {"qNaN", "sNaN"} or not swap["differing_elements"]:
        assert swap["differing_elements"] <= ev["nan_elements"]
    # Δy = 0 iff no byte of the weight forward receives differs
    assert (ev["max_abs_delta"] == 0) == swap["bytes_equal"] == ev["output_bit_equal"]
    assert (nan["verdict"] == "REPRODUCED") == (not swap["bytes_equal"])
    assert nan["verdict"] in ("REPRODUCED", "NOT REPRODUCED")
    ft = _result(report, "full-tensor-crash")
    assert ft["verdict"] in ("REPRODUCED", "NOT REPRODUCED", "CRASHED")
    assert code == _expected_exit_code(report), stderr


@pytest.mark.parametrize("ws", [1, 2])
def test_injected_canonicalization_is_reproduced(reports, ws):
    code, report, _ = reports[(ws, "nan-canonicalize")]
    jsonschema.validate(report, json_schema())
    nan = _result(report, "nan-canonicalization")
    ev = nan["evidence"]
    swap = ev["swap_target"]
    assert nan["verdict"] == "REPRODUCED" and code == 1
    assert nan["injected"] == "nan-canonicalize"
    assert all(r["injected"] == "nan-canonicalize" for r in report["results"])
    assert swap["differing_elements"] > 0
    assert swap["original_classes"]["finite"] == 0 and swap["original_classes"]["inf"] == 0
    assert swap["post_bit_patterns"] == {"0x7fff": swap["differing_elements"]}
    assert all(s["post_bits"] == "0x7fff" for s in swap["samples"])
    assert ev["max_abs_delta"] > 0 and not ev["output_bit_equal"]
    # the fault acts where FSDP2 builds the unsharded parameter: the shard itself is intact
    assert ev["local_tensor"]["bytes_equal"] and ev["ranks_agree"]
    # the control without bitsandbytes is altered alike, so the controls point to FSDP2
    control = ev["controls"]["plain_parameter_same_bits"]
    assert control["outcome"] == "altered" and control["differing_elements"] == swap["differing_elements"]
    assert ev["attribution"]["component"] == "injected fault"
    assert ev["attribution"]["controls_point_to"] == "torch.distributed.fsdp"


@pytest.mark.parametrize("ws", [1, 2])
def test_injected_segfault_is_a_crashed_result(reports, ws):
    code, report, _ = reports[(ws, "segfault")]
    jsonschema.validate(report, json_schema())
    ft = _result(report, "full-tensor-crash")
    assert code == 1
    assert ft["verdict"] == "CRASHED" and ft["evidence"]["signal"] == "SIGSEGV"
    assert ft["evidence"]["stage"] == "full_tensor()"
    assert {r["status"] for r in ft["ranks"]} <= {"crashed", "aborted"}
    # The probes share launches, and a crash costs only the probe it happens in: Mechanism
    # A's probe also dies in its full_tensor() stage yet keeps the evidence taken before it;
    # the probe after Mechanism B's ran in a fresh launch, every rank finishing it.
    assert [r["probe"] for r in report["results"]] == list(BATCH_AROUND_CRASH)
    nan = _result(report, "nan-canonicalization")
    assert nan["verdict"] in ("REPRODUCED", "NOT REPRODUCED"), nan["summary"]
    assert nan["evidence"]["full_tensor"]["signal"] == "SIGSEGV" and "swap_target" in nan["evidence"]
    after = _result(report, "non-float-params")
    assert after["verdict"] in ("REPRODUCED", "NOT REPRODUCED"), after["summary"]
    assert [r["status"] for r in after["ranks"]] == ["ok"] * ws and after["evidence"]["u8"]


def test_segfault_in_mechanism_b_keeps_mechanism_a_evidence(reports):
    # The segfault run's first probe is Mechanism A's, whose last stage is Mechanism B's
    # full_tensor(): the launch dies there, the evidence taken before it is kept.
    _, report, _ = reports[(1, "segfault")]
    nan = _result(report, "nan-canonicalization")
    assert nan["evidence"]["full_tensor"]["status"] == "crashed"
    assert nan["evidence"]["full_tensor"]["signal"] == "SIGSEGV"
    assert "swap_target" in nan["evidence"] and nan["verdict"] in ("REPRODUCED", "NOT REPRODUCED")


def test_markdown_and_table_outputs(runs):
    result = runs[(1, "nan-canonicalize")]
    assert result.returncode == 1
    assert "REPRODUCED" in result.stdout and "nan-canonicalization" in result.stdout
    text = result.markdown_path.read_text()
    assert "**REPRODUCED**" in text and "0x7fff" in text and "inject" in text.lower()
