"""non-float-params: uint8 / int8 ``nn.Parameter(requires_grad=False)`` under ``fully_shard``.

They sit beside float parameters, sharded with a bf16 ``MixedPrecisionPolicy``.

FSDP2 casts every parameter to ``param_dtype`` on all-gather unless guarded (axolotl's
``init_dtype_attrs`` patch skips non-float ones). The probe shards, unshards, and compares
dtype and bytes of each integer parameter with the original. A ``fully_shard`` that refuses
the integer parameters (torch up to 2.11 built every sharded parameter as
``nn.Parameter(dtensor)``, which requires grad, before setting the real flag) is the
finding too: the exception and the FSDP2 line that raised it.
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.core.config import LinearConfig
    from fsdpqdiag.probes.common import unshard_integer_params

    cfg = LinearConfig(**config)
    evidence: dict[str, Any] = {"param_dtype": cfg.param_dtype}
    return unshard_integer_params(cfg, ctx, evidence, lambda stage: ctx.checkpoint(stage, evidence))


def attribute(evidence: dict) -> tuple[str, list[str]]:
    from fsdpqdiag.evidence import attribution

    # The probe is its own control: plain frozen uint8/int8 nn.Parameters, no bitsandbytes.
    return attribution.TORCH_FSDP, ["no bitsandbytes in the path: plain frozen uint8/int8 nn.Parameters"]


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    from fsdpqdiag.core.config import INTEGER_PARAMS

    failed = failure_verdict(outcomes)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    refusals = [o for o in outcomes if o.evidence.get("fully_shard", {}).get("status") == "raised"]
    if refusals:
        evidence["ranks_agree"] = ranks_agree(outcomes, lambda e: e.get("fully_shard", {}).get("error"))
        refusal = refusals[0].evidence["fully_shard"]
        site = refusal.get("fsdp_frame") or refusal.get("where")
        ranks = ", ".join(str(o.rank) for o in refusals)
        return Verdict(
            REPRODUCED,
            f"fully_shard refused the frozen uint8/int8 parameters on rank(s) {ranks}: "
            f"{refusal['error']} (raised at {refusal.get('where')}; FSDP2 call at {site})",
            evidence,
        )
    evidence["ranks_agree"] = ranks_agree(
        outcomes, lambda e: tuple((e[n]["unsharded_dtype"], e[n].get("bytes_equal")) for n in INTEGER_PARAMS)
    )
    broken = [n for o in outcomes for n in INTEGER_PARAMS if not o.evidence[n].get("bytes_equal")]
    detail = ", ".join(f"{n}: {evidence[n]['unsharded_dtype']}" for n in INTEGER_PARAMS)
    if broken:
        return Verdict(
            REPRODUCED, f"after unshard {detail}; bytes altered in {sorted(set(broken))}", evidence
        )
    return Verdict(NOT_REPRODUCED, f"after unshard {detail}; dtype and every byte preserved", evidence)


INTEGER_PARAMS = ("u8", "i8")


def key_numbers(evidence: dict) -> str:
    """How a result reads: fully_shard's refusal, or each integer parameter's dtype and
    bytes after unshard."""
    refusal = evidence.get("fully_shard") or {}
    if refusal.get("status") == "raised":
        return f"fully_shard raised {refusal['error']} ({refusal.get('fsdp_frame') or refusal.get('where')})"
    return "; ".join(
        f"{name}: {evidence[name]['unsharded_dtype']}, bytes equal {evidence[name].get('bytes_equal')}"
        for name in INTEGER_PARAMS
        if name in evidence
    )


PROBE = Probe(
    name="non-float-params",
    description="uint8/int8 frozen params beside float ones under fully_shard + bf16: dtype and bytes kept?",
    run=run,
    verdict=verdict,
    needs=Needs(packages=()),
    standalone="reproducers/non_float_params.py",
    attribute=attribute,
    controls=("cast-integer-params", "refuse-integer-params"),
    presentation=Presentation(key_numbers, reads=frozenset({"fully_shard", *INTEGER_PARAMS})),
)
