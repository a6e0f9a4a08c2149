"""int8-params: Linear8bitLt + peft LoRA through fully_shard, end to end.

Forward, backward, state_dict, save and load, at WS=1 and WS=2 on gloo with real FSDP2, real
bitsandbytes, real peft.

Verdicts of uninjected runs belong to the stack: these tests check that the evidence is
self-consistent, that the standalone script measures the same, that the CLI report is
valid and renders, and that the cast-mismatched-storage fault is caught at the unshard stage.
"""

import dataclasses
import json

import jsonschema
import pytest

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.probes.int8_params import probe as int8_params
from fsdpqdiag.report.model import Report, json_schema
from tests.probes.test_reproducers import FEATURES
from tests.support import cpu_probe, reproduce_small
from tests.support.scripts import standalone

PREFIX = "base_model.model.proj.base_layer."


@pytest.fixture(scope="module")
def cli_ws1(shared_cli):
    """The WS=1 run of every probe, through the CLI as a user starts it (the one the suite
    shares): also the WS=1 probe evidence."""
    run = shared_cli(*reproduce_small(1), timeout=600)
    return run, run.json_path


@pytest.fixture(scope="module")
def ws2(shared_probe):
    return shared_probe("int8-params", 2)


def _probe(ws: int, inject: str | None = None, **config):
    return cpu_probe("int8-params", ws, inject, **config)


def _result(ws, cli_ws1, ws2) -> dict:
    """The probe's result at ``ws`` as a plain dict (as the report stores it)."""
    if ws == 1:
        return _of_probe(json.loads(cli_ws1[1].read_text()))
    return dataclasses.asdict(ws2)


def _of_probe(report: dict) -> dict:
    (result,) = [r for r in report["results"] if r["probe"] == "int8-params"]
    return result


