"""The probes of the relatives of the bug: every probe at WS=1 and WS=2 on gloo.

Evidence consistency, positive controls, and agreement with the standalone reproducers."""

import pytest

from tests.support import cpu_probe as _probe
from tests.support.scripts import standalone

INTEGER_PARAMS = ("u8", "i8")


@pytest.mark.parametrize("ws", [1, 2])
def test_non_float_params_evidence_consistent_and_matches_standalone(shared_probe, ws):
    result = shared_probe("non-float-params", ws)
    assert len(result.ranks) == ws
    script_ranks = standalone(result)
    assert len(script_ranks) == ws
    for line, rank in zip(script_ranks, result.ranks):
        ev = rank["evidence"]
        assert line["fully_shard"]["status"] == ev["fully_shard"]["status"]
        if ev["fully_shard"]["status"] == "raised":  # torch <= 2.11: the refusal is the finding
            assert result.verdict == "REPRODUCED", result.summary
            assert line["fully_shard"]["error"].startswith(ev["fully_shard"]["error"])
            continue
        for name in INTEGER_PARAMS:
            entry = ev[name]
            # self-consistency: bytes can only be equal where the dtype survived
            assert entry["dtype_preserved"] == (
                entry["unsharded_dtype"] == f"torch.{'uint8' if name == 'u8' else 'int8'}"
            )
            if not entry["dtype_preserved"]:
                assert entry["bytes_equal"] is False
            for key in ("unsharded_dtype", "dtype_preserved", "bytes_equal"):
                assert line[name][key] == entry[key], (name, key)


@pytest.mark.parametrize("ws", [1, 2])
def test_non_float_params_catches_cast_fault(ws):
    result = _probe("non-float-params", ws, inject="cast-integer-params")
    assert result.verdict == "REPRODUCED", result.summary
    # a fault in a path without bitsandbytes: the controls point to torch
    attribution = result.evidence["attribution"]
    assert attribution["component"] == "injected fault"
    assert attribution["controls_point_to"] == "torch.distributed.fsdp"
    for rank in result.ranks:
        for name in INTEGER_PARAMS:
            assert rank["evidence"][name]["unsharded_dtype"] == "torch.bfloat16"
            assert rank["evidence"][name]["bytes_equal"] is False


@pytest.mark.parametrize("ws", [1, 2])
def test_non_float_params_names_a_refusing_fully_shard(ws):
    result = _probe("non-float-params", ws, inject="refuse-integer-params")
    assert result.verdict == "REPRODUCED", result.summary
    assert len(result.ranks) == ws
    for rank in result.ranks:
        refusal = rank["evidence"]["fully_shard"]
        assert refusal["status"] == "raised"
        # torch 2.11 words it "only Tensors of floating point dtype can require gradients"
        assert refusal["error"].startswith("RuntimeError: ")
        assert (
            "tensors of floating point" in refusal["error"].lower()
            and "require gradients" in refusal["error"]
        )
        assert refusal["where"].startswith("torch/nn/parameter.py:")
        # the FSDP2 line on the way, not the injected wrapper's: the wrapper lives in fsdpqdiag
        assert "torch/distributed/fsdp/_fully_shard/_fsdp_param.py" in refusal["fsdp_frame"]
        assert "u8" not in rank["evidence"] and "i8" not in rank["evidence"]
    assert "fully_shard refused" in result.summary and "_fsdp_param.py" in result.summary
