"""How a launch's ranks come to exist: forked from a zygote on CPU, spawned fresh elsewhere.

A spawned rank is ``python -m fsdpqdiag.rank.main`` of its own and imports torch and
bitsandbytes itself: on a 2-core machine about 7 s of CPU per rank, 3 s of it the
``torch.compile`` that bitsandbytes runs at import. On CPU one zygote
(``fsdpqdiag.launcher.zygote``) imports them once and forks every rank, as PyTorch's c10d tests fork
theirs; a session's zygotes (``ZygotePool``, owned by ``launcher.session``) serve its later
launches too. Not on GPUs: a CUDA context does not survive a fork, and bitsandbytes'
import initializes one, so not for CPU runs on a machine with a GPU either. Either way a
rank is a process of its own, in a session of its own, with the same environment and its
own log; ``envvars.RANK_START`` (spawn) takes the spawn path on CPU too.

The launcher sees either kind through the same handle: ``poll()``, ``returncode``,
``kill_session()`` (SIGKILL to the rank's session, then reap) and ``log_text()``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fsdpqdiag import envvars
from fsdpqdiag.errors import BadInput
from fsdpqdiag.launcher.rank_log import read_log

START_ENV = envvars.RANK_START
FORK, SPAWN = "fork", "spawn"
# How long a killed forked rank's exit status may take to come back through its zygote.
REAP_WAIT_S = 10.0


def requested_start() -> str | None:
    """What ``envvars.RANK_START`` asks for (None: the default), or BadInput."""
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
    ``envvars.RANK_START`` says otherwise."""
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


def _end_session(process: subprocess.Popen) -> None:
    """SIGKILL a child's session (it leads one) unless it ended, then reap it."""
    if process.poll() is None:
        _kill_group(process.pid)
        process.wait()


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
        _end_session(self._process)

    def log_text(self) -> str:
        return read_log(self._log_path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


class ForkedRank:
    """A rank forked by a zygote: its pid and exit status arrive as files the zygote writes."""

    def __init__(self, zygote: Zygote, entry: dict):
        """``entry``: the rank's entry in the spec the zygote serves (``zygote_spec``)."""
        self._zygote = zygote
        self._pid_path = Path(entry["pid"])
        self._exit_path = Path(entry["exit"])
        self._log_path = Path(entry["log"])
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
    """The process that imports what ranks import once and forks them (``fsdpqdiag.launcher.zygote``),
    a launch at a time, each sent as a line on its stdin."""

    def __init__(self, import_env: dict[str, str]):
        self.import_env = import_env
        self._directory = Path(tempfile.mkdtemp(prefix="fsdpqdiag-zygote-"))
        with open(self._directory / "zygote.log", "wb") as log:
            self._process = _popen(
                [sys.executable, "-m", "fsdpqdiag.launcher.zygote"], import_env, log, stdin=subprocess.PIPE
            )

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def poll(self) -> int | None:
        return self._process.poll()

    def serve(self, spec: dict) -> bool:
        """Hand the zygote a launch; False if it is gone."""
        try:
            self._process.stdin.write((json.dumps(spec) + "\n").encode())
            self._process.stdin.flush()
        except OSError:
            return False
        return True

    def kill(self) -> None:
        _end_session(self._process)

    def close(self) -> None:
        """Let it end (stdin closed: it serves no more launches), kill it if it does not."""
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=REAP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        shutil.rmtree(self._directory, ignore_errors=True)

    def log_text(self) -> str:
        return read_log(self._directory / "zygote.log")


# What a launch sets in each rank's environment: read when the rank runs (the process group's
# rendezvous, the result and stack files), never at import, so a zygote imports without them
# and serves every launch whose ranks differ from it only in these.
LAUNCH_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    envvars.RESULT,
    envvars.STACK,
)


# Variables no package of the stack reads at import, which change within one process: the
# launches of a session may differ in them, and their zygotes need not (each fork still runs
# with its launch's own value). pytest rewrites PYTEST_CURRENT_TEST for every test; torch sets
# TORCHINDUCTOR_CACHE_DIR (to where it would cache anyway) the first time anything in the
# process compiles, and reads it only when compiling.
UNREAD_AT_IMPORT = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")


