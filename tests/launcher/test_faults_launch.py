"""The launcher turns every way a rank can end into a result and leaves nothing behind."""

import os
import time
from pathlib import Path

import pytest

from fsdpqdiag import api
from fsdpqdiag.core.config import LinearConfig, RunConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.errors import BadInput
from fsdpqdiag.launcher import rank_start
from fsdpqdiag.launcher.launch import in_launched_job
from fsdpqdiag.launcher.rank_log import PYTHON_STACK_MAX_FRAMES, python_stack
from fsdpqdiag.probes.base import failure_verdict
from tests.support import SMALL_LINEAR, cuda_available, worker_session
from tests.support.procs import children_of, descendants_of

SMALL = {**LinearConfig(in_features=128, out_features=128).__dict__}


def _no_rank_left() -> bool:
    """Nothing of a launch outlives it: under this process, only the zygotes the worker's
    session keeps between launches, idle (no rank of theirs left)."""
    for child in children_of(os.getpid()):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue  # ended meanwhile
        if b"fsdpqdiag.launcher.zygote" not in command or children_of(child):
            return False
    return True


@pytest.mark.parametrize(
    "fault, signal_name",
    [("abort", "SIGABRT"), ("oom-kill", "SIGKILL")],
)
def test_rank_killed_by_signal_is_crashed(fault, signal_name):
    run = RunConfig(world_size=2, device="cpu", timeout_s=120, inject=fault)
    result = api.run_probe("full-tensor-crash", SMALL, run, session=worker_session())
    assert result.verdict == "CRASHED" and result.evidence["signal"] == signal_name
    if signal_name == "SIGABRT":
        # faulthandler's stack: the rank ran in its zygote's fork, or where bitsandbytes'
        # import initialized CUDA in the zygote (a machine with a GPU), in a fresh rank_main.
        forked = rank_start.start_method("cpu") == rank_start.FORK and not cuda_available()
        entry = "fsdpqdiag/launcher/zygote.py" if forked else "fsdpqdiag/rank/main.py"
        assert entry in result.evidence["python_stack"]
    assert _no_rank_left()


def test_a_spawned_rank_killed_by_signal_is_crashed_as_a_forked_one_is(monkeypatch, single_use_zygotes):
    # GPU ranks are spawned, not forked: the same ending, read from a child of the launcher.
    monkeypatch.setenv(rank_start.START_ENV, rank_start.SPAWN)
    run = RunConfig(world_size=2, device="cpu", timeout_s=120, inject="abort")
    result = api.run_probe("full-tensor-crash", SMALL, run)
    assert result.verdict == "CRASHED" and result.evidence["signal"] == "SIGABRT"
    assert {r["status"] for r in result.ranks} <= {"crashed", "aborted"}
    assert children_of(os.getpid()) == []


def test_a_zygote_that_cannot_fork_safely_starts_fresh_ranks_that_end_the_same(
    monkeypatch, single_use_zygotes
):
    # On a machine with a GPU, bitsandbytes' import initializes CUDA in the zygote of a CPU
    # run, and a fork could not ask the GPU what it is: each rank execs a fresh interpreter.
    # "fresh" takes that path here; a signal still reaches the launcher as the rank's own.
    spec = rank_start.zygote_spec
    monkeypatch.setattr(rank_start, "zygote_spec", lambda *args: {**spec(*args), "fresh": True})
    run = RunConfig(world_size=2, device="cpu", timeout_s=120, inject="abort")
    result = api.run_probe("full-tensor-crash", SMALL, run)
    assert result.verdict == "CRASHED" and result.evidence["signal"] == "SIGABRT"
    stack = result.evidence["python_stack"]
    assert "in full_tensor" in stack and "fsdpqdiag/rank/main.py" in stack and "zygote" not in stack
    assert children_of(os.getpid()) == []


@pytest.mark.parametrize(
    "chosen, device, method",
    [
        (None, "cpu", "fork"),
        (None, "cuda", "spawn"),
        ("spawn", "cpu", "spawn"),
        (" Fork ", "cpu", "fork"),
        ("spawn", "cuda", "spawn"),
    ],
)
def test_cpu_ranks_are_forked_and_gpu_ranks_spawned(monkeypatch, chosen, device, method):
    monkeypatch.setattr(rank_start, "gpu_visible", lambda: False)
    if chosen is None:
        monkeypatch.delenv(rank_start.START_ENV, raising=False)
    else:
        monkeypatch.setenv(rank_start.START_ENV, chosen)
    assert rank_start.start_method(device) == method


