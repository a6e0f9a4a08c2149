"""SIGTERM (timeout, Slurm, Kubernetes) and SIGHUP end a run the way Ctrl-C does: every
rank stopped and reaped, the launcher's temporary directory removed, no output written,
exit 128 + the signal's number."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsdpqdiag.launcher import stop_signals
from fsdpqdiag.report.model import EXIT_HUNG_UP, EXIT_INTERRUPTED, EXIT_TERMINATED
from tests.support import ROOT
from tests.support.procs import children_of


def test_exit_codes_are_128_plus_the_signal():
    assert (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_HUNG_UP) == (
        128 + signal.SIGINT,
        128 + signal.SIGTERM,
        128 + signal.SIGHUP,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_swallowed_by_an_at_fork_callback_is_raised_again(signum):
    # As for Ctrl-C (test_faults_launch): the latch keeps a stop that an at-fork callback drops.
    previous = signal.getsignal(signum)
    with pytest.raises(stop_signals.Stopped) as stopped:
        with stop_signals.interrupts_latched():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(1.0)
            except KeyboardInterrupt:
                pass
            stop_signals.raise_if_interrupted()
    assert stopped.value.signum == signum and stop_signals.stop_signal_of(stopped.value) == signum
    assert signal.getsignal(signum) is previous
    stop_signals.raise_if_interrupted()  # cleared once it got out


def test_an_ignored_hangup_stays_ignored():
    # nohup: SIGHUP is ignored on purpose; neither the CLI nor the launcher may undo that.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop_signals.install_stop_handlers()
        with stop_signals.interrupts_latched():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stop_signal_ends_like_ctrl_c(tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    launcher_tmp = tmp_path / "tmp"
    launcher_tmp.mkdir()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsdpqdiag",
            "reproduce",
            "--ws",
            "1",
            "--device",
            "cpu",
            "--inject",
            "hang",
            "--probe",
            "full-tensor-crash",
            "--in-features",
            "128",
            "--out-features",
            "128",
            "--json",
            str(out / "r.json"),
            "--markdown",
            str(out / "r.md"),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(launcher_tmp)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not children_of(cli.pid):
        time.sleep(0.2)
    ranks = children_of(cli.pid)
    assert ranks, "no rank started"
    # (torch's own torchinductor_* cache may appear there too; only the launch's is ours)
    assert list(launcher_tmp.glob("fsdpqdiag-*")), "the launch directory exists while the rank runs"
    time.sleep(1.0)
    cli.send_signal(signum)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 128 + signum, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == [] and list(launcher_tmp.glob("fsdpqdiag-*")) == []
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_stop_outside_a_launch_keeps_its_own_exit_code(tmp_path):
    # SIGTERM while no rank runs (here: while `env` captures the stack) reaches typer as a
    # KeyboardInterrupt, which typer ends with 130; the CLI gives 143, and writes nothing.
    script = (
        "import os, signal, sys, time\n"
        "from fsdpqdiag.rank import env\n"
        "def capture():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "env.capture = capture\n"
        "sys.argv = ['fsdpqdiag', 'env', '--json', '-']\n"
        "from fsdpqdiag.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == EXIT_TERMINATED, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert list(tmp_path.iterdir()) == []
