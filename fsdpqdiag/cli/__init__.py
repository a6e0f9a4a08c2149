"""The command line. Each command is one module here; importing it registers it."""

import os
import sys

from fsdpqdiag.cli import fix, forensics, localize, matrix, reports, reproduce  # noqa: F401 (registers them)
from fsdpqdiag.cli.app import app


def main() -> None:
    from fsdpqdiag.launch import in_launched_job

    if not in_launched_job():
        app()
        return
    try:
        app(standalone_mode=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    else:
        code = 0
    # Under torchrun the outputs are written by now; skip interpreter teardown, where a gloo
    # worker thread still freeing the last collective's Python-owned tensors takes the GIL
    # and std::terminates, which torchrun would report as a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
