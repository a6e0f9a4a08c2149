"""quant-state-loss on gloo with real fully_shard and real bitsandbytes.

Evidence consistency at WS=1 and WS=2, agreement with the standalone reproducer, both
positive controls, and the CLI end to end (JSON schema, table, Markdown)."""

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from fsdpqdiag.report.model import json_schema
from tests.support import ROOT, cpu_probe, reproduce_small
from tests.support.scripts import standalone

PROBE = "quant-state-loss"
# Everything the standalone script reports about the weight, key for key.
SHARED_SECTIONS = (
    "shape",
    "elements",
    "module_keeps_quant_state",
    "sharded",
    "forward_weight",
    "forward",
    "recovery",
    "output_bit_equal",
    "max_abs_delta",
    "after_forward",
    "after_reshard",
    "after_update",
)


def _probe(ws: int, inject: str | None = None, **config):
    return cpu_probe(PROBE, ws, inject, **config)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "fsdpqdiag", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def cli_report(shared_cli):
    """The WS=1 run of every probe as a user runs it (the one the suite shares): its ranks
    serve the WS=1 checks."""
    run = shared_cli(*reproduce_small(1), timeout=600)
    return run, run.json_path


def _of_probe(report: dict) -> dict:
    (result,) = [r for r in report["results"] if r["probe"] == PROBE]
    return result


def _check_rank_evidence(ev: dict) -> None:
    """Relations that hold whatever the stack does."""
    recovery = ev["recovery"]
    if ev["forward_weight"]["type"] is not None:  # forward reached the layer
        assert recovery["needed"] == (not ev["forward_weight"]["has_quant_state"])
    if recovery["quant_state_is_module_copy"] or recovery["quant_state_is_original"]:
        assert recovery["restored"]
    if ev["forward"]["status"] == "raised":
        assert ev["forward"]["error"] and "after_reshard" not in ev
        return
    assert ev["forward"]["error"] is None
    assert recovery["replaced_module_weight"] == (
        not ev["after_forward"]["module_weight_is_fsdp_unsharded_param"]
    )
    assert (ev["max_abs_delta"] == 0) == ev["output_bit_equal"]
    reshard = ev["after_reshard"]
    if not reshard["forward_weight_retained"]:
        assert reshard["retained_storage_bytes"] == 0
    assert reshard["memory_freed"] == (
        reshard["fsdp_unsharded_storage_bytes"] == 0 and reshard["retained_storage_bytes"] == 0
    )
    update = ev["after_update"]
    assert 0 < update["updated_elements"] <= ev["elements"], "the update must change the weight"
    assert update["stale"] == (update["used_differs_from_handed"] > 0)
    if update["uses_fsdp_storage"]:
        assert update["used_differs_from_handed"] == 0  # one storage cannot hold two byte strings
    if recovery["quant_state_is_original"] and update["used_differs_from_handed"] == 0:
        # Same bytes and the same QuantState as the reference layer: the same output, bit for bit.
        assert update["output_bit_equal_to_reference"] == (update["handed_differs_from_update"] == 0)


def _check_control(ev: dict) -> dict:
    """The same-launch control's record, consistent with itself whatever the stack does."""
    control = ev["controls"]["plain_subclass_parameter_same_bits"]
    assert control["outcome"] in ("kept", "broken"), control
    assert (control["outcome"] == "kept") == (not control["findings"])
    not_restored = any("not FSDP2's sharded parameter" in finding for finding in control["findings"])
    assert control["restored_sharded_param"] == (not not_restored)
    assert control["differing_bytes"] is not None and control["handed_type"]
    return control


def _check_verdict_matches_evidence(result) -> None:
    assert result.verdict in ("REPRODUCED", "NOT REPRODUCED", "INCONCLUSIVE"), result.summary
    problems = False
    for rank in result.ranks:
        ev = rank["evidence"]
        recovery = ev["recovery"]
        problems |= recovery["needed"] and not recovery["restored"]
        if "after_reshard" in ev:
            reshard, update = ev["after_reshard"], ev["after_update"]
            problems |= not reshard["memory_freed"] or not reshard["module_weight_is_fsdp_sharded_param"]
            problems |= bool(update["stale"])
    assert (result.verdict == "REPRODUCED") == problems, result.summary


def _check_matches_standalone(result, ranks: list[dict], ws: int) -> None:
    script_ranks = standalone(result)
    assert len(script_ranks) == len(ranks) == ws
    for line, rank in zip(script_ranks, ranks):
        assert line["rank"] == rank["rank"]
        for key in SHARED_SECTIONS:
            assert line[key] == rank["evidence"][key], key


def test_ws1_evidence_consistent_and_matches_standalone(cli_report):
    done, path = cli_report
    report = json.loads(path.read_text())
    result = _of_probe(report)
    assert result["world_size"] == 1 and len(result["ranks"]) == 1
    for rank in result["ranks"]:
        assert rank["status"] == "ok", rank.get("error")
        _check_rank_evidence(rank["evidence"])
    _check_matches_standalone(result, result["ranks"], 1)


def test_ws2_evidence_consistent_and_matches_standalone(shared_probe):
    result = shared_probe(PROBE, 2)
    assert len(result.ranks) == 2
    for rank in result.ranks:
        assert rank["status"] == "ok", rank.get("error")
        _check_rank_evidence(rank["evidence"])
    _check_verdict_matches_evidence(result)
    assert result.evidence["ranks_agree"] is True
    for rank in result.ranks:
        assert _check_control(rank["evidence"])["module_copy_survives"]
    _check_matches_standalone(result, result.ranks, 2)


