"""Mechanism B of bitsandbytes #1945: ``full_tensor()`` / ``redistribute([Replicate()])``.

Both calls gather the sharded packed weight through DTensor rather than FSDP2. Each rank
runs in its own process, so a SIGSEGV here is a CRASHED result naming the call, not the
end of the run; a call that completes is checked for byte-true output.
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict
from fsdpqdiag.probes.nan_canonicalization import views_key_numbers
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED

CALLS = ("full_tensor()", "redistribute([Replicate()])")
# The preflight capabilities (fsdpqdiag.analyses.preflight) that are these calls on ordinary tensors.
CALLS_PRECONDITIONS = ("DTensor.full_tensor()", "DTensor.redistribute(Replicate)")


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.evidence.bytes import diff, plain
    from fsdpqdiag.probes.common import build_linear4bit, shard

    try:
        from torch.distributed.tensor import Replicate
    except ImportError:  # torch < 2.4
        from torch.distributed._tensor import Replicate

    cfg = LinearConfig(**config)
    linear, x = build_linear4bit(cfg, ctx.device)
    original = plain(linear.weight).clone()
    evidence: dict[str, Any] = {"elements": original.numel(), "shape": list(original.shape)}
    ctx.checkpoint("fully_shard", evidence)
    shard(linear, ctx, cfg)
    # #1945 calls these after a post-shard forward ("same setup, then"); reshard so the
    # weight is the sharded DTensor again whatever this torch does with the root after it.
    ctx.checkpoint("forward after fully_shard", evidence)
    linear(x)
    linear.reshard()
    evidence["weight_type"] = type(linear.weight).__name__

    ctx.checkpoint(CALLS[0], evidence)
    evidence[CALLS[0]] = {"status": "completed", **diff(original, linear.weight.full_tensor())}
    ctx.checkpoint(CALLS[1], evidence)
    replicated = linear.weight.redistribute(placements=[Replicate()])
    evidence[CALLS[1]] = {"status": "completed", **diff(original, replicated.to_local())}
    return evidence


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    failed = failure_verdict(outcomes, keep_evidence=True)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    wrong = [(o.rank, call) for o in outcomes for call in CALLS if not o.evidence[call].get("bytes_equal")]
    evidence["ranks_with_wrong_bytes"] = sorted({rank for rank, _ in wrong})
    if wrong:
        rank, call = wrong[0]
        found = outcomes[rank].evidence[call]
        return Verdict(
            REPRODUCED,
            f"{call} completed but returned wrong bytes on rank {rank} "
            f"({found.get('differing_elements', 'n/a')} elements differ)",
            evidence,
        )
    return Verdict(
        NOT_REPRODUCED,
        "full_tensor() and redistribute([Replicate()]) completed on every rank, byte-true",
        evidence,
    )


def attribute(evidence: dict) -> tuple[str, list[str]]:
    """The control is the stack preflight in the same launch: the same calls on ordinary
    tensors. Where they held, a crash or wrong bytes on the packed weight are DTensor's
    gather of it; where the preflight did not run, nothing separates the suspects."""
    from fsdpqdiag.evidence import attribution

    held = evidence.get("preflight_held")
    if not held or not set(CALLS_PRECONDITIONS) <= set(held):
        return attribution.UNDETERMINED, ["no ordinary-tensor control of full_tensor()/redistribute() ran"]
    return attribution.TORCH_DTENSOR, [
        "preflight in the same launch: " + ", ".join(CALLS_PRECONDITIONS) + " held on ordinary tensors",
        f"failed on the packed weight in {evidence.get('stage') or 'the gather'}",
    ]


# Each gather's evidence is the bytes of the weight it returned, under the call's name; no
# forward is compared.
key_numbers = views_key_numbers(CALLS, runs_forward=False)


PROBE = Probe(
    name="full-tensor-crash",
    description="Mechanism B: do full_tensor()/redistribute() on the sharded packed weight crash?",
    run=run,
    verdict=verdict,
    needs=Needs(),
    standalone="reproducers/full_tensor_crash.py",
    # FSDP2's forward, then the two DTensor gathers it calls on the sharded weight.
    preconditions=("all_gather_into_tensor", *CALLS_PRECONDITIONS),
    attribute=attribute,
    # Each kills the ranks inside full_tensor()/redistribute(): CRASHED, not NOT REPRODUCED.
    controls=("segfault", "abort", "oom-kill"),
    # It reads as Mechanism A's result: the bytes of the views of the weight it gathers.
    presentation=Presentation(
        key_numbers,
        sections={"full_tensor": "full_tensor()"},
        reads=frozenset(CALLS),
    ),
)
