"""Several rank tasks in one launch, resilient to a casualty.

This is how ``reproduce`` runs its probes and ``matrix`` its cells.

Starting ranks costs more than most tasks do: on the 2-core CPU each launch spends about
6 s importing torch and bitsandbytes and forming the process group, while a probe's own
work takes 1-3 s. So the items of a batch run in one launch, one after another on the same
process group, and each item's evidence is checkpointed under its key as it finishes. A
rank that dies, hangs or raises ends the launch inside one item only: that item (the
casualty) takes the launch's outcome (CRASHED with the signal, TIMEOUT, ERROR), the items
before it keep their evidence, and the ones after it run in a fresh launch.

An item is a registered task (``fsdpqdiag.core.registry``) with its configuration under a key of
its own: a probe under its name, a matrix cell under the cell's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from fsdpqdiag.core import registry
from fsdpqdiag.core.config import RankTask, RunConfig
from fsdpqdiag.core.outcome import RankOutcome, RankStatus

# What a batch launch's RankTask names instead of a task: the items are in ``extra``.
BATCH = "batch"


@dataclass(frozen=True)
class Item:
    """One task of a batch: ``key`` names it in the checkpoints and the results."""

    key: str
    task: str
    config: dict[str, Any]


def batch_task(items: Iterable[Item], run: RunConfig) -> RankTask:
    return RankTask(probe=BATCH, probe_config={}, run=run, extra={"batch": [asdict(i) for i in items]})


def is_batch(task: RankTask) -> bool:
    return "batch" in task.extra


def task_configs(task: RankTask) -> list[tuple[str, dict[str, Any]]]:
    """(registered task, its configuration) for each task a launch of ``task`` runs: a
    batch's items, or the task itself."""
    if is_batch(task):
        return [(item["task"], item["config"]) for item in task.extra["batch"]]
    return [(task.probe, task.probe_config)]


# --- on the ranks -------------------------------------------------------------------


class _ItemContext:
    """One item's view of its rank: checkpoints land under the item's key, next to the
    evidence of the items that finished before it, in the rank's single result file."""

    def __init__(self, rank_ctx, key: str, finished: dict[str, dict]):
        self._rank_ctx = rank_ctx
        self._key = key
        self._finished = finished
        self.stage: str | None = None
        self.evidence: dict = {}

    def __getattr__(self, name: str):
        # rank, world_size, device, mesh(), task ...: the rank's own.
        return getattr(self._rank_ctx, name)

    def checkpoint(self, stage: str, evidence: dict) -> None:
        self.stage, self.evidence = stage, evidence
        running = {"probe": self._key, "stage": stage, "evidence": evidence}
        self._rank_ctx.checkpoint(f"{self._key}: {stage}", {"finished": self._finished, "running": running})


def run_on_rank(task: RankTask, ctx) -> dict[str, Any]:
    """Every item of a batch task on this rank, in order, each with the injected fault that
    applies to it."""
    finished: dict[str, dict] = {}
    for item in task.extra["batch"]:
        key = item["key"]
        started = time.monotonic()
        item_ctx = _ItemContext(ctx, key, finished)
        item_ctx.checkpoint("start", {})
        runs = registry.get_task(item["task"])
        with ctx.fault_for(runs):
            evidence = runs.run(dict(item["config"]), item_ctx)
        finished[key] = {
            "evidence": evidence,
            "stage": item_ctx.stage,
            "duration_s": round(time.monotonic() - started, 3),
        }
        ctx.checkpoint(f"{key}: done", {"finished": finished})
    return {"finished": finished}


# --- in the parent: split a launch among its items, relaunch after a casualty ---------


@dataclass
class ProbeOutcomes:
    """What one launch says about one item of its batch."""

    probe: str  # the item's key
    outcomes: list[RankOutcome]
    duration_s: float