def _import_env(envs: list[dict[str, str]]) -> dict[str, str]:
    """What every rank's environment holds alike, less what a launch sets in each: the
    environment their imports run in."""
    return {
        key: value
        for key, value in envs[0].items()
        if key not in LAUNCH_VARIABLES and all(env.get(key) == value for env in envs)
    }


def _key(import_env: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in import_env.items() if k not in UNREAD_AT_IMPORT))


# Each idle zygote holds torch and bitsandbytes imported (a few hundred MB): kept for so many
# import environments at most (world sizes 1 and 2 differ in OMP_NUM_THREADS).
MAX_IDLE_ZYGOTES = 3


class ZygotePool:
    """The zygotes a session's launches share (``launcher.session``): a CPU launch's zygote
    serves the next launch whose ranks import in the same environment, instead of ending with
    its launch. With ``keep=False`` each zygote ends with its launch, which then leaves no
    process of its own behind. ``close`` ends the zygotes kept."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._idle: dict[tuple, Zygote] = {}

    def take(self, import_env: dict[str, str]) -> Zygote:
        zygote = self._idle.pop(_key(import_env), None)
        if zygote is not None:
            if zygote.poll() is None:
                return zygote
            zygote.close()  # ended while it waited (killed from outside)
        return Zygote(import_env)

    def give_back(self, zygote: Zygote) -> None:
        """After a launch: keep a zygote that served it to the end (it is still running once
        every rank it forked was reported), if zygotes are kept."""
        if not self.keep or zygote.poll() is not None:
            zygote.close()
            return
        self._idle[_key(zygote.import_env)] = zygote
        while len(self._idle) > MAX_IDLE_ZYGOTES:
            self._idle.pop(next(iter(self._idle))).close()

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for zygote in idle.values():
            zygote.close()


class RankGroup:
    """A launch's ranks, in rank order, and whatever started them."""

    def __init__(self, ranks: list, zygote: Zygote | None = None, pool: ZygotePool | None = None):
        self.ranks = ranks
        self._zygote = zygote
        self._pool = pool

    def close(self) -> None:
        """Kill whatever still runs and reap it all: no rank outlives its launch."""
        for handle in self.ranks:
            handle.kill_session()  # returns once the zygote reported the rank, or ended
        if self._zygote is not None:
            self._pool.give_back(self._zygote)


def _rank_file(workdir: Path, index: int, suffix: str) -> Path:
    return workdir / f"rank{index}.{suffix}"


def start(
    method: str,
    task_path: Path,
    envs: list[dict[str, str]],
    workdir: Path,
    between_starts: Callable[[], None],
    zygotes: ZygotePool,
) -> RankGroup:
    """Start one rank per environment in ``envs``, each logging to ``workdir/rank{i}.log``;
    a forked rank's zygote comes from ``zygotes`` and goes back to it when the group closes.

    ``between_starts`` runs after each process starts (the launcher raises a pending Ctrl-C
    there); if it raises, what was started is already in the group the caller closes.
    """
    group = RankGroup([])
    try:
        if method == FORK:
            group = _fork(task_path, envs, workdir, zygotes)
            between_starts()
            return group
        for index, env in enumerate(envs):
            log_path = _rank_file(workdir, index, "log")
            with open(log_path, "wb") as log:
                process = _popen([sys.executable, "-m", "fsdpqdiag.rank.main", str(task_path)], env, log)
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
                "log": str(_rank_file(workdir, index, "log")),
                "pid": str(_rank_file(workdir, index, "pid")),
                "exit": str(_rank_file(workdir, index, "exit")),
            }
            for index, env in enumerate(envs)
        ],
    }


def _fork(task_path: Path, envs: list[dict[str, str]], workdir: Path, zygotes: ZygotePool) -> RankGroup:
    spec = zygote_spec(task_path, envs, workdir)
    zygote = zygotes.take(_import_env(envs))
    if not zygote.serve(spec):  # a kept zygote that ended meanwhile: a new one
        zygote.close()
        zygote = Zygote(zygote.import_env)
        zygote.serve(spec)
    return RankGroup([ForkedRank(zygote, entry) for entry in spec["ranks"]], zygote, zygotes)


def _popen(argv: list[str], env: dict[str, str], log, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        env=env,
        stdin=stdin,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
