"""storage-dtype-mismatch: quant_storage != FSDP2 param_dtype.

Real fully_shard, real Linear4bit, gloo at WS=1 and WS=2. Verdicts of uninjected runs
belong to the stack: these tests check that every row's evidence is self-consistent, that
the standalone reproducer measures the same, and that the injected cast is caught.
"""

import json

import jsonschema
import pytest
import torch

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.probes import storage_dtype_mismatch as sdm
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED, json_schema
from tests.support import SMALL_LINEAR, cpu_probe
from tests.support.scripts import standalone

PROBE = "storage-dtype-mismatch"
FAULT = "cast-mismatched-storage"
DEFAULT_LABELS = [sdm.label(*pair) for pair in sdm.DEFAULT_COMBINATIONS]


def _probe(ws: int, inject: str | None = None, **config):
    return cpu_probe(PROBE, ws, inject, **config)


@pytest.fixture(scope="module")
def results(shared_probe):
    """Each (world size, fault) launched once for the module: every launch starts real ranks.
    Uninjected, the probe's result in the reproduce run every module shares."""
    made = {}

    def get(ws: int, inject: str | None = None):
        if (ws, inject) not in made:
            made[(ws, inject)] = shared_probe(PROBE, ws) if inject is None else _probe(ws, inject)
        return made[(ws, inject)]

    return get


def _check_row(row: dict) -> None:
    """Relations that hold whatever the stack does to a combination."""
    assert row["matching"] == (row["param_dtype"] == row["quant_storage"])
    assert row["packed_dtype"] == row["quant_storage"]
    done = row["completed_stages"]
    assert done == list(sdm.STAGES[: len(done)])
    assert row["sharded"] == (sdm.STAGES[0] in done)
    if row["failure"] is None:
        assert done == list(sdm.STAGES)
    else:
        assert row["failure"]["stage"] == sdm.STAGES[len(done)]
        assert ":" in row["failure"]["exception"]
    if row["sharded"]:
        assert set(row["local_shard"]) == set(sdm.LOCAL_SHARD_KEYS)
    assert ("unsharded_dtype" in row) == (sdm.STAGES[1] in done)
    assert ("output" in row) == (sdm.STAGES[2] in done)
    weight = row.get("forward_weight")
    if weight is not None:
        # forward received exactly what the unshard produced
        assert weight["dtype"] == row["unsharded_dtype"]
        if weight["dtype"] == row["packed_dtype"]:
            assert weight["comparable"] and weight["cast_by_value"] is None
        else:
            assert not weight["comparable"] and isinstance(weight["cast_by_value"], bool)
        if weight["nbytes_original"] != weight["nbytes_observed"]:
            assert weight["differing_bytes"] is None and weight["bytes_equal"] is False
        else:
            assert weight["bytes_equal"] == (weight["differing_bytes"] == 0)
    output = row.get("output")
    if output is not None:
        if output["output_bit_equal"]:
            assert output["max_abs_delta"] == 0 and output["nonfinite_delta_elements"] == 0
        if weight is not None and weight["bytes_equal"]:
            # the same packed bytes through the same kernel give the same output
            assert output["output_bit_equal"]
    assert row["preserved"] == (
        row["failure"] is None and bool(row["bytes_preserved"]) and bool(row["output_preserved"])
    )


@pytest.mark.parametrize("ws", [1, 2])
def test_evidence_is_self_consistent(results, ws):
    result = results(ws)
    assert result.verdict in (REPRODUCED, NOT_REPRODUCED), result.summary
    assert len(result.ranks) == ws
    ev = result.evidence
    assert isinstance(ev["ranks_agree"], bool)
    assert [row["combination"] for row in ev["rows"]] == DEFAULT_LABELS
    broken = set()
    for rank in result.ranks:
        rows = rank["evidence"]["rows"]
        assert [row["combination"] for row in rows] == DEFAULT_LABELS
        for row in rows:
            _check_row(row)
            if not row["matching"] and not row["preserved"]:
                broken.add(row["combination"])
    assert set(ev["failing_combinations"]) == broken
    assert (result.verdict == REPRODUCED) == bool(broken)
    for name in broken:
        assert name in result.summary


@pytest.mark.parametrize("ws", [1, 2])
def test_matches_standalone_reproducer(results, ws):
    result = results(ws)
    script_ranks = standalone(result)
    assert len(script_ranks) == len(result.ranks) == ws
    for line, rank in zip(script_ranks, result.ranks):
        rows = rank["evidence"]["rows"]
        assert [r["combination"] for r in line["rows"]] == [r["combination"] for r in rows]
        for script_row, row in zip(line["rows"], rows):
            name = row["combination"]
            for key in ("sharded", "sharded_dtype", "unsharded_dtype"):
                assert script_row.get(key) == row.get(key), (name, key)
            failure = row["failure"] or {}
            assert (script_row["failure"] or {}).get("stage") == failure.get("stage"), name
            assert (script_row["failure"] or {}).get("exception") == failure.get("exception"), name
            weight = row.get("forward_weight") or {}
            for key in ("dtype", "bytes_equal", "differing_bytes", "cast_by_value"):
                assert (script_row.get("forward_weight") or {}).get(key) == weight.get(key), (name, key)
            output = row.get("output") or {}
            for key in ("max_abs_delta", "mean_abs_delta", "output_bit_equal"):
                assert script_row.get(key) == output.get(key), (name, key)


