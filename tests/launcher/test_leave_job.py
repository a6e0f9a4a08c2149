"""A rank of a torchrun job leaves only once rank 0 has written, and its node exits as the job's
verdict says, whichever rank finishes first."""

import os
import subprocess
import sys
import textwrap

from tests.support import ROOT
from tests.support.procs import stat_fields

# Rank 0 is slow to write its output and every rank ends with a finding (exit 1): without the
# meeting in ``leave_job``, rank 1 would exit first and torchrun would SIGTERM rank 0 mid-write.
_SLOW_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import torch.distributed as dist
    from fsdpqdiag.launcher.launch import leave_job

    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        time.sleep(3)
        open(sys.argv[1], "w").write("written")
    leave_job(int(sys.argv[2]))
    """
)


def _run(tmp_path, code: int) -> subprocess.CompletedProcess:
    script = tmp_path / "slow_writer.py"
    script.write_text(_SLOW_WRITER)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path / "out.txt"),
            str(code),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def test_a_finding_kills_no_rank_and_the_slow_writer_finishes(tmp_path):
    done = _run(tmp_path, 1)
    assert "SIGTERM" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 1, done.stderr[-3000:]
    assert (tmp_path / "out.txt").read_text() == "written"


def test_a_leader_that_exited_before_its_threads_is_not_yet_gone():
    """The leader of a thread group shows Z as soon as it exits, while its parent cannot reap
    it until its last thread has ended: torchrun would still see it running and SIGTERM it."""
    import time

    from fsdpqdiag.launcher.launch import _alive

    leader_exits_first = (
        "import ctypes, threading, time\n"
        "threading.Thread(target=lambda: time.sleep(3)).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", leader_exits_first])
    try:
        deadline = time.monotonic() + 30
        while stat_fields(process.pid)[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert process.poll() is None and _alive(process.pid)
    finally:
        process.wait(timeout=30)
    assert not _alive(process.pid)
