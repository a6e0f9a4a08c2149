"""A rank process: ``python -m fsdpqdiag.rank.main TASK.json``, as ``fsdpqdiag.launcher.launch`` starts it.

The rank process's composition root: the one place on the rank side that imports every task
(``fsdpqdiag.tasks`` registers them) and the rank machinery (``fsdpqdiag.rank.runtime``). Kept apart
from ``rank`` because the tasks' modules import the launcher (the preflight relaunches
itself), which imports ``rank`` for torchrun jobs: ``rank`` importing them would close a cycle.
"""

from __future__ import annotations

import faulthandler
import sys


def main() -> None:
    # First, before torch loads: a rank killed by a signal (a native SIGSEGV inside
    # full_tensor()) then writes its Python stack to stderr, which the launcher captures in
    # the rank's log and carries into the CRASHED result.
    faulthandler.enable()

    from fsdpqdiag.launcher.launch import exit_skipping_teardown
    from fsdpqdiag.rank import stacklog
    from fsdpqdiag.stack import bnb_import

    stacklog.install()
    bnb_import.defer_compile_at_import()

    from fsdpqdiag import tasks  # noqa: F401 - importing tasks registers every task
    from fsdpqdiag.rank import runtime as rank

    exit_skipping_teardown(rank.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