def test_cli_json_validates_and_renders(cli_report, tmp_path):
    done, path = cli_report
    report = json.loads(path.read_text())
    jsonschema.validate(report, json_schema())
    result = _of_probe(report)
    if result["verdict"] == "REPRODUCED":  # the run's status is its worst probe's
        assert done.returncode == 1, done.stderr[-2000:]
    assert PROBE in done.stdout and result["verdict"] in done.stdout
    assert result["summary"].split(";")[0] in done.stdout.replace("\n", " ")
    md = _cli("report", str(path), "--format", "md")
    assert md.returncode == 0, md.stderr[-2000:]
    handed = result["evidence"]["forward_weight"]
    assert f"forward gets {handed['type']} quant_state={handed['has_quant_state']}" in md.stdout
    assert "freed on reshard=" in md.stdout and "reproducers/quant_state_loss.py" in md.stdout


def test_drop_module_quant_state_fault_is_caught():
    result = _probe(1, inject="drop-module-quant-state")
    assert result.verdict == "REPRODUCED", result.summary
    for rank in result.ranks:
        ev = rank["evidence"]
        _check_rank_evidence(ev)
        assert ev["module_keeps_quant_state"] is False
        assert ev["recovery"]["needed"] and not ev["recovery"]["restored"]
        assert ev["forward"]["status"] == "raised"
    assert "did not restore" in result.summary
    # a fault in bitsandbytes' QuantState recovery: the controls point to bitsandbytes
    attribution = result.evidence["attribution"]
    assert attribution["component"] == "injected fault" and attribution["report_to"] is None
    assert attribution["controls_point_to"] == "bitsandbytes"
    assert "--inject drop-module-quant-state" in attribution["decided_by"]
    # the control, no bitsandbytes, keeps its module copy and FSDP2 keeps the weight its own
    control = _check_control(result.evidence)
    assert control["outcome"] == "kept" and control["module_copy_survives"]
    assert attribution["decided_by"][0].startswith("control: the same bits")


def test_stale_recovered_weight_fault_is_caught():
    result = _probe(2, inject="stale-recovered-weight")
    assert result.verdict == "REPRODUCED", result.summary
    _check_verdict_matches_evidence(result)
    for rank in result.ranks:
        ev = rank["evidence"]
        _check_rank_evidence(ev)
        assert ev["recovery"]["restored"] and ev["recovery"]["uses_fsdp_storage"] is False
        assert ev["after_reshard"]["forward_weight_retained"] and not ev["after_reshard"]["memory_freed"]
        # the module still computes with the first forward's copy: the update never arrives
        update = ev["after_update"]
        assert update["stale"] and update["used_differs_from_handed"] == update["updated_elements"]
        assert update["output_bit_equal_to_first_forward"] and not update["output_bit_equal_to_reference"]
    assert "stale" in result.summary and "after reshard" in result.summary
    # only bitsandbytes' recovery keeps a copy: the control, with nothing reassigning its
    # weight, stays FSDP2's (restored, freed, fresh), so the controls point to bitsandbytes
    for rank in result.ranks:
        control = _check_control(rank["evidence"])
        assert control["outcome"] == "kept" and control["stale_elements"] == 0 and control["memory_freed"]
    attribution = result.evidence["attribution"]
    assert attribution["controls_point_to"] == "bitsandbytes"
    assert attribution["decided_by"][0].startswith("control: the same bits")


def test_control_shares_a_broken_reshard_and_names_torch():
    # FSDP2's reshard broken for every parameter: the probe finds the weight kept after
    # reshard, and so does its control, so the controls point to torch, not bitsandbytes.
    result = _probe(1, inject="keep-unsharded-after-reshard")
    assert result.verdict == "REPRODUCED", result.summary
    ev = result.ranks[0]["evidence"]
    assert not ev["after_reshard"]["module_weight_is_fsdp_sharded_param"]
    control = _check_control(ev)
    assert control["outcome"] == "broken" and not control["restored_sharded_param"]
    assert not control["memory_freed"] and control["module_copy_survives"]
    attribution = result.evidence["attribution"]
    assert attribution["controls_point_to"] == "torch.distributed.fsdp"
    assert any(line.startswith("shared by the control:") for line in attribution["decided_by"])


def test_attribution_names_torch_when_fully_shard_takes_the_recovery_source():
    from fsdpqdiag.probes.quant_state_loss import probe as quant_state_loss

    control = {
        "outcome": "kept",
        "findings": [],
        "handed_type": "Parameter",
        "handed_has_quant_state": False,
        "module_copy_survives": False,
    }
    evidence = {
        "recovery": {"needed": True, "restored": False},
        "module_keeps_quant_state": True,
        "controls": {"plain_subclass_parameter_same_bits": control},
    }
    component, decided_by = quant_state_loss.attribute(evidence)
    assert component == "torch.distributed.fsdp" and "module copy" in decided_by[-1]
    control["module_copy_survives"] = True
    assert quant_state_loss.attribute(evidence)[0] == "bitsandbytes"
    del evidence["controls"]
    assert quant_state_loss.attribute(evidence)[0] == "undetermined"
