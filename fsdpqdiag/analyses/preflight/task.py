"""The preflight as a rank task: each capability, then the FSDP units; its own launch or
the head of a probe batch."""

from __future__ import annotations

from typing import Any

from fsdpqdiag.analyses.preflight.collectives import CHECKS, bitsandbytes_path
from fsdpqdiag.analyses.preflight.names import (
    CAPABILITIES,
    FULL_TENSOR,
    NAME,
    REDISTRIBUTE,
    UNITS_STAGE,
)
from fsdpqdiag.analyses.preflight.units import _units_of_linear, _units_of_model
from fsdpqdiag.probes.base import Needs, Probe, Verdict, first_line


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    """One rank's preflight: each capability not in ``skip``, then (if asked) the FSDP units."""
    skip = set(config.get("skip", ()))
    evidence: dict[str, Any] = {"capabilities": {}}
    if ctx.rank == 0:
        evidence["bitsandbytes_path"] = bitsandbytes_path(ctx.device_type)
    mesh = None
    for name in CAPABILITIES:
        if name in skip:
            continue
        ctx.checkpoint(name, evidence)
        try:
            if mesh is None and name in (FULL_TENSOR, REDISTRIBUTE):
                mesh = ctx.mesh()
            evidence["capabilities"][name] = {"status": "completed", "dtypes": CHECKS[name](ctx, mesh)}
        except Exception as exc:  # noqa: BLE001 - a capability that raises is a finding
            evidence["capabilities"][name] = {"status": "raised", "error": f"{type(exc).__name__}: {exc}"}
    if config.get("units", True) and (config.get("model") or config.get("linear")):
        ctx.checkpoint(UNITS_STAGE, evidence)
        try:
            if config.get("model"):
                evidence[UNITS_STAGE] = _units_of_model(config["model"], ctx)
            else:
                evidence[UNITS_STAGE] = _units_of_linear(config["linear"], ctx)
        except Exception as exc:  # noqa: BLE001
            evidence[UNITS_STAGE] = {"error": f"{type(exc).__name__}: {first_line(str(exc)) or ''}"}
    return evidence


def _unused_verdict(outcomes) -> Verdict:
    raise NotImplementedError("the preflight has no verdict: preflight.run_preflight merges its ranks")


PROBE = Probe(
    name=NAME,
    description="stack preflight: collectives on ordinary tensors, bitsandbytes' path, FSDP units (internal)",
    run=run,
    verdict=_unused_verdict,
    needs=Needs(packages=(), with_model=("transformers",)),
    stack_faults_only=True,
)