@pytest.mark.parametrize("ws", [1, 2])
def test_catches_cast_of_mismatched_storage(results, ws):
    result = results(ws, FAULT)
    assert result.verdict == REPRODUCED, result.summary
    clean = {row["combination"]: row for row in results(ws).ranks[0]["evidence"]["rows"]}
    for rank in result.ranks:
        for row in rank["evidence"]["rows"]:
            _check_row(row)
            if row["matching"]:
                # the fault leaves a parameter that already has param_dtype alone
                for key in ("unsharded_dtype", "failure", "bytes_preserved", "output_preserved"):
                    assert row[key] == clean[row["combination"]][key], key
                continue
            # every mismatched storage reaches forward cast by value to param_dtype
            assert row["unsharded_dtype"] == row["param_dtype"]
            assert row["forward_weight"]["cast_by_value"] is True
            assert row["bytes_preserved"] is False and row["preserved"] is False
    assert result.evidence["failing_combinations"] == [n for n in DEFAULT_LABELS if n != "bf16/bf16"]
    assert "uint8/bf16" in result.summary


def test_fault_alone_flips_the_verdict():
    """uint8 storage is the pair only the fault breaks: with just it and the reference,
    REPRODUCED comes from the injected cast and nothing else."""
    pairs = [list(sdm.REFERENCE), ["uint8", "bfloat16"]]
    result = _probe(1, FAULT, combinations=pairs)
    assert result.verdict == REPRODUCED, result.summary
    rows = result.evidence["rows"]
    assert [row["combination"] for row in rows] == ["bf16/bf16", "uint8/bf16"]
    uint8 = rows[1]
    assert uint8["sharded_dtype"] == "uint8" and uint8["unsharded_dtype"] == "bfloat16"
    assert uint8["forward_weight"]["cast_by_value"] is True
    assert result.evidence["failing_combinations"] == ["uint8/bf16"]


def test_reproduce_cli_end_to_end_and_renderers(run_cli):
    result = run_cli("reproduce", "--probe", PROBE, "--ws", "1", "--device", "cpu", *SMALL_LINEAR, json=True)
    assert result.returncode in (0, 1), result.stderr
    report = result.report
    jsonschema.validate(report, json_schema())
    (probe_result,) = report["results"]
    assert probe_result["probe"] == PROBE
    assert (result.returncode == 1) == (probe_result["verdict"] == REPRODUCED)
    table_text = " ".join(result.stdout.split())
    assert "storage/params" in table_text and probe_result["verdict"] in table_text
    for name in DEFAULT_LABELS:
        assert name in table_text
    # `report` renders in-process: it needs no ranks, and a second interpreter costs seconds.
    from typer.testing import CliRunner

    from fsdpqdiag.cli import app

    markdown = CliRunner().invoke(app, ["report", str(result.json_path), "--format", "md"])
    assert markdown.exit_code == 0, markdown.output
    assert "| storage/params |" in markdown.output and "max \\|Δy\\|" in markdown.output
    for row in probe_result["evidence"]["rows"]:
        assert f"| {row['combination']}" in markdown.output
    assert "reproducers/storage_dtype_mismatch.py" in markdown.output


def test_combinations_default_and_configured_pair():
    base = LinearConfig().__dict__
    assert sdm.combinations(base) == list(sdm.DEFAULT_COMBINATIONS)
    own = dict(base, quant_storage="float16", param_dtype="float32")
    assert sdm.combinations(own) == [*sdm.DEFAULT_COMBINATIONS, ("float16", "float32")]
    assert sdm.combinations(dict(base, combinations=[["uint8", "bfloat16"]])) == [
        ("uint8", "bfloat16"),
        sdm.REFERENCE,
    ]
    assert sdm.label("uint8", None) == "uint8/none"


def test_compare_storage_across_dtype_changes():
    original = torch.tensor([[1.5], [-2.0], [0.1]], dtype=torch.float16)
    same = sdm.compare_storage(original, original.clone())
    assert same["bytes_equal"] and same["cast_by_value"] is None and same["differing_bytes"] == 0
    cast = sdm.compare_storage(original, original.to(torch.bfloat16))
    assert cast["cast_by_value"] is True and cast["bytes_equal"] is False and cast["differing_bytes"] > 0
    reinterpreted = sdm.compare_storage(original, original.view(torch.bfloat16))
    assert reinterpreted["bytes_equal"] is True and reinterpreted["cast_by_value"] is False
    widened = sdm.compare_storage(original, original.to(torch.float32))
    assert widened["differing_bytes"] is None and widened["bytes_equal"] is False
    assert widened["cast_by_value"] is True


def test_verdict_counts_a_row_broken_on_any_rank():
    def row(name, matching, preserved):
        return {"combination": name, "matching": matching, "preserved": preserved, "sharded": True}

    ok = {"rows": [row("bf16/bf16", True, True), row("uint8/bf16", False, True)]}
    broken = {"rows": [row("bf16/bf16", True, True), row("uint8/bf16", False, False)]}
    clean = sdm.verdict([RankOutcome(0, "ok", ok), RankOutcome(1, "ok", json.loads(json.dumps(ok)))])
    assert clean.verdict == NOT_REPRODUCED and clean.evidence["ranks_agree"]
    decided = sdm.verdict([RankOutcome(0, "ok", ok), RankOutcome(1, "ok", broken)])
    assert decided.verdict == REPRODUCED and decided.evidence["failing_combinations"] == ["uint8/bf16"]
    assert decided.evidence["ranks_agree"] is False
