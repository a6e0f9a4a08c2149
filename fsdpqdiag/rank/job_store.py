"""The key-value store torchrun's agents keep for a job, reachable from every rank at any time.

A rank's process group is formed over this store, but the store is there before the group
forms and after it is destroyed: torchrun's agent on the first node hosts it for the job's
whole life, and waits at its exit for the other nodes' agents. So ranks can agree on something
before a process group exists (a sweep's record that only the first node's disk holds), or
after the script destroyed its own. Without an agent's store (a launcher that has rank 0 host
the store inside ``init_process_group``) there is no such store, and ``connect`` says so (None).
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
# How many values each namespace has shared in this process: every rank makes the same calls
# in the same order, so the n-th call's key names the same value on every rank.
_shared_calls: dict[str, int] = {}


def multi_rank_job() -> tuple[int, int] | None:
    """(rank, world size) where this process is a rank of a launched job of two or more ranks."""
    if not all(key in os.environ for key in RANK_VARIABLES):
        return None
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        return None
    return (rank, world_size) if world_size >= 2 else None


def connect(namespace: str, timeout_s: float):
    """A client of the agents' store, its keys under ``namespace`` and this restart attempt of
    the workers (the store outlives an attempt); None outside such a job."""
    if multi_rank_job() is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fsdpqdiag/{namespace}/attempt-{attempt}/", store)


def share_from_rank_0(namespace: str, compute, timeout_s: float):
    """``compute()`` on rank 0, its value handed to every rank; where it raises, every rank
    raises the same exception. Outside a multi-rank job under torchrun's agents, ``compute()``
    runs here. The value crosses the job's own store, pickled, as torch's object collectives
    cross its process group."""
    store = connect(namespace, timeout_s)
    if store is None:
        return compute()
    key = f"shared-{_shared_calls.setdefault(namespace, 0)}"
    _shared_calls[namespace] += 1
    if int(os.environ["RANK"]) == 0:
        try:
            value = compute()
        except Exception as exc:
            store.set(key, pickle.dumps(("raised", exc)))
            raise
        store.set(key, pickle.dumps(("value", value)))
        return value
    store.wait([key], timedelta(seconds=timeout_s))
    kind, value = pickle.loads(store.get(key))
    if kind == "raised":
        raise value
    return value
