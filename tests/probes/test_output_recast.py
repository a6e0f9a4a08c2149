"""An output in FSDP2's param_dtype with equal values has not changed.

With ``--quant-storage uint8 --param-dtype fp16`` the output is fp16 against a bf16
baseline: equal values in other bits are a recast, not a change, and the verdict must follow
the values (NOT REPRODUCED), never call them changed with max |Δy| = 0."""

import json

import pytest
import torch

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.evidence.bytes import output_delta
from fsdpqdiag.probes import nan_canonicalization
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, UNSUPPORTED
from tests.support import SMALL_LINEAR


def test_output_delta_tells_a_recast_from_a_change():
    reference = torch.tensor([1.0, -2.5, 0.0, 3.0], dtype=torch.bfloat16)
    recast = output_delta(reference, reference.to(torch.float16))
    assert recast["output_bit_equal"] is False and recast["output_value_equal"] is True
    assert (recast["reference_dtype"], recast["observed_dtype"]) == ("bfloat16", "float16")
    moved = output_delta(reference, (reference + 1).to(torch.float16))
    assert moved["output_value_equal"] is False and moved["max_abs_delta"] == 1.0
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16)
    assert output_delta(nan, nan.to(torch.float16))["output_value_equal"] is False
    assert output_delta(reference, reference.clone())["output_value_equal"] is True


def _outcome(**output) -> RankOutcome:
    untouched = {"comparable": True, "bytes_equal": True, "differing_elements": 0, "differing_bytes": 0}
    evidence = {
        "elements": 64,
        "nan_elements": 0,
        "swap_target": dict(untouched),
        "local_tensor": dict(untouched),
        "full_tensor": dict(untouched),
        "fingerprint": None,
        **output,
    }
    return RankOutcome(rank=0, status="ok", evidence=evidence)


def test_verdict_follows_the_values_not_the_dtype():
    recast = _outcome(
        output_bit_equal=False,
        output_value_equal=True,
        max_abs_delta=0.0,
        reference_dtype="bfloat16",
        observed_dtype="float16",
    )
    decided = nan_canonicalization.verdict([recast])
    assert decided.verdict == NOT_REPRODUCED, decided.summary
    assert "float16 instead of bfloat16" in decided.summary
    moved = _outcome(
        output_bit_equal=False,
        output_value_equal=False,
        max_abs_delta=0.5,
        reference_dtype="bfloat16",
        observed_dtype="bfloat16",
    )
    decided = nan_canonicalization.verdict([moved])
    assert decided.verdict == INCONCLUSIVE and "0.5" in decided.summary


def test_a_recast_output_is_not_called_changed_on_the_real_stack(run_cli):
    # Evidence consistency, not a verdict the stack decides: a summary that says the output
    # changed must come with a non-zero or non-finite delta.
    result = run_cli(
        "reproduce",
        "--probe",
        "nan-canonicalization",
        "--quant-storage",
        "uint8",
        "--param-dtype",
        "fp16",
        "--ws",
        "1",
        "--device",
        "cpu",
        *SMALL_LINEAR,
        "-q",
        json=True,
    )
    probe = result.report["results"][0]
    if probe["verdict"] == UNSUPPORTED:
        pytest.skip(f"the preflight refused the probe on this stack: {probe['summary']}")
    assert result.returncode in (0, 1), (result.returncode, probe["summary"], result.stderr[-2000:])
    evidence = probe["evidence"]
    # The question is asked of forward's output: the run must have reached it, else the
    # checks below would pass on nothing.
    reached = evidence.get("stage") or "every stage"
    assert "output_value_equal" in evidence, f"ended at {reached} before forward: {probe['summary']}"
    assert evidence["observed_dtype"] == "float16"
    if "output changed" in probe["summary"]:
        assert evidence["max_abs_delta"] or evidence["nonfinite_delta_elements"], json.dumps(evidence)[:500]
    if evidence["output_value_equal"] and evidence["swap_target"].get("bytes_equal"):
        assert probe["verdict"] == NOT_REPRODUCED, probe["summary"]