def test_cpu_ranks_are_spawned_where_a_gpu_is_visible(monkeypatch):
    monkeypatch.delenv(rank_start.START_ENV, raising=False)
    monkeypatch.setattr(rank_start, "gpu_visible", lambda: True)
    assert rank_start.start_method("cpu") == rank_start.SPAWN
    monkeypatch.setenv(rank_start.START_ENV, "fork")  # asked for: the zygote decides then
    assert rank_start.start_method("cpu") == rank_start.FORK


@pytest.mark.parametrize("chosen, device", [("fork", "cuda"), ("vfork", "cpu")])
def test_a_start_method_that_cannot_be_is_bad_input(monkeypatch, chosen, device):
    monkeypatch.setenv(rank_start.START_ENV, chosen)
    with pytest.raises(BadInput, match=rank_start.START_ENV):
        rank_start.start_method(device)


def test_crashed_rank_carries_the_python_stack_of_the_signal(run_cli):
    result = run_cli(
        "reproduce",
        "--ws",
        "1",
        "--probe",
        "full-tensor-crash",
        "--inject",
        "segfault",
        "--device",
        "cpu",
        *SMALL_LINEAR,
        "-q",
        json=True,
    )
    crashed = result.report["results"][0]
    assert crashed["verdict"] == "CRASHED" and crashed["evidence"]["signal"] == "SIGSEGV"
    stack = crashed["evidence"]["python_stack"]
    assert stack.startswith("Fatal Python error: Segmentation fault")
    assert " in full_tensor" in stack, stack
    assert crashed["ranks"][0]["python_stack"] == stack
    # the report still validates: the stack lives where the schema leaves room
    from fsdpqdiag.render.markdown import render
    from fsdpqdiag.report.model import Report

    markdown = render(Report.load(result.json_path))
    assert "  Fatal Python error: Segmentation fault" in markdown  # readable, not only in the JSON


def test_python_stack_keeps_the_signalled_thread_and_trims_the_rest():
    frames = [f'  File "/x/f{i}.py", line {i} in f{i}' for i in range(PYTHON_STACK_MAX_FRAMES + 5)]
    log = "\n".join(
        [
            "rank output before the crash",
            "Fatal Python error: Segmentation fault",
            "",
            "Thread 0x0000000000000002 (most recent call first):",
            '  File "/x/other.py", line 1 in watchdog',
            "",
            "Current thread 0x0000000000000001 (most recent call first):",
            '  File "/x/faults.py", line 230 in full_tensor',
            *frames,
            "",
            "Extension modules: numpy.core._multiarray_umath, torch._C (total: 2)",
        ]
    )
    stack = python_stack(log).splitlines()
    assert stack[0] == "Fatal Python error: Segmentation fault"
    assert stack[1].startswith("Current thread") and "full_tensor" in stack[2]
    assert not any("watchdog" in line or "Extension modules" in line for line in stack)
    assert len(stack) == 2 + PYTHON_STACK_MAX_FRAMES + 1 and "6 outer frames" in stack[-1]
    assert python_stack("no crash here\n") is None


def test_python_stack_of_a_signal_in_a_native_thread_is_the_main_threads():
    # gloo's worker thread segfaults on CUDA tensors: faulthandler marks no current thread.
    log = "\n".join(
        [
            "Fatal Python error: Segmentation fault",
            "",
            "Thread 0x0000000000000003 (most recent call first):",
            '  File "/x/threading.py", line 1 in wait',
            "",
            "Thread 0x0000000000000001 [python3] (most recent call first):",
            '  File "/x/_fsdp_collectives.py", line 9 in foreach_reduce',
            '  File "/x/verify.py", line 5 in train',
            "",
            "Extension modules: torch._C (total: 1)",
        ]
    )
    stack = python_stack(log).splitlines()
    assert stack[0] == "Fatal Python error: Segmentation fault"
    assert "without Python frames" in stack[1] and stack[2].startswith("Thread 0x0000000000000001")
    assert "foreach_reduce" in stack[3] and not any("wait" in line for line in stack)


def test_hung_rank_times_out_and_every_rank_is_reaped():
    run = RunConfig(world_size=2, device="cpu", timeout_s=20, inject="hang")
    started = time.monotonic()
    result = api.run_probe("full-tensor-crash", SMALL, run, session=worker_session())
    assert result.verdict == "TIMEOUT"
    assert time.monotonic() - started < 60
    assert {r["status"] for r in result.ranks} == {"timeout"}
    assert result.evidence["stage"] == "full_tensor()"
    assert _no_rank_left()