def _check_consistency(ev: dict, rank: int, ws: int) -> None:
    stages = ev["stages"]
    assert list(stages) == list(int8_params.STAGES)
    # the harness: the model to shard is the baseline's twin; the reload target is not
    assert ev["identical_build"] is True
    assert ev["original"]["dtype"] == "int8" and ev["original"]["scb_elements"] == FEATURES
    for name, entry in stages.items():
        assert entry["ok"] == (entry["status"] == "completed" and not entry["findings"]), name
        if entry["status"] == "raised":
            assert entry["error"] and entry["where"], name
    for name in ("fully_shard", "unshard"):
        entry = stages[name]
        if entry["status"] != "completed":
            continue
        if entry["dtype"] != "int8":
            assert entry["bytes"]["bytes_equal"] is False
        assert (not entry["scb_present"]) == any("SCB absent" in f for f in entry["findings"])
    shard = stages["fully_shard"]
    if shard["status"] == "completed":
        assert shard["local_shape"] == [FEATURES // ws, FEATURES]  # Shard(0), rows split evenly
    forward = stages["forward"]
    if forward["status"] == "completed":
        if forward["output_bit_equal"]:
            assert forward["max_abs_delta"] == 0
        assert stages["backward"]["status"] != "not run"
    else:
        assert stages["backward"]["status"] == "not run"
    state = stages["state_dict"]
    if state["status"] == "completed":
        assert state["scb_present"] == (PREFIX + "SCB" in state["keys"])
        assert state["weight_format_present"] == (PREFIX + "weight_format" in state["keys"])
        assert state["missing_keys"] == sorted(set(ev["original"]["state_dict_keys"]) - set(state["keys"]))
        assert state["weight_is_dtensor"] == (state["types"][PREFIX + "weight"] == "DTensor")
        save = stages["save"]
        if save["status"] == "completed":
            assert save["scb_saved"] == state["scb_present"]
            assert save["tensors"] == len(state["keys"])
    load = stages["load"]
    if load["status"] == "completed":
        # a reload target quantized from other seeds: the load check can fail
        assert load["fresh_differs_before_load"] is True
        if not stages["save"]["scb_saved"]:
            assert load["scb_equal"] is False  # it kept its own scales
        if load["output_bit_equal"]:
            assert load["max_abs_delta"] == 0


@pytest.mark.parametrize("ws", [1, 2])
def test_evidence_consistent_and_matches_standalone(ws, cli_ws1, ws2):
    result = _result(ws, cli_ws1, ws2)
    assert len(result["ranks"]) == ws
    if any(rank["status"] != "ok" for rank in result["ranks"]):
        pytest.fail(f"a rank did not finish: {result['summary']}")
    failing = []
    for rank in result["ranks"]:
        _check_consistency(rank["evidence"], rank["rank"], ws)
        failing += [n for n, e in rank["evidence"]["stages"].items() if not e["ok"]]
    ev = result["evidence"]
    assert ev["failing_stages"] == [n for n in int8_params.STAGES if n in failing]
    assert (result["verdict"] == "REPRODUCED") == bool(failing)
    assert result["verdict"] in ("REPRODUCED", "NOT REPRODUCED")
    if failing:
        assert result["summary"].startswith(f"first failing stage {ev['first_failing_stage']} ")

    script_ranks = standalone(result)
    assert len(script_ranks) == ws
    for line, rank in zip(script_ranks, result["ranks"]):
        probe, script = rank["evidence"]["stages"], line["stages"]
        first = next((name for name in int8_params.STAGES if not probe[name]["ok"]), None)
        assert line["first_failing_stage"] == first
        for name in int8_params.STAGES:
            for key in ("status", "ok", "error", "where"):
                assert script[name].get(key) == probe[name].get(key), (name, key)
        for name in ("fully_shard", "unshard"):
            if probe[name]["status"] == "completed":
                for key in ("type", "local_type", "dtype", "scb_present"):
                    assert script[name][key] == probe[name][key], (name, key)
                assert script[name]["bytes_equal"] == probe[name]["bytes"]["bytes_equal"], name
        assert (
            script["forward"]["weight_seen"]["scb_present"] == probe["forward"]["weight_seen"]["scb_present"]
        )
        if probe["forward"]["status"] == "completed":
            assert script["forward"]["output_bit_equal"] == probe["forward"]["output_bit_equal"]
        if probe["state_dict"]["status"] == "completed":
            for key in ("keys", "missing_keys", "weight_is_dtensor", "scb_present"):
                assert script["state_dict"][key] == probe["state_dict"][key], key
            assert (
                script["state_dict"]["weight_bytes_equal"]
                == probe["state_dict"]["weight_bytes"]["bytes_equal"]
            )
        if probe["save"]["status"] == "completed":
            for key in ("round_trip_equal", "scb_saved"):
                assert script["save"][key] == probe["save"][key], key
        if probe["load"]["status"] == "completed":
            for key in ("missing_keys", "unexpected_keys", "scb_equal", "output_bit_equal", "max_abs_delta"):
                assert script["load"][key] == probe["load"][key], key
            assert script["load"]["weight_bytes_equal"] == probe["load"]["weight_bytes"]["bytes_equal"]


def test_cli_report_is_valid_and_renders(cli_ws1, run_cli):
    done, path = cli_ws1
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 0 nothing found, 1 REPRODUCED
    report = json.loads(path.read_text())
    jsonschema.validate(report, json_schema())
    result = _of_probe(report)
    assert result["world_size"] == 1 and result["backend"] == "gloo"
    if result["verdict"] == "REPRODUCED":  # the run's status is its worst probe's
        assert done.returncode == 1
    table = " ".join(done.stdout.split())
    assert "int8-params" in table and result["verdict"] in table
    assert " ".join(result["summary"].split())[:60] in table  # the summary line under the table
    markdown = run_cli("report", str(path), "--format", "md")
    assert markdown.returncode == 0, markdown.stderr
    assert "reproducers/int8_params.py" in markdown.stdout
    row = next(line for line in markdown.stdout.splitlines() if line.startswith("| int8-params |"))
    for name in int8_params.STAGES:
        assert f"{name}: " in row
    assert '"first_failing_stage"' in markdown.stdout  # the evidence block
    Report.from_dict(report)  # loads back


def test_positive_control_cast_mismatched_storage_caught_at_unshard():
    result = _probe(2, inject="cast-mismatched-storage")
    assert result.injected == "cast-mismatched-storage"
    assert result.verdict == "REPRODUCED", result.summary
    assert "unshard" in result.summary and "the unsharded weight is bfloat16, not int8" in result.summary
    assert "unshard" in result.evidence["failing_stages"]
    # the fault casts every integer parameter: the plain-int8 control is altered too
    assert result.evidence["controls"]["plain_integer_parameters"]["outcome"] == "altered"
    assert result.evidence["attribution"]["controls_point_to"] == "torch.distributed.fsdp"
    for rank in result.ranks:
        stages = rank["evidence"]["stages"]
        # the fault acts in the all-gather: the shards keep their int8 bytes ...
        assert stages["fully_shard"]["dtype"] == "int8"
        assert stages["fully_shard"]["bytes"]["bytes_equal"] is True
        # ... and the weight FSDP2 gathers for forward comes back as bf16
        unshard = stages["unshard"]
        assert unshard["dtype"] == "bfloat16" and unshard["bytes"]["bytes_equal"] is False
        assert "the unsharded weight is bfloat16, not int8" in unshard["findings"]
        assert unshard["ok"] is False


def _outcome(rank: int, stages: dict) -> RankOutcome:
    return RankOutcome(rank, "ok", {"stages": stages}, "load")


def test_verdict_names_first_failing_stage_or_none():
    ok = {name: {"status": "completed", "findings": [], "ok": True} for name in int8_params.STAGES}
    clean = int8_params.verdict([_outcome(0, ok), _outcome(1, ok)])
    assert clean.verdict == "NOT REPRODUCED" and clean.evidence["first_failing_stage"] is None
    raised = {
        **ok,
        "forward": {
            "status": "raised",
            "error": "AttributeError: no CB",
            "where": "bitsandbytes/nn/modules.py:1 in forward",
            "findings": [],
            "ok": False,
        },
        "backward": {"status": "not run", "reason": "forward raised", "findings": [], "ok": False},
    }
    found = int8_params.verdict([_outcome(0, ok), _outcome(1, raised)])
    assert found.verdict == "REPRODUCED"
    assert found.summary.startswith(
        "first failing stage forward (rank 1): AttributeError: no CB "
        "at bitsandbytes/nn/modules.py:1 in forward"
    )
    assert "backward: not run (forward raised)" in found.summary
    assert found.evidence["ranks_agree"] is False and found.evidence["failing_stages"] == [
        "forward",
        "backward",
    ]
