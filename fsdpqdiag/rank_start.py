"""How a launch's ranks come to exist: forked from a zygote on CPU, spawned fresh elsewhere.

A spawned rank is ``python -m fsdpqdiag.rank_main`` of its own and imports torch and
bitsandbytes itself: on a 2-core machine about 7 s of CPU per rank, 3 s of it the
``torch.compile`` that bitsandbytes runs at import. On CPU one zygote
(``fsdpqdiag.zygote``) imports them once per launch and forks every rank, as PyTorch's c10d
tests fork theirs. Not on GPUs: a CUDA context does not survive a fork, and bitsandbytes'
import initializes one, so not for CPU runs on a machine with a GPU either. Either way a
rank is a process of its own, in a session of its own, with the same environment and its
own log; ``FSDPQDIAG_RANK_START=spawn`` takes the spawn path on CPU too.

The launcher sees either kind through the same handle: ``poll()``, ``returncode``,
``kill_session()`` (SIGKILL to the rank's session, then reap) and ``log_text()``.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fsdpqdiag.errors import BadInput
from fsdpqdiag.rank_log import read_log

START_ENV = "FSDPQDIAG_RANK_START"
FORK, SPAWN = "fork", "spawn"
# How long a killed forked rank's exit status may take to come back through its zygote.
REAP_WAIT_S = 10.0


def requested_start() -> str | None:
    """What ``FSDPQDIAG_RANK_START`` asks for (None: the default), or BadInput."""
    chosen = os.environ.get(START_ENV, "").strip().lower()
    if chosen not in ("", FORK, SPAWN):
        raise BadInput(f"{START_ENV}={chosen!r}: expected {FORK} or {SPAWN}")
    return chosen or None


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA or AMD GPU, asked of /dev without importing torch.

    There, bitsandbytes' import initializes CUDA even for a CPU run, so the zygote could not
    fork its ranks and would start each fresh (``zygote.fork_safe``) after importing for
    nothing: seconds more before every launch.
    """
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def start_method(device: str) -> str:
    """``fork`` on CPU, ``spawn`` on GPUs (and on CPU where a GPU is visible), unless
    ``FSDPQDIAG_RANK_START`` says otherwise."""
    chosen = requested_start()
    if chosen == FORK and device != "cpu":
        raise BadInput(f"{START_ENV}={FORK}: only CPU ranks can be forked (CUDA does not survive a fork)")
    return chosen or (FORK if device == "cpu" and not gpu_visible() else SPAWN)


