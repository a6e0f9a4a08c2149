"""One report for a job that spans nodes: every rank's guard record, gathered over the job itself.

``fsdpqdiag watch`` runs once per node (as ``srun`` starts one command per node), and each sees
only the records its own processes leave in its local folder. So at the guard's close (the
script's ``destroy_process_group``, or the process's exit while the group still stands) every
guarded rank publishes its record in the job's own c10d store, the one its process group was
formed over, and reads every other rank's back: no shared file system is involved. Each rank
leaves the whole job's records in its local folder, so each node's ``watch`` decides the job's
verdict; the node holding the lowest rank that answered writes the report, the others say where.

A script that never forms a process group, or forms one and never calls ``fully_shard`` (so no
close was watched), still gathers at its exit over the store torchrun's agents host for the job:
without it each node, having heard from no other, would write its own "nothing checked".

The wait is bounded: a rank whose record is not in the store within the timeout (its node died,
or stopped answering) is named as lost instead of hanging the survivors.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from fsdpqdiag import envvars

DEFAULT_GATHER_TIMEOUT_S = 60.0
JOB_SCHEMA = "fsdpqdiag.guard-job/1"
_KEY = "fsdpqdiag/guard/"


def gather_timeout_s() -> float:
    try:
        return max(0.1, float(os.environ.get(envvars.GUARD_GATHER_TIMEOUT, DEFAULT_GATHER_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_GATHER_TIMEOUT_S


def claim_rank_process() -> bool:
    """True in the process torchrun started as a rank of a multi-rank job, the first Python
    process of it that arms the guard. Its children (data loader workers, compile workers, a
    ``subprocess`` of the script) inherit RANK too; the mark they inherit names another pid, so
    none of them publishes a record under its parent's rank."""
    from fsdpqdiag.rank import job_store

    if job_store.multi_rank_job() is None:
        return False
    return os.environ.setdefault(envvars.GUARD_RANK_PROCESS, str(os.getpid())) == str(os.getpid())


def _job_store(agent_store: bool):
    """(store, rank, world size) to gather over: the job's process group's, else (a rank
    process whose script formed no group, or destroyed it unwatched) the store torchrun's
    agents keep for the whole job; None where neither is there."""
    import torch.distributed as dist

    from fsdpqdiag.rank import job_store

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() < 2:
            return None
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
    store = job_store.connect("guard", gather_timeout_s()) if agent_store else None
    if store is None:
        return None
    rank, world_size = job_store.multi_rank_job()
    return store, rank, world_size


def publish_and_gather(records: list[dict], state_dir: str | Path, agent_store: bool = False) -> dict | None:
    """Put this rank's records in the job's store, read every rank's back (bounded), and leave
    the job's record in ``state_dir``; None where there is no multi-rank job to gather over.
    ``agent_store``: this is the rank's own process (``claim_rank_process``), which may gather
    over torchrun's agent store when its script formed no process group."""
    found = _job_store(agent_store)
    if found is None:
        return None
    store, rank, world_size = found
    me = {"rank": rank, "host": socket.gethostname(), "report": os.environ.get(envvars.GUARD_REPORT) or None}
    store.set(f"{_KEY}{rank}", json.dumps({"node": me, "records": records}, default=str))
    keys = [f"{_KEY}{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=gather_timeout_s()))
    except Exception:  # noqa: BLE001 - a lost rank (timeout) or a lost store: read what is there
        pass
    answers: dict[int, dict | None] = {rank: {"node": me, "records": records}}
    for other, key in enumerate(keys):
        if other == rank:
            continue
        try:
            answers[other] = json.loads(store.get(key)) if store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store's host went with its node
            answers[other] = None
    lost = [other for other in range(world_size) if answers.get(other) is None]
    job = {
        "schema": JOB_SCHEMA,
        "world_size": world_size,
        "gathered_by": rank,
        "lost_ranks": lost,
        "timeout_s": gather_timeout_s(),
        "nodes": [answers[r]["node"] for r in sorted(answers) if answers[r]],
        "records": [rec for r in sorted(answers) if answers[r] for rec in answers[r]["records"]],
    }
    from fsdpqdiag.report.model import atomic_write_text

    atomic_write_text(Path(state_dir) / f"job-{os.getpid()}.json", json.dumps(job, default=str))
    return job


def read_states(state_dir: str | Path) -> list[dict]:
    """The records this node's guarded processes left in ``state_dir``."""
    states = []
    for path in sorted(Path(state_dir).glob("guard-*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a record torn by a kill mid-rename cannot exist (atomic writes); skip junk
    return states


def read_job(state_dir: str | Path) -> dict | None:
    """The job record of the most complete gather left in ``state_dir`` by this node's ranks."""
    jobs = []
    for path in Path(state_dir).glob("job-*.json"):
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return max(jobs, key=lambda job: len(job.get("nodes", [])), default=None)


def writer(job: dict) -> dict | None:
    """The node of the lowest rank that answered: it writes the one report."""
    return min(job.get("nodes") or [], key=lambda node: node["rank"], default=None)


def combine(local: list[dict], job: dict | None) -> tuple[list[dict], dict]:
    """The records a node's ``watch`` builds the report from, and what it knows of the job:
    ``writes`` (this node holds the writer's rank), ``writer``, ``lost_ranks``."""
    if job is None:
        # No gather (the job's store went with its node, or the ranks were stopped first): the
        # ranks of the job this node never heard from are named, not silently left out.
        world_size = max((r.get("world_size", 1) for r in local), default=1)
        heard = {r.get("rank") for r in local}
        lost = [rank for rank in range(world_size) if rank not in heard] if local else []
        view = {"writes": True, "writer": None, "lost_ranks": lost, "world_size": world_size}
        return local, view | {"timeout_s": None, "ranks_answered": sorted(heard), "hosts": []}
    gathered = list(job.get("records") or [])
    seen = {(r.get("rank"), r.get("pid")) for r in gathered}
    # A record written after the gather (an attach failure) or by a rank outside it still counts.
    records = gathered + [r for r in local if (r.get("rank"), r.get("pid")) not in seen]
    lead = writer(job)
    local_ranks = {r.get("rank") for r in local} | {job.get("gathered_by")}
    return records, {
        "writes": lead is None or lead["rank"] in local_ranks,
        "writer": lead,
        "lost_ranks": list(job.get("lost_ranks") or []),
        "world_size": job.get("world_size"),
        "timeout_s": job.get("timeout_s"),
        "ranks_answered": sorted(node["rank"] for node in job.get("nodes") or []),
        "hosts": sorted({node["host"] for node in job.get("nodes") or []}),
    }


def stack_of(states: list[dict]) -> dict[str, Any]:
    """The stack rank 0's guard saw in the job; captured by the caller (watch) where no guard recorded one
    (nothing was sharded, or rank 0's record was lost)."""
    from fsdpqdiag.rank import env

    recorded = [s["stack"] for s in sorted(states, key=lambda s: s.get("rank", 0)) if s.get("stack")]
    return recorded[0] if recorded else env.capture()
