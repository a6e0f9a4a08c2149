"""A zygote: the warm process CPU ranks fork from (``python -m fsdpqdiag.launcher.zygote``).

``fsdpqdiag.launcher.rank_start`` starts it for ranks on CPU. Each line on its stdin is a
launch's spec (the task, and per rank its environment and its files); it serves them one
after another until stdin closes.

It imports once what every rank imports (torch, torch.distributed, the rank machinery and
its tasks, and the packages each launch's tasks declare they need: bitsandbytes, transformers,
peft, imported before that launch's ranks fork), then forks the ranks, as PyTorch's own c10d
tests fork theirs after importing torch. Each fork becomes what ``python -m fsdpqdiag.rank.main`` would have
been: a session of its own, the environment a spawned rank gets (the zygote's own is the
part every rank shares, less the variables a launch sets for each rank, which are read when
a rank runs, not at import: what torch and bitsandbytes read at import is the same), its
stdout and stderr in its own log, faulthandler on, killed when the zygote dies. The zygote
writes each rank's pid when it forks it and its exit status (negative: the signal, as
``subprocess`` reports it) when it reaps it; the launcher reads both.

It runs no task itself and touches no tensor, so every rank of every launch it serves starts
from the state right after the imports; the launcher gives it only launches whose ranks
import in the environment it imported in (``rank_start``). Where its imports have
initialized CUDA (bitsandbytes' import does on a machine with a GPU, even for a CPU run),
a fork could not use the GPU, so each rank execs a fresh ``python -m fsdpqdiag.rank.main``
instead, as a spawned one; a spec with ``"fresh": true`` asks for that too (the tests' way to
take this path on a machine without a GPU).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

# What a rank's first use of a package imports beyond the package itself. ``import
# transformers`` is a lazy shell: loading any model imports its modeling base, the auto
# classes and the quantizers (bitsandbytes', and torchao's where torchao is installed),
# seconds in each rank that the zygote spends once.
WARM_MODULES = {
    "transformers": (
        "transformers.modeling_utils",
        "transformers.models.auto.modeling_auto",
        "transformers.quantizers.auto",
    ),
}


def preload_modules(task) -> list[str]:
    """What the zygote imports before a launch of ``task`` (a ``RankTask``) forks: bitsandbytes
    (the first rank imports it to capture the stack in any case), the packages the launch's
    tasks need for their configurations (``Probe.needs``) and what a rank's first use of each
    imports (``WARM_MODULES``)."""
    from fsdpqdiag import tasks  # noqa: F401 - importing tasks registers every task
    from fsdpqdiag.core import registry
    from fsdpqdiag.launcher import batch

    packages: dict[str, None] = {"bitsandbytes": None}
    for name, config in batch.task_configs(task):
        try:
            packages.update(dict.fromkeys(registry.get_task(name).needs.packages_for(config)))
        except ValueError:  # an unknown task: its rank says so
            pass
    return [module for package in packages for module in (package, *WARM_MODULES.get(package, ()))]


def _preload(task_path: str) -> None:
    """torch, torch.distributed and ``preload_modules``; what an earlier launch imported stays."""
    import importlib

    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    from fsdpqdiag.core.config import RankTask

    for module in preload_modules(RankTask.from_dict(json.loads(Path(task_path).read_text()))):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - each rank imports it again and meets the same error
            pass
    # Each rank's first bitsandbytes op imports TorchDynamo (torch.library's dispatch disables
    # it around the kernel): imported here once, every fork shares it.
    import torch._dynamo  # noqa: F401


def fork_safe() -> bool:
    """Whether a fork of this process can still use the GPU: not once CUDA (or XPU) is
    initialized, which bitsandbytes' import does on a machine with a GPU, even for a CPU run.
    A rank of a CPU run there still asks the GPU what it is, for the report."""
    import torch

    if torch.cuda.is_initialized():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and hasattr(xpu, "is_initialized") and xpu.is_initialized())


def _become_rank(entry: dict, task_path: str, zygote_pid: int, fresh: bool) -> None:
    """In the forked child: turn into the rank ``entry`` describes and run it, in this
    process or, ``fresh``, as a new ``python -m fsdpqdiag.rank.main``; then exit."""
    from fsdpqdiag.launcher.launch import exit_skipping_teardown
    from fsdpqdiag.launcher.rank_start import die_with_parent

    code = 1
    try:
        os.setsid()
        die_with_parent()
        if os.getppid() != zygote_pid:  # the zygote died before the line above took effect
            os._exit(code)
        log = os.open(entry["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if fresh:
            argv = [sys.executable, "-m", "fsdpqdiag.rank.main", task_path]
            os.execve(sys.executable, argv, entry["env"])
        os.environ.clear()
        os.environ.update(entry["env"])
        sys.argv = [sys.argv[0], task_path]

        from fsdpqdiag.rank import runtime as rank

        code = rank.main([task_path])
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends a spawned rank
        import traceback

        traceback.print_exc()
    finally:
        exit_skipping_teardown(code)


def _next_spec() -> dict | None:
    """The next launch's spec, one JSON line on stdin; None once the launcher closed it."""
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


def _serve(spec: dict, fresh: bool) -> None:
    """Fork the launch's ranks, write each one's pid, reap them all, write each one's status."""
    from fsdpqdiag.report.model import atomic_write_text

    zygote_pid = os.getpid()
    children: dict[int, dict] = {}
    for entry in spec["ranks"]:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _become_rank(entry, spec["task"], zygote_pid, fresh or bool(spec.get("fresh")))
        children[pid] = entry
        atomic_write_text(Path(entry["pid"]), str(pid))
    while children:
        pid, status = os.waitpid(-1, 0)
        entry = children.pop(pid, None)
        if entry is not None:
            atomic_write_text(Path(entry["exit"]), str(os.waitstatus_to_exitcode(status)))


def main() -> None:
    faulthandler.enable()  # first, as in a spawned rank: a crash while importing has a stack

    from fsdpqdiag.rank import stacklog
    from fsdpqdiag.stack import bnb_import

    stacklog.install()  # before bitsandbytes logs at import; the ranks inherit what it kept
    bnb_import.defer_compile_at_import()
    spec = _next_spec()
    while spec is not None:
        # What this launch's tasks need, before its ranks fork: a later launch that needs more
        # (transformers after a plain layer's probes) imports it here once, not in every rank.
        _preload(spec["task"])
        _serve(spec, not fork_safe())
        spec = _next_spec()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown of torch: nothing is left to write


if __name__ == "__main__":
    main()
