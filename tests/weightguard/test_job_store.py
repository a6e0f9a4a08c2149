"""The agents' store of a torchrun job, in-process: a real TCPStore stands for the one torchrun's
first agent hosts, and the environment says which rank this process plays.

What rank 0 computes reaches the other ranks, an exception rank 0 raised is raised on them too,
and a process that merely inherited a rank's environment (a data loader worker, a subprocess)
does not claim that rank's record. The multi-node tests (tests/weightguard/test_multinode.py) run the same
code under two real agents.
"""

from __future__ import annotations

import os
import socket

import pytest

from fsdpqdiag import envvars
from fsdpqdiag.errors import BadInput
from fsdpqdiag.rank import job_store
from fsdpqdiag.weightguard import job


@pytest.fixture
def agent_store(monkeypatch):
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    env = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_RESTART_COUNT="0",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(job_store, "_shared_calls", {})
    yield server


def _as_rank(monkeypatch, rank: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(job_store, "_shared_calls", {})  # each rank process counts its own calls


def test_rank_0_computes_and_every_other_rank_gets_its_value(agent_store, monkeypatch):
    _as_rank(monkeypatch, 0)
    assert job_store.share_from_rank_0("t", lambda: {"cells": ["A"]}, 5) == {"cells": ["A"]}
    _as_rank(monkeypatch, 1)
    computed_here = []
    value = job_store.share_from_rank_0("t", lambda: computed_here.append(1), 5)
    assert value == {"cells": ["A"]} and computed_here == []


def test_an_error_of_rank_0_is_raised_on_every_rank(agent_store, monkeypatch):
    def refuse():
        raise BadInput("--resume sweep: no cells.jsonl there to resume from")

    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        with pytest.raises(BadInput, match="no cells.jsonl there"):
            job_store.share_from_rank_0("t", refuse, 5)


def test_without_an_agent_store_each_process_computes_its_own(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    for key, value in dict(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    assert job_store.share_from_rank_0("t", lambda: "local", 5) == "local"


def test_only_the_first_process_of_a_rank_claims_its_record(monkeypatch):
    for key, value in dict(RANK="1", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(envvars.GUARD_RANK_PROCESS, raising=False)
    assert job.claim_rank_process()
    assert job.claim_rank_process(), "claiming again in the same process"
    # a child inherits the mark with its parent's pid
    monkeypatch.setenv(envvars.GUARD_RANK_PROCESS, str(os.getpid() + 1))
    assert not job.claim_rank_process()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv(envvars.GUARD_RANK_PROCESS)
    assert not job.claim_rank_process(), "a one-rank job has nothing to gather"
