"""cpu-weight-repack: both bitsandbytes CPU paths at WS=1/2, agreement with the standalone
script, and a positive control that flips the probe on the path where nothing breaks."""

import json
from pathlib import Path

import pytest

from fsdpqdiag.render import markdown, reproducer
from fsdpqdiag.report.model import Report
from tests.support import cpu_probe as _probe
from tests.support.scripts import line_arguments, run_script

COMPONENTS = {"torch.distributed.fsdp", "bitsandbytes", "injected fault", "undetermined"}


def _check_consistent(result, repack: str) -> None:
    assert len(result.ranks) == result.world_size
    ev = result.evidence
    assert ev["repack_path"] is (repack == "on")
    assert ev["cpu_path"]["override"] == repack
    forwards = [f for rank in result.ranks for f in rank["evidence"]["forwards"]]
    intact = all(
        f["received"]["bytes_equal"] and f["local_tensor_after_reshard"]["bytes_equal"] for f in forwards
    )
    for f in forwards:
        assert (f["received"]["differing_elements"] == 0) == f["received"]["bytes_equal"]
        assert f["output_bit_equal"] == (f["max_abs_delta"] == 0.0)
    assert (result.verdict == "NOT REPRODUCED") == (intact and all(f["output_bit_equal"] for f in forwards))
    if result.verdict in ("REPRODUCED", "INCONCLUSIVE"):
        assert ev["attribution"]["component"] in COMPONENTS
        assert ev["attribution"]["decided_by"], ev["attribution"]
    assert set(ev["controls"]) == {"without_fsdp", "fsdp_repack_off"}
    assert ev["ranks_agree"]


@pytest.mark.parametrize("ws", [1, 2])
def test_repack_path_is_consistent_and_matches_standalone(monkeypatch, ws):
    monkeypatch.setenv("FSDPQDIAG_BNB_CPU_REPACK", "on")
    result = _probe("cpu-weight-repack", ws)
    _check_consistent(result, "on")
    # The line a report prints for this result is the one run: its exit status is the verdict
    # (1 where it reproduces, 0 where not, 2 inconclusive).
    line = reproducer.command(result)
    if result.verdict == "REPRODUCED":
        assert f"    {line}" in markdown.render(Report("reproduce", [], {}, [result])).splitlines()
    args, line_ws = line_arguments(result)
    assert Path(args[0]).name == "cpu_weight_repack.py" and line_ws == ws
    script_ranks = run_script([*args, "--json"], ws, verdict=result.verdict)
    assert len(script_ranks) == ws
    for line, rank in zip(script_ranks, result.ranks):
        ev = rank["evidence"]
        assert line["control_without_fsdp_stable"] == ev["controls"]["without_fsdp"]["stable"]
        for mine, theirs in zip(ev["forwards"], line["forwards"]):
            assert mine["received"]["bytes_equal"] == theirs["received_bytes_equal"]
            assert mine["repacked_after_forward"] == theirs["repacked_after_forward"]
            assert mine["output_bit_equal"] == theirs["output_bit_equal"]
            assert mine["max_abs_delta"] == theirs["max_abs_delta"]
            assert mine["local_tensor_after_reshard"]["bytes_equal"] == theirs["local_tensor_bytes_equal"]


def test_dequantize_path_is_consistent(monkeypatch):
    monkeypatch.setenv("FSDPQDIAG_BNB_CPU_REPACK", "off")
    result = _probe("cpu-weight-repack", 2)
    _check_consistent(result, "off")
    assert not any(f["repacked_after_forward"] for f in result.evidence["forwards"])


def test_positive_control_altered_unshard_is_caught_and_attributed_to_the_fault(monkeypatch):
    # On the path where nothing breaks, a NaN-canonicalizing unshard must flip the probe.
    monkeypatch.setenv("FSDPQDIAG_BNB_CPU_REPACK", "off")
    result = _probe("cpu-weight-repack", 2, inject="nan-canonicalize")
    assert result.verdict == "REPRODUCED", result.summary
    first = result.evidence["forwards"][0]
    assert not first["received"]["bytes_equal"] and set(first["received"]["post_bit_patterns"]) == {"0x7fff"}
    assert result.evidence["attribution"]["component"] == "injected fault"
    assert result.evidence["attribution"]["controls_point_to"] == "torch.distributed.fsdp"
    assert "forward received altered bytes" in result.summary
    assert json.dumps(result.evidence)  # JSON-able, as the report needs
