"""issue 6, probe 4: uint8 / int8 ``nn.Parameter(requires_grad=False)`` beside float
parameters under ``fully_shard`` with a bf16 ``MixedPrecisionPolicy``.

FSDP2 casts every parameter to ``param_dtype`` on all-gather unless guarded (axolotl's
``init_dtype_attrs`` patch skips non-float ones). The probe shards, unshards, and compares
dtype and bytes of each integer parameter with the original. A ``fully_shard`` that refuses
the integer parameters (torch up to 2.11 built every sharded parameter as
``nn.Parameter(dtensor)``, which requires grad, before setting the real flag) is the
finding too: the exception and the FSDP2 line that raised it.
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.launch import RankOutcome
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.report import NOT_REPRODUCED, REPRODUCED

INTEGER_PARAMS = ("u8", "i8")


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag.bytes import diff
    from fsdpqdiag.config import LinearConfig
    from fsdpqdiag.probes.common import raised, shard

    cfg = LinearConfig(**config)
    torch.manual_seed(cfg.weight_seed)
    module = torch.nn.Module()
    module.linear = torch.nn.Linear(cfg.in_features, cfg.out_features, bias=False)
    module.u8 = torch.nn.Parameter(
        torch.randint(0, 256, (cfg.out_features, cfg.in_features), dtype=torch.uint8), requires_grad=False
    )
    module.i8 = torch.nn.Parameter(
        torch.randint(-128, 128, (cfg.out_features, cfg.in_features), dtype=torch.int8), requires_grad=False
    )
    module = module.to(ctx.device)
    originals = {name: getattr(module, name).detach().clone() for name in INTEGER_PARAMS}
    evidence: dict[str, Any] = {"param_dtype": cfg.param_dtype}
    ctx.checkpoint("fully_shard", evidence)
    try:
        shard(module, ctx, cfg)
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is the finding
        evidence["fully_shard"] = raised(exc)
        return evidence
    evidence["fully_shard"] = {"status": "completed"}
    evidence["sharded_dtypes"] = {n: str(getattr(module, n).dtype) for n in INTEGER_PARAMS}
    ctx.checkpoint("unshard", evidence)
    module.unshard()
    for name in INTEGER_PARAMS:
        gathered = getattr(module, name)
        gathered = gathered.full_tensor() if hasattr(gathered, "full_tensor") else gathered
        entry = {
            "unsharded_dtype": str(gathered.dtype),
            "dtype_preserved": gathered.dtype == originals[name].dtype,
        }
        if entry["dtype_preserved"]:
            entry.update(diff(originals[name], gathered.detach().cpu().to(originals[name].device)))
        else:
            entry["bytes_equal"] = False
            entry["values_equal"] = bool(
                torch.equal(gathered.detach().to(originals[name].dtype), originals[name])
            )
        evidence[name] = entry
    module.reshard()
    return evidence


def verdict(outcomes: list[RankOutcome]) -> Verdict:
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


PROBE = Probe(
    name="non-float-params",
    description="uint8/int8 frozen params beside float ones under fully_shard + bf16: dtype and bytes kept?",
    run=run,
    verdict=verdict,
    needs=Needs(packages=()),
    standalone="reproducers/non_float_params.py",
)
