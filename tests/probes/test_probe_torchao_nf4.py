"""torchao-nf4-reference: the same NF4 weight through bitsandbytes and torchao on one stack.

The common representation is checked in-process (both libraries' codes of one draw, read in the
same element order, mostly agree; read in the other nibble order, they do not); the uninjected
run is the shared ``reproduce`` run's; each positive control flips it on CPU/gloo at WS=2, one
towards each library. At WS=1 torch from 2.9 refuses an NF4Tensor's all-gather extension, so the
probe says UNSUPPORTED there, which this module checks on its own shape of evidence only.
"""

from __future__ import annotations

import pytest

from fsdpqdiag.core.outcome import RankOutcome, RankStatus
from fsdpqdiag.probes import torchao_nf4_reference as probe
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED, UNSUPPORTED
from tests.support import SMALL_FEATURES, cpu_probe

torchao = pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[torchao]'")


def test_both_libraries_codes_read_in_one_element_order():
    import torch

    from fsdpqdiag.core.config import LinearConfig
    from fsdpqdiag.evidence.bytes import plain
    from fsdpqdiag.probes.common import build_linear4bit

    cfg = LinearConfig(in_features=SMALL_FEATURES, out_features=SMALL_FEATURES)
    linear, _ = build_linear4bit(cfg, torch.device("cpu"))
    bnb_codes = probe.nf4_codes(plain(linear.weight))
    to_nf4, _ = probe.torchao_nf4()
    torch.manual_seed(cfg.weight_seed)
    drawn = torch.nn.Linear(cfg.in_features, cfg.out_features, bias=False).weight.detach()
    packed = to_nf4(drawn.to(torch.bfloat16)).quantized_data
    torchao_codes = probe.nf4_codes(packed)
    assert bnb_codes.numel() == torchao_codes.numel() == cfg.in_features * cfg.out_features
    assert (bnb_codes == torchao_codes).float().mean() > 0.95
    swapped = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)
    assert (bnb_codes == swapped).float().mean() < 0.5


def _outcome(rank: int, evidence: dict) -> RankOutcome:
    return RankOutcome(rank=rank, status=RankStatus.OK, evidence=evidence)


def _half(differing: int) -> dict:
    equal = {"bytes_equal": not differing}
    codes = {"elements": 8, "differing_codes": differing, "positions": []}
    return {"status": "completed", "codes": codes, "bytes": equal, "inner": {"quantized_data": equal}}


@pytest.mark.parametrize(
    ("bnb", "torchao", "verdict", "follows"),
    [(0, 0, NOT_REPRODUCED, None), (3, 0, REPRODUCED, "library"), (3, 2, REPRODUCED, "stack"),
     (0, 2, REPRODUCED, "torchao")],
)  # fmt: skip
def test_verdict_says_whom_an_alteration_follows(bnb, torchao, verdict, follows):
    ranks = [_outcome(0, {"bitsandbytes": _half(0), "torchao": _half(0)}),
             _outcome(1, {"bitsandbytes": _half(bnb), "torchao": _half(torchao)})]  # fmt: skip
    said = probe.verdict(ranks)
    assert said.verdict == verdict and said.evidence["follows"] == follows
    assert isinstance(probe.key_numbers(said.evidence), str)


def test_a_refused_torchao_half_is_unsupported_and_names_torch():
    raised = {
        "status": "raised",
        "exception": "ValueError: not enough values to unpack (expected 3, got 1)",
        "fsdp_frame": "torch/distributed/fsdp/_fully_shard/_fsdp_param.py:652 in init_unsharded_param",
    }
    said = probe.verdict([_outcome(0, {"bitsandbytes": _half(0), "torchao": raised})])
    assert said.verdict == UNSUPPORTED and "no reference" in said.summary
    component, decided_by = probe.attribute(said.evidence)
    assert component == "torch.distributed.fsdp" and "not enough values" in decided_by[0]


def test_uninjected_evidence_is_consistent(shared_probe):
    result = shared_probe("torchao-nf4-reference", 2)
    evidence = result.evidence
    elements = SMALL_FEATURES * SMALL_FEATURES
    for library in probe.LIBRARIES:
        assert evidence[library]["status"] == "completed"
        assert evidence[library]["codes"]["elements"] == elements
    assert evidence["codes_agree_between_libraries"] > 0.95
    altered = [probe.altered(evidence[library]) for library in probe.LIBRARIES]
    assert (result.verdict == NOT_REPRODUCED) == (not any(altered))


@pytest.mark.parametrize(
    ("fault", "follows", "altered"),
    [("nan-canonicalize", "library", "bitsandbytes"), ("swap-packed-nibbles", "torchao", "torchao")],
)
def test_positive_controls_flip_it_towards_one_library(fault, follows, altered):
    result = cpu_probe("torchao-nf4-reference", 2, inject=fault)
    assert result.verdict == REPRODUCED, result.summary
    assert result.evidence["follows"] == follows
    assert result.evidence[altered]["codes"]["differing_codes"] > 0
    other = next(library for library in probe.LIBRARIES if library != altered)
    assert result.evidence[other]["codes"]["differing_codes"] == 0
