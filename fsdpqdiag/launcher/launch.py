"""The one place that owns rank processes.

``launch`` starts N ranks of one host (a free port, gloo on CPU, NCCL on GPU; how they are
started, forked from a zygote on CPU or spawned, is ``rank_start``), waits for them under a
timeout, and turns every way a rank can end into data: a result, an
exception (ERROR), a signal (CRASHED), a hang (TIMEOUT) or a kill because a peer died
first (ABORTED). Every rank runs in its own process session and is reaped on every path,
Ctrl-C included, so the caller never dies with its ranks and nothing is left behind.
How SIGTERM and SIGHUP come to end a launch as Ctrl-C does is ``stop_signals``; what a
crashed rank's log says (its tail, faulthandler's Python stack) is ``rank_log``.

When the current process already is a rank of a launched job (torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK), a session (``launcher.session``) runs the probe in-process on
that job instead; ranks then cannot be isolated from a crash, which the README says.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from fsdpqdiag import envvars
from fsdpqdiag.core.config import RankTask
from fsdpqdiag.core.outcome import RankOutcome, RankStatus
from fsdpqdiag.errors import BadInput
from fsdpqdiag.launcher import rank_start
from fsdpqdiag.launcher.rank_log import LOG_TAIL_CHARS, python_stack
from fsdpqdiag.launcher.stop_signals import interrupts_latched, raise_if_interrupted
from fsdpqdiag.rank import env

# Where in a launch's directory rank 0 writes the stack it runs on (``envvars.STACK``).
STACK_FILE = "stack.json"
# How long surviving ranks may finish after a peer died before they are killed: a peer's
# death usually leaves them blocked in a collective that will never complete.
PEER_GRACE_S = 5.0
PORT_RETRIES = 3


def exit_skipping_teardown(code: int) -> NoReturn:
    """Exit a rank (or a torchrun CLI process) once its outputs are written, without
    interpreter teardown: a gloo worker thread may still be freeing the last collective's
    Python-owned tensors then, and taking the GIL during finalization makes it
    std::terminate (SIGABRT), which would read as a crash of work that had finished."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# How long a node's local rank 0 waits for its local peers to leave before it gives the node's
# exit code anyway.
PEERS_LEAVE_S = 10.0


def leave_job(code: int) -> NoReturn:
    """Exit a rank of a torchrun job once its command is done, so that nothing the command
    wrote is lost and each node's torchrun ends as the report says.

    torchrun SIGTERMs a node's other ranks as soon as one exits non-zero, and exits 1 itself
    whichever rank it was. So every rank first meets the others (rank 0 reaches this only
    after writing its outputs) and learns every rank's code; the node's local ranks other
    than 0 then exit 0, and local rank 0, once they are gone, exits with the job's verdict:
    its own code, else the first non-zero one."""
    dist = sys.modules.get("torch.distributed")  # a command that never imported it has no group
    if dist is None or not dist.is_initialized() or dist.get_world_size() == 1:
        exit_skipping_teardown(code)
    # A node: torchrun's agent (GROUP_RANK) on a host; another launcher may set no GROUP_RANK.
    node = f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '')}"
    me = {"code": code, "pid": os.getpid(), "node": node}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        exit_skipping_teardown(0)
    verdict = code or next((rank["code"] for rank in everyone if rank["code"]), 0)
    if verdict:
        peers = [r["pid"] for r in everyone if r["node"] == me["node"] and r["pid"] != me["pid"]]
        _wait_until_gone(peers, PEERS_LEAVE_S)
    exit_skipping_teardown(verdict)


def _wait_until_gone(pids: list[int], timeout_s: float) -> None:
    """Until every pid has exited: a zombie its parent has not reaped yet counts as gone once
    its last thread has ended (its parent's wait cannot reap it before that)."""
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        if pids:
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        # The leader of a thread group shows Z as soon as it exits, while its other threads
        # (gloo's) may still be ending: until they have, the process is not reapable.
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X") or threads > 1


