"""The command line. Each command is one module here; importing it registers it."""

from fsdpqdiag.cli import (  # noqa: F401 (registers them)
    doctor,
    fix,
    forensics,
    localize,
    matrix,
    reports,
    reproduce,
)
from fsdpqdiag.cli.app import app


def main() -> None:
    from fsdpqdiag import stacklog
    from fsdpqdiag.launch import exit_skipping_teardown, in_launched_job

    stacklog.install()

    if not in_launched_job():
        app()
        return
    # Under torchrun this process is a rank: once its outputs are written, leave as ranks do.
    try:
        app()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    else:
        code = 0
    exit_skipping_teardown(code)
