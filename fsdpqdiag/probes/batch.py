"""Several probes in one launch, as ``reproduce`` runs them.

Starting ranks costs more than most probes do: on the 2-core CPU each launch spends about
6 s importing torch and bitsandbytes and forming the process group, while a probe's own
work takes 1-3 s. So every selected probe runs in one launch, one after another on the same
process group, and each probe's evidence is checkpointed under its name as it finishes. A
rank that dies, hangs or raises ends the launch inside one probe only: that probe takes the
launch's outcome (CRASHED with the signal, TIMEOUT, ERROR), the probes before it keep their
evidence, and the ones after it run in a fresh launch, as the matrix sweep does with cells.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsdpqdiag.launch import RankOutcome
from fsdpqdiag.probes.base import Needs, Probe, Verdict

NAME = "probe-batch"


class _ProbeContext:
    """One probe's view of its rank: checkpoints land under the probe's name, next to the
    evidence of the probes that finished before it, in the rank's single result file."""

    def __init__(self, rank_ctx, probe: str, finished: dict[str, dict]):
        self._rank_ctx = rank_ctx
        self._probe = probe
        self._finished = finished
        self.stage: str | None = None
        self.evidence: dict = {}

    def __getattr__(self, name: str):
        # rank, world_size, device, mesh(), task ...: the rank's own.
        return getattr(self._rank_ctx, name)

    def checkpoint(self, stage: str, evidence: dict) -> None:
        self.stage, self.evidence = stage, evidence
        running = {"probe": self._probe, "stage": stage, "evidence": evidence}
        self._rank_ctx.checkpoint(f"{self._probe}: {stage}", {"finished": self._finished, "running": running})


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.probes import get_probe

    finished: dict[str, dict] = {}
    # A probe's own configuration where the batch gives one (the preflight's subject).
    configs = config.get("configs") or {}
    for name in config["probes"]:
        started = time.monotonic()
        probe_ctx = _ProbeContext(ctx, name, finished)
        probe_ctx.checkpoint("start", {})
        probe = get_probe(name)
        with ctx.fault_for(probe):
            evidence = probe.run(dict(configs.get(name, config["probe_config"])), probe_ctx)
        finished[name] = {
            "evidence": evidence,
            "stage": probe_ctx.stage,
            "duration_s": round(time.monotonic() - started, 3),
        }
        ctx.checkpoint(f"{name}: done", {"finished": finished})
    return {"finished": finished}


def _unused_verdict(outcomes: list[RankOutcome]) -> Verdict:
    raise NotImplementedError("a batch has no verdict of its own: split() hands each probe its outcomes")


PROBE = Probe(
    name=NAME,
    description="several reproduce probes in one launch (internal)",
    run=run,
    verdict=_unused_verdict,
    needs=Needs(packages=()),
    applies_fault=True,
)


@dataclass
class ProbeOutcomes:
    """What one launch says about one probe of its batch."""

    probe: str
    outcomes: list[RankOutcome]
    duration_s: float


def split(
    names: list[str], outcomes: list[RankOutcome], launch_s: float
) -> tuple[list[ProbeOutcomes], str | None]:
    """Each probe's per-rank outcomes from a batch launch, in order, up to and including the
    casualty: the first probe that not every rank finished (None when all finished)."""
    split_up: list[ProbeOutcomes] = []
    for name in names:
        done = [_finished(o).get(name) for o in outcomes]
        if all(done):
            ranks = [
                RankOutcome(o.rank, "ok", d["evidence"], d["stage"], exit_code=0, duration_s=d["duration_s"])
                for o, d in zip(outcomes, done)
            ]
            split_up.append(ProbeOutcomes(name, ranks, max(d["duration_s"] for d in done)))
            continue
        ranks = [_casualty_outcome(name, o, d) for o, d in zip(outcomes, done)]
        split_up.append(ProbeOutcomes(name, ranks, launch_s - sum(p.duration_s for p in split_up)))
        return split_up, name
    return split_up, None


def _finished(outcome: RankOutcome) -> dict:
    return (outcome.evidence or {}).get("finished") or {}


def _casualty_outcome(name: str, outcome: RankOutcome, done: dict | None) -> RankOutcome:
    if done:  # this rank finished the probe; a peer did not
        return RankOutcome(outcome.rank, "ok", done["evidence"], done["stage"], exit_code=0)
    running = (outcome.evidence or {}).get("running") or {}
    inside = running.get("probe") == name
    status = outcome.status
    if status == "ok":  # cannot happen for a rank that ran the whole batch; kept honest
        status = "error"
    return RankOutcome(
        outcome.rank,
        status,
        running.get("evidence", {}) if inside else {},
        running.get("stage") if inside else None,
        signal=outcome.signal,
        exit_code=outcome.exit_code,
        error=outcome.error or (None if status != "error" else f"rank ended before finishing {name}"),
        log_tail=outcome.log_tail,
        python_stack=outcome.python_stack,
        duration_s=outcome.duration_s,
        failed_at=outcome.failed_at,
    )


def watch_progress(on_start: Callable[[str], None]) -> Callable[[dict], None]:
    """A launch ``watch`` hook that calls ``on_start(probe)`` as rank 0 enters each probe."""
    seen: set[str] = set()

    def watch(written: dict) -> None:
        running = ((written.get("evidence") or {}).get("running") or {}).get("probe")
        if running and running not in seen:
            seen.add(running)
            on_start(running)

    return watch