def in_launched_job() -> bool:
    """True when this process is a rank started by torchrun (or a compatible launcher)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


# What torchrun sets in every rank; fsdpqdiag reads the first three to know it is a rank.
JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_job_environment() -> None:
    """ValueError (one line) when the environment holds part of a torchrun job's variables,
    or ones that contradict each other. Started with RANK=5 WORLD_SIZE=2 the process would
    wait for a rendezvous that can never complete (a minute, then a 100-line traceback)."""
    present = {key: os.environ[key] for key in JOB_VARIABLES if key in os.environ}
    if not any(key in present for key in JOB_VARIABLES[:3]):
        return  # not a rank: MASTER_ADDR/PORT alone are harmless (fsdpqdiag sets its own)
    advice = f"run under torchrun, or unset {', '.join(JOB_VARIABLES[:3])} to let fsdpqdiag launch its ranks"
    missing = [key for key in JOB_VARIABLES if key not in present]
    if missing:
        shown = " ".join(f"{k}={v}" for k, v in present.items())
        raise ValueError(f"half-set torchrun environment ({shown}; no {', '.join(missing)}): {advice}")
    numbers: dict[str, int] = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            numbers[key] = int(present[key])
        except ValueError:
            raise ValueError(
                f"torchrun environment: {key}={present[key]!r} is not an integer: {advice}"
            ) from None
    if numbers["WORLD_SIZE"] < 1:
        raise ValueError(f"torchrun environment: WORLD_SIZE={numbers['WORLD_SIZE']} must be >= 1: {advice}")
    for key in ("RANK", "LOCAL_RANK"):
        if not 0 <= numbers[key] < numbers["WORLD_SIZE"]:
            raise ValueError(
                f"torchrun environment: {key}={numbers[key]} is outside 0..{numbers['WORLD_SIZE'] - 1} "
                f"(WORLD_SIZE={numbers['WORLD_SIZE']}): {advice}"
            )
    if not 0 < numbers["MASTER_PORT"] < 65536:
        raise ValueError(
            f"torchrun environment: MASTER_PORT={numbers['MASTER_PORT']} is not a port: {advice}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _child_env(rank: int, world_size: int, port: int, result_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(envvars.STACK, None)
    for key in ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    env[envvars.RESULT] = str(result_path)
    # N ranks share the host's cores; unbounded OpenMP threads per rank oversubscribe them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return env


def _outcome_for(
    rank: int,
    process,
    result_path: Path,
    forced: str | None,
    duration_s: float,
) -> RankOutcome:
    written = _read_json(result_path) or {}
    stage = written.get("stage")
    evidence = written.get("evidence", {})
    log_text = process.log_text()
    log_tail = log_text[-LOG_TAIL_CHARS:]
    code = process.returncode
    if forced is not None:
        return RankOutcome(
            rank,
            forced,
            evidence,
            stage,
            exit_code=code,
            log_tail=log_tail,
            error=written.get("error"),
            duration_s=duration_s,
            failed_at=written.get("failed_at"),
        )
    if code is not None and code < 0:
        return RankOutcome(
            rank,
            RankStatus.CRASHED,
            evidence,
            stage,
            signal=signal_name(code),
            exit_code=code,
            log_tail=log_tail,
            python_stack=python_stack(log_text),
            duration_s=duration_s,
        )
    status = written.get("status")
    if code == 0 and status == RankStatus.OK:
        return RankOutcome(rank, RankStatus.OK, evidence, stage, exit_code=0, duration_s=duration_s)
    error = written.get("error") or f"rank exited with code {code} without a result"
    return RankOutcome(
        rank,
        RankStatus.ERROR,
        evidence,
        stage,
        exit_code=code,
        error=error,
        log_tail=log_tail,
        duration_s=duration_s,
        failed_at=written.get("failed_at"),
    )


def _launch_once(
    task: RankTask,
    port: int,
    workdir: Path,
    watch: Callable[[dict], None] | None,
    zygotes: rank_start.ZygotePool,
) -> list[RankOutcome]:
    world_size = task.run.world_size
    method = rank_start.start_method(task.run.device)
    task_path = workdir / "task.json"
    task_path.write_text(json.dumps(task.to_dict()))
    results = [workdir / f"rank{rank}.json" for rank in range(world_size)]
    envs = [_child_env(rank, world_size, port, results[rank]) for rank in range(world_size)]
    envs[0][envvars.STACK] = str(workdir / STACK_FILE)
    started = time.monotonic()
    ended_at: dict[int, float] = {}
    forced: dict[int, str] = {}
    watched_mtime: int | None = None
    group = rank_start.start(method, task_path, envs, workdir, raise_if_interrupted, zygotes)
    processes = group.ranks
    try:
        first_failure_at: float | None = None
        while len(ended_at) < world_size:
            raise_if_interrupted()
            now = time.monotonic()
            for rank, process in enumerate(processes):
                if rank not in ended_at and process.poll() is not None:
                    ended_at[rank] = now - started
                    if process.returncode != 0 and first_failure_at is None:
                        first_failure_at = now
            if watch is not None:
                watched_mtime = _watch_rank0(results[0], watched_mtime, watch)
            if len(ended_at) == world_size:
                break
            # Past the task's time, or a peer's grace after the first rank failed: whatever
            # still runs is stopped, and says which of the two stopped it.
            stop = None
            if now - started > task.run.timeout_s:
                stop = RankStatus.TIMEOUT
            elif first_failure_at is not None and now - first_failure_at > PEER_GRACE_S:
                stop = RankStatus.ABORTED
            if stop is not None:
                for rank, process in enumerate(processes):
                    if rank not in ended_at:
                        process.kill_session()
                        forced[rank] = stop
                        ended_at[rank] = now - started
                break
            time.sleep(0.05)
    finally:
        # Reached normally, on timeout, and on Ctrl-C alike: no rank outlives its launch.
        group.close()
    outcomes = [
        _outcome_for(rank, processes[rank], results[rank], forced.get(rank), ended_at.get(rank, 0.0))
        for rank in range(world_size)
    ]
    for outcome in outcomes:
        if outcome.status == RankStatus.ABORTED:
            outcome.error = outcome.error or "killed: a peer rank ended first and this rank was still waiting"
        elif outcome.status == RankStatus.TIMEOUT:
            outcome.error = outcome.error or f"no result within {task.run.timeout_s:g} s"
    return outcomes


def _watch_rank0(path: Path, last_mtime: int | None, watch: Callable[[dict], None]) -> int | None:
    """Hand rank 0's checkpoint to ``watch`` whenever the rank rewrote it."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return last_mtime
    if mtime == last_mtime:
        return last_mtime
    written = _read_json(path)
    if written is not None:
        watch(written)
    return mtime