def die_with_parent() -> None:
    """In a rank (or zygote): SIGKILL me when my parent dies, even by SIGKILL (Linux prctl).

    Ranks live in their own sessions so a Ctrl-C reaches only the launcher, which then
    stops them; if the launcher (or a rank's zygote) is killed outright, this keeps them
    from running on.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class SpawnedRank:
    """A rank that is a child of this process."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self._process = process
        self._log_path = log_path

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def poll(self) -> int | None:
        return self._process.poll()

    def kill_session(self) -> None:
        if self._process.poll() is None:
            _kill_group(self._process.pid)
            self._process.wait()

    def log_text(self) -> str:
        return read_log(self._log_path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


class ForkedRank:
    """A rank forked by a zygote: its pid and exit status arrive as files the zygote writes."""

    def __init__(self, zygote: Zygote, index: int):
        self._zygote = zygote
        self._pid_path = zygote.workdir / f"rank{index}.pid"
        self._exit_path = zygote.workdir / f"rank{index}.exit"
        self._log_path = zygote.workdir / f"rank{index}.log"
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            code = _read_int(self._exit_path)
            if code is None and self._zygote.poll() is not None:
                # The zygote reaps every rank it forked before it ends; gone without this
                # rank's status, it crashed or was killed first (its ranks die with it), or
                # never forked it (an import failed): the rank ends as the zygote did.
                code = _read_int(self._exit_path)
                if code is None:
                    code = self._zygote.returncode or -signal.SIGKILL
            self.returncode = code
        return self.returncode

    def kill_session(self) -> None:
        if self.poll() is not None:
            return
        pid = _read_int(self._pid_path)
        if pid is None:  # not forked yet: the zygote goes, and its ranks with it
            self._zygote.kill()
        else:
            _kill_group(pid)
        deadline = time.monotonic() + REAP_WAIT_S
        while self.poll() is None:
            if time.monotonic() > deadline:
                self._zygote.kill()
            time.sleep(0.01)

    def log_text(self) -> str:
        # A spawned rank's log starts with what its imports printed; here the zygote did them.
        return self._zygote.log_text() + read_log(self._log_path)


class Zygote:
    """The process that imports what ranks import once and forks them (``fsdpqdiag.zygote``)."""

    def __init__(self, workdir: Path, process: subprocess.Popen):
        self.workdir = workdir
        self._process = process

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def poll(self) -> int | None:
        return self._process.poll()

    def kill(self) -> None:
        if self._process.poll() is None:
            _kill_group(self._process.pid)
            self._process.wait()

    def log_text(self) -> str:
        return read_log(self.workdir / "zygote.log")


def _shared_env(envs: list[dict[str, str]]) -> dict[str, str]:
    """What every rank's environment holds alike: the environment their imports run in."""
    return {key: value for key, value in envs[0].items() if all(env.get(key) == value for env in envs)}


class RankGroup:
    """A launch's ranks, in rank order, and whatever started them."""

    def __init__(self, ranks: list, zygote: Zygote | None = None):
        self.ranks = ranks
        self._zygote = zygote

    def close(self) -> None:
        """Kill whatever still runs and reap it all: no rank outlives its launch."""
        for handle in self.ranks:
            handle.kill_session()
        if self._zygote is not None:
            deadline = time.monotonic() + REAP_WAIT_S
            while self._zygote.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            self._zygote.kill()


def start(
    method: str,
    task_path: Path,
    envs: list[dict[str, str]],
    workdir: Path,
    between_starts: Callable[[], None],
) -> RankGroup:
    """Start one rank per environment in ``envs``, each logging to ``workdir/rank{i}.log``.

    ``between_starts`` runs after each process starts (the launcher raises a pending Ctrl-C
    there); if it raises, what was started is already in the group the caller closes.
    """
    group = RankGroup([])
    try:
        if method == FORK:
            group = _fork(task_path, envs, workdir)
            between_starts()
            return group
        for index, env in enumerate(envs):
            log_path = workdir / f"rank{index}.log"
            with open(log_path, "wb") as log:
                process = _popen([sys.executable, "-m", "fsdpqdiag.rank_main", str(task_path)], env, log)
            group.ranks.append(SpawnedRank(process, log_path))
            between_starts()
    except BaseException:
        group.close()
        raise
    return group


def zygote_spec(task_path: Path, envs: list[dict[str, str]], workdir: Path) -> dict:
    """What the zygote reads: the task, and per rank its environment and its files."""
    return {
        "task": str(task_path),
        "ranks": [
            {
                "env": env,
                "log": str(workdir / f"rank{index}.log"),
                "pid": str(workdir / f"rank{index}.pid"),
                "exit": str(workdir / f"rank{index}.exit"),
            }
            for index, env in enumerate(envs)
        ],
    }


def _fork(task_path: Path, envs: list[dict[str, str]], workdir: Path) -> RankGroup:
    spec_path = workdir / "zygote.json"
    spec_path.write_text(json.dumps(zygote_spec(task_path, envs, workdir)))
    with open(workdir / "zygote.log", "wb") as log:
        process = _popen([sys.executable, "-m", "fsdpqdiag.zygote", str(spec_path)], _shared_env(envs), log)
    zygote = Zygote(workdir, process)
    return RankGroup([ForkedRank(zygote, index) for index in range(len(envs))], zygote)


def _popen(argv: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
