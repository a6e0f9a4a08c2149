"""In the parent: merge the ranks' preflight, relaunch after a death, and decide which
probes the stack leaves UNSUPPORTED."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fsdpqdiag.analyses.preflight.names import (
    CAPABILITIES,
    COMPONENT,
    KNOWN_ISSUES,
    NAME,
    UNITS_STAGE,
)
from fsdpqdiag.core.config import RankTask, RunConfig
from fsdpqdiag.probes.base import Verdict, failure_verdict, first_line


def _describe_dtypes(dtypes: dict[str, dict]) -> tuple[bool, str]:
    wrong = {name: found for name, found in dtypes.items() if not found.get("bytes_equal")}
    if not wrong:
        return True, f"bytes equal after the round trip ({', '.join(dtypes)})"
    parts = []
    for name, found in wrong.items():
        if "mismatch" in found:
            parts.append(f"{name}: came back {found['mismatch']}")
            continue
        first = found.get("first_difference") or {}
        parts.append(
            f"{name}: {found.get('differing_elements')} of {found.get('elements')} elements differ "
            f"(e.g. {first.get('expected')} -> {first.get('observed')})"
        )
    return False, "bytes differ: " + "; ".join(parts)


def _merge_completed(name: str, per_rank: list[dict]) -> dict[str, Any]:
    """One capability that every rank finished: ok only where every rank got every byte."""
    raised = [(rank, found) for rank, found in enumerate(per_rank) if found.get("status") == "raised"]
    if raised:
        rank, found = raised[0]
        return {"name": name, "ok": False, "detail": f"rank {rank} raised {first_line(found['error'])}"}
    details = [_describe_dtypes(found["dtypes"]) for found in per_rank]
    failing = [rank for rank, (ok, _) in enumerate(details) if not ok]
    if failing:
        return {
            "name": name,
            "ok": False,
            "detail": f"rank {failing[0]}: {details[failing[0]][1]}",
            "ranks": per_rank,
        }
    return {"name": name, "ok": True, "detail": details[0][1], "dtypes": per_rank[0]["dtypes"]}


def _ended(outcomes) -> tuple[str | None, str]:
    """The stage in which a launch broke, and how (from the same rules as a probe's CRASHED,
    TIMEOUT or ERROR)."""
    failed = failure_verdict(outcomes)
    assert failed is not None
    stage = failed.evidence.get("stage")
    return stage, failed.summary


def injected(run: RunConfig) -> str | None:
    """The fault the preflight runs under: the probes' own only where it stands for a broken
    stack; a fault confined to quantized weights would not meet its ordinary tensors (the
    rank applies the same rule, ``RankContext.fault_for``)."""
    from fsdpqdiag.stack import faults

    return run.inject if run.inject and faults.get(run.inject).stack_wide else None


def run_preflight(
    run: RunConfig,
    subject: dict[str, Any],
    execute: Callable[[RankTask], list],
    first: list | None = None,
    first_s: float = 0.0,
) -> dict[str, Any]:
    """Every capability and the FSDP units on ``run``'s device, backend and world size.

    ``subject`` is ``{"linear": LinearConfig dict}`` or ``{"model": {...}}``: what the FSDP
    units are read from. ``first``: the preflight's per-rank outcomes from a launch it shared
    with the probes (``api``), if any; else it launches itself. After a launch in which ranks
    died, raised or hung inside a capability, that capability is failed with the reason and a
    fresh launch runs the rest. ``execute`` runs a task on ranks (a launch session's ``run_task``).
    """
    started = time.monotonic() - first_s
    shared = first is not None
    done: dict[str, dict] = {}
    units: dict[str, Any] | None = None if subject else {}
    bnb: dict[str, Any] | None = None
    launches = 0
    while True:
        pending = [name for name in CAPABILITIES if name not in done]
        if not pending and units is not None:
            break
        if first is not None:
            outcomes, first = first, None
        else:
            config = {"skip": list(done), "units": units is None, **subject}
            outcomes = execute(RankTask(probe=NAME, probe_config=config, run=run))
            launches += 1
        bnb = bnb or outcomes[0].evidence.get("bitsandbytes_path")
        for name in pending:
            per_rank = [(o.evidence.get("capabilities") or {}).get(name) for o in outcomes]
            if all(per_rank):
                done[name] = _merge_completed(name, per_rank)
        if units is None and all(UNITS_STAGE in o.evidence for o in outcomes):
            units = outcomes[0].evidence[UNITS_STAGE]
        if all(o.status == "ok" for o in outcomes):
            continue
        stage, how = _ended(outcomes)
        if stage in CAPABILITIES and stage not in done:
            done[stage] = {"name": stage, "ok": False, "detail": how}
        elif stage == UNITS_STAGE and units is None:
            units = {"error": how}
        else:  # the ranks did not get to a capability: nothing after can be learned here
            for name in CAPABILITIES:
                done.setdefault(name, {"name": name, "ok": False, "detail": how})
            units = units if units is not None else {"error": how}
    return {
        "world_size": run.world_size,
        "device": run.device,
        "backend": run.backend,
        "injected": injected(run),
        "capabilities": [done[name] for name in CAPABILITIES],
        "bitsandbytes_path": bnb,
        "fsdp_units": units or None,
        # Launches of its own, beside the probes' launch it shares where it ran first in it.
        "launches": launches,
        "shared_launch": shared,
        "duration_s": round(time.monotonic() - started, 3),
    }


def failed_capabilities(preflight: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [c for c in preflight.get("capabilities", []) if c["name"] in names and not c["ok"]]


def instead(run: RunConfig) -> str:
    """What to run instead when the stack fails on ordinary tensors."""
    if run.device == "cuda" and run.backend == "gloo":
        return "use --backend nccl"
    if run.device == "cuda":
        return "use --backend gloo, or check NCCL (NCCL_DEBUG=INFO) before blaming FSDP2 or bitsandbytes"
    return "run on a GPU (--device cuda --backend nccl) or on another torch build"


def unsupported_verdict(probe: str, preconditions: tuple[str, ...], preflight: dict, run: RunConfig):
    """UNSUPPORTED with what failed and what to run instead, or None where every
    precondition held."""
    from fsdpqdiag.report.model import UNSUPPORTED

    failed = failed_capabilities(preflight, preconditions)
    if not failed:
        return None
    what = "; ".join(f"{c['name']} ({c['detail']})" for c in failed)
    summary = (
        f"{', '.join(c['name'] for c in failed)} on {run.backend} with {run.device} tensors fails in "
        f"preflight on ordinary tensors: {instead(run)} [{what}]"
    )
    evidence = {
        "preconditions": list(preconditions),
        "failed_preconditions": failed,
        "attribution": {
            "component": COMPONENT,
            "report_to": None,
            "known_issues": KNOWN_ISSUES.get((run.device, run.backend), []),
            "decided_by": [
                f"preflight {c['name']} at ws={run.world_size} on {run.device}/{run.backend}: {c['detail']}"
                for c in failed
            ],
        },
        "instead": instead(run),
    }
    return Verdict(UNSUPPORTED, summary, evidence)
