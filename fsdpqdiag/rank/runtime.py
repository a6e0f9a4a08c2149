"""What runs inside one rank: process group, injected fault, probe, result file.

Started by ``fsdpqdiag.launcher.launch`` as ``python -m fsdpqdiag.rank.main TASK.json``, or entered
in-process through ``run_in_job`` under torchrun. The task is looked up by name in
``fsdpqdiag.core.registry``, which the process's entry point has filled (this module imports no
task: the tasks' modules sit above it). A probe reports progress with
``ctx.checkpoint(stage, evidence)``: the file is rewritten atomically at each stage, so if
the rank dies by a signal in a later stage the parent still holds everything measured
before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

from fsdpqdiag import envvars
from fsdpqdiag.core import registry
from fsdpqdiag.core.config import RankTask
from fsdpqdiag.core.outcome import RankOutcome, RankStatus
from fsdpqdiag.launcher import batch
from fsdpqdiag.report.model import atomic_write_text


class RankContext:
    """Where a probe runs: its rank, world, device, and its result channel."""

    def __init__(self, task: RankTask, result_path: Path | None):
        import torch

        self.task = task
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device_type = task.run.device
        self.device = (
            # Round-robin: with gloo, more ranks than GPUs may share them.
            torch.device("cuda", self.local_rank % torch.cuda.device_count())
            if self.device_type == "cuda"
            else torch.device("cpu")
        )
        self.result_path = result_path
        self.stage: str | None = None
        self.evidence: dict = {}
        self.started = time.monotonic()

    def checkpoint(self, stage: str, evidence: dict) -> None:
        """Record the evidence so far and the stage about to run."""
        self.stage = stage
        self.evidence = evidence
        self._write({"status": RankStatus.RUNNING, "stage": stage, "evidence": evidence})

    def finish(self, status: RankStatus, evidence: dict, error: str | None = None) -> None:
        self.evidence = evidence
        failed_at = time.time() if error is not None else None
        self._write(
            {
                "status": status,
                "stage": self.stage,
                "evidence": evidence,
                "error": error,
                "failed_at": failed_at,
            }
        )

    def _write(self, payload: dict) -> None:
        if self.result_path is not None:
            atomic_write_text(self.result_path, json.dumps(payload))

    def fault_for(self, probe):
        """The injected fault, as a context to run ``probe`` in (a null one where none applies)."""
        from fsdpqdiag.stack import faults

        if not self.task.run.inject:
            return contextlib.nullcontext()
        fault = faults.get(self.task.run.inject)
        if probe.stack_faults_only and not fault.stack_wide:
            return contextlib.nullcontext()
        return fault.active(self.rank, self.world_size)

    def mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device_type, (self.world_size,))


def _init_process_group(ctx: RankContext) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs = {"backend": ctx.task.run.backend, "timeout": timedelta(seconds=ctx.task.run.timeout_s)}
    if ctx.device_type == "cuda":
        torch.cuda.set_device(ctx.device)
        if ctx.task.run.backend == "nccl":
            kwargs["device_id"] = ctx.device
    dist.init_process_group(**kwargs)


def execute(task: RankTask, ctx: RankContext) -> dict:
    """Run the task's probe on this rank with its fault (if any) active."""
    if batch.is_batch(task):
        return batch.run_on_rank(task, ctx)  # each item in the fault that applies to it
    probe = registry.get_task(task.probe)
    with ctx.fault_for(probe):
        return probe.run(task.probe_config, ctx)


def capture_stack() -> None:
    """Where the launcher asks for it (the first rank), the stack this rank runs on, for the
    report and for the launcher's check that it can run at all: captured here, where torch
    and bitsandbytes are imported anyway, and before the process group, which a torch without
    distributed support could not form."""
    from fsdpqdiag.rank import env

    path = os.environ.get(envvars.STACK)
    if path:
        atomic_write_text(Path(path), json.dumps(env.capture()))


def main(argv: list[str]) -> int:
    task = RankTask.from_dict(json.loads(Path(argv[0]).read_text()))
    ctx = RankContext(task, Path(os.environ[envvars.RESULT]))
    capture_stack()
    try:
        _init_process_group(ctx)
        evidence = execute(task, ctx)
    except BaseException as exc:  # noqa: BLE001 - every failure of the stack is a result
        ctx.finish(RankStatus.ERROR, ctx.evidence, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return 1
    ctx.finish(RankStatus.OK, evidence)
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return 0


def run_in_job(task: RankTask) -> list[RankOutcome]:
    """Run on the current torchrun job; every rank returns every rank's outcome."""
    import torch.distributed as dist

    ctx = RankContext(task, None)
    _init_process_group(ctx)
    started = time.monotonic()
    try:
        outcome = RankOutcome(ctx.rank, RankStatus.OK, execute(task, ctx), ctx.stage)
    except Exception as exc:  # noqa: BLE001
        outcome = RankOutcome(
            ctx.rank,
            RankStatus.ERROR,
            ctx.evidence,
            ctx.stage,
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
            failed_at=time.time(),
        )
    outcome.duration_s = time.monotonic() - started
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, outcome.to_dict())
    return [RankOutcome.from_dict(item) for item in gathered]