def split(
    names: list[str],
    outcomes: list[RankOutcome],
    launch_s: float,
    lead_rank_decides: Collection[str] = (),
) -> tuple[list[ProbeOutcomes], str | None]:
    """Each item's per-rank outcomes from a batch launch, in order, up to and including the
    casualty: the first item that not every rank finished (None when all finished).

    ``lead_rank_decides``: the keys of items that are finished when rank 0 finished them (a
    matrix cell: the matrix reads only rank 0's row, and rank 0 has already recorded it).
    """
    split_up: list[ProbeOutcomes] = []
    for name in names:
        done = [_finished(o).get(name) for o in outcomes]
        if all(done) or (name in lead_rank_decides and done[0]):
            ranks = [
                RankOutcome(
                    o.rank, RankStatus.OK, d["evidence"], d["stage"], exit_code=0, duration_s=d["duration_s"]
                )
                if d
                else _casualty_outcome(name, o, d)
                for o, d in zip(outcomes, done)
            ]
            split_up.append(ProbeOutcomes(name, ranks, max(d["duration_s"] for d in done if d)))
            continue
        ranks = [_casualty_outcome(name, o, d) for o, d in zip(outcomes, done)]
        split_up.append(ProbeOutcomes(name, ranks, launch_s - sum(p.duration_s for p in split_up)))
        return split_up, name
    return split_up, None


def _finished(outcome: RankOutcome) -> dict:
    return (outcome.evidence or {}).get("finished") or {}


def _casualty_outcome(name: str, outcome: RankOutcome, done: dict | None) -> RankOutcome:
    if done:  # this rank finished the item; a peer did not
        return RankOutcome(outcome.rank, RankStatus.OK, done["evidence"], done["stage"], exit_code=0)
    running = (outcome.evidence or {}).get("running") or {}
    inside = running.get("probe") == name
    status = outcome.status
    if status == RankStatus.OK:  # cannot happen for a rank that ran the whole batch; kept honest
        status = RankStatus.ERROR
    return RankOutcome(
        outcome.rank,
        status,
        running.get("evidence", {}) if inside else {},
        running.get("stage") if inside else None,
        signal=outcome.signal,
        exit_code=outcome.exit_code,
        error=outcome.error
        or (None if status != RankStatus.ERROR else f"rank ended before finishing {name}"),
        log_tail=outcome.log_tail,
        python_stack=outcome.python_stack,
        duration_s=outcome.duration_s,
        failed_at=outcome.failed_at,
    )


Watch = Callable[[dict], None]


class ExecuteTask(Protocol):
    """Runs a ``RankTask`` and returns one outcome per rank (a launch session's ``run_task``).
    ``watch`` (or None) receives rank 0's checkpoint each time the rank rewrites it
    (``launch.launch``); an executor with no live ranks to watch ignores it."""

    def __call__(self, task: RankTask, watch: Watch | None = None) -> list[RankOutcome]: ...


def run_resilient(
    items: list[Item],
    run: RunConfig,
    execute: ExecuteTask,
    settle: Callable[[list[ProbeOutcomes]], Iterable[str]],
    new_watch: Callable[[], Watch] | None = None,
    isolate: bool = False,
    lead_rank_decides: Collection[str] = (),
    riders: Collection[str] = (),
) -> None:
    """Run ``items`` in one launch (one launch each with ``isolate``, where the keys in
    ``riders`` share the launch of the item after them: the preflight leads the first
    cell's); after a launch that ended inside an item, that item is charged with it and a
    fresh launch runs the items after it.

    ``execute(task, watch=)`` runs a ``RankTask`` and returns its outcomes (a session's
    ``run_task``). ``settle`` receives each launch's items, in order, up to the casualty; it
    returns the keys of items still to run that need not run any more. ``new_watch()`` gives
    each launch its ``watch`` hook (see ``launch.launch``).
    """
    pending = list(items)
    while pending:
        batch = pending[: 1 + (pending[0].key in riders)] if isolate else pending
        task = batch_task(batch, run)
        started = time.monotonic()
        outcomes = execute(task, watch=new_watch() if new_watch is not None else None)
        parts, _ = split([i.key for i in batch], outcomes, time.monotonic() - started, lead_rank_decides)
        dropped = set(settle(parts))
        pending = [i for i in pending[len(parts) :] if i.key not in dropped]


def watch_progress(
    on_start: Callable[[str], None] | None = None,
    on_finish: Callable[[str, dict], None] | None = None,
) -> Callable[[dict], None]:
    """A launch ``watch`` hook: ``on_start(key)`` as rank 0 enters each item, and
    ``on_finish(key, evidence)`` as it finishes one."""
    started: set[str] = set()
    finished: set[str] = set()

    def watch(written: dict) -> None:
        evidence = written.get("evidence") or {}
        if on_finish is not None:
            for key, done in (evidence.get("finished") or {}).items():
                if key not in finished:
                    finished.add(key)
                    on_finish(key, done["evidence"])
        running = (evidence.get("running") or {}).get("probe")
        if on_start is not None and running and running not in started:
            started.add(running)
            on_start(running)

    return watch