def test_exception_on_one_rank_only_is_an_error():
    run = RunConfig(world_size=2, device="cpu", timeout_s=120, inject="raise")
    result = api.run_probe("full-tensor-crash", SMALL, run, session=worker_session())
    assert result.verdict == "ERROR"
    statuses = {r["rank"]: r["status"] for r in result.ranks}
    assert statuses[1] == "error" and statuses[0] in ("aborted", "error")
    assert "injected fault" in result.summary
    assert _no_rank_left()


def test_the_rank_that_raised_first_is_the_cause_even_when_both_ended_in_one_poll():
    # The faulty rank 1 and rank 0, whose all-gather it broke, can end within one 50 ms poll
    # of the launcher: their end times tie, and rank 0's "Connection closed by peer" must not
    # be named the cause. When each raised decides.
    outcomes = [
        RankOutcome(
            0, "error", error="RuntimeError: Connection closed by peer", duration_s=2.0, failed_at=101.5
        ),
        RankOutcome(1, "error", error="RuntimeError: injected fault", duration_s=2.0, failed_at=101.2),
    ]
    verdict = failure_verdict(outcomes)
    assert verdict.verdict == "ERROR" and verdict.summary.startswith("rank 1 failed")
    assert "injected fault" in verdict.summary
    # without the times, the launcher's end times still order them
    untimed = [
        RankOutcome(0, "error", error="b", duration_s=2.5),
        RankOutcome(1, "error", error="a", duration_s=2.0),
    ]
    assert failure_verdict(untimed).summary.startswith("rank 1 failed")


def test_torchrun_environment_is_detected(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not in_launched_job()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert in_launched_job()


def test_reproduce_runs_under_torchrun(tmp_path):
    import subprocess
    import sys

    from tests.support import ROOT

    out = tmp_path / "r.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "fsdpqdiag",
            "reproduce",
            "--probe",
            "nan-canonicalization",
            "--device",
            "cpu",
            "--in-features",
            "128",
            "--out-features",
            "128",
            "--inject",
            "nan-canonicalize",
            "--json",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    import json

    report = json.loads(out.read_text())
    result = report["results"][0]
    assert result["world_size"] == 2 and len(result["ranks"]) == 2, done.stderr[-2000:]
    assert result["verdict"] == "REPRODUCED"


@pytest.mark.parametrize("method", [rank_start.FORK, rank_start.SPAWN])
def test_ctrl_c_stops_every_rank_and_writes_nothing(tmp_path, method):
    import signal
    import subprocess
    import sys

    from tests.support import ROOT

    out = tmp_path / "r.json"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fsdpqdiag",
            "reproduce",
            "--ws",
            "2",
            "--device",
            "cpu",
            "--inject",
            "hang",
            "--probe",
            "full-tensor-crash",
            "--json",
            str(out),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT), **{rank_start.START_ENV: method}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Forked ranks are the children of the zygote that forked them, itself the CLI's child.
    started = 3 if method == rank_start.FORK else 2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(descendants_of(cli.pid)) < started:
        time.sleep(0.2)
    ranks = descendants_of(cli.pid)
    assert len(ranks) == started
    time.sleep(1.0)
    cli.send_signal(signal.SIGINT)
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_two_runs_at_once_do_not_collide(tmp_path):
    import json
    import subprocess
    import sys

    from tests.support import ROOT

    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fsdpqdiag",
                "reproduce",
                "--ws",
                "2",
                "--device",
                "cpu",
                "--probe",
                "full-tensor-crash",
                "--in-features",
                "128",
                "--out-features",
                "128",
                "--json",
                str(tmp_path / f"r{i}.json"),
                "-q",
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode in (0, 1), stderr
    for i in range(2):
        result = json.loads((tmp_path / f"r{i}.json").read_text())["results"][0]
        assert {r["status"] for r in result["ranks"]} == {"ok"}


def test_ctrl_c_swallowed_by_an_at_fork_callback_is_raised_again():
    # Python drops a KeyboardInterrupt raised inside an at-fork callback of subprocess.Popen
    # ("Exception ignored in: <function _releaseLock>"): here the drop is done by hand, the
    # signal is real. The launcher must still stop at its next step.
    import signal

    from fsdpqdiag.launcher import stop_signals

    with pytest.raises(KeyboardInterrupt):
        with stop_signals.interrupts_latched():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)
            except KeyboardInterrupt:
                pass  # swallowed, as the at-fork hook does
            stop_signals.raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stop_signals.raise_if_interrupted()  # the latch is cleared once the interrupt got out