def _port_collision(outcomes: list[RankOutcome]) -> bool:
    text = " ".join((o.error or "") + o.log_tail for o in outcomes)
    return "EADDRINUSE" in text or "Address already in use" in text


@dataclass(frozen=True)
class Launched:
    """What a launch returns: one outcome per rank, and the stack its first rank captured
    (None where that rank died before capturing it)."""

    outcomes: list[RankOutcome]
    stack: dict | None


def launch(
    task: RankTask,
    watch: Callable[[dict], None] | None = None,
    zygotes: rank_start.ZygotePool | None = None,
) -> Launched:
    """Run ``task`` on ``task.run.world_size`` fresh local ranks: one outcome each, and the stack.

    ``watch``, if given, receives rank 0's checkpoint (status, stage, evidence) each time
    the rank rewrites it while the launch runs, so multi-step tasks can report steps live.
    ``zygotes``: where forked ranks' zygotes come from and go back to (a session's, shared by
    its launches); without it the launch's zygote ends with it.
    """
    own_pool = zygotes is None
    zygotes = rank_start.ZygotePool(keep=False) if own_pool else zygotes
    outcomes: list[RankOutcome] = []
    captured: dict | None = None
    try:
        with interrupts_latched():
            for _ in range(PORT_RETRIES):
                with tempfile.TemporaryDirectory(prefix="fsdpqdiag-") as workdir:
                    outcomes = _launch_once(task, free_port(), Path(workdir), watch, zygotes)
                    captured = _read_json(Path(workdir) / STACK_FILE)
                raise_if_interrupted()
                _check_the_stack(captured)
                if not _port_collision(outcomes):
                    break
    finally:
        if own_pool:
            zygotes.close()
    return Launched(outcomes, captured)


def _check_the_stack(captured: dict | None) -> None:
    """A stack that cannot run anything (bitsandbytes without its native library, torch
    without distributed support) ends the command as bad input, nothing written."""
    if captured is None:  # rank 0 died before capturing it; the report captures it in-process
        return
    problem = env.problem(captured)
    if problem is not None:
        raise BadInput(problem)
