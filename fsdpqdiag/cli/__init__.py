"""The command line. Each command is one module here; importing it registers it."""

from fsdpqdiag.cli import (  # noqa: F401 (registers them)
    doctor,
    fix,
    forensics,
    localize,
    matrix,
    reports,
    reproduce,
    watch,
)
from fsdpqdiag.cli.app import app


def main() -> None:
    from fsdpqdiag.cli import streams
    from fsdpqdiag.launcher.launch import in_launched_job, leave_job
    from fsdpqdiag.launcher.stop_signals import install_stop_handlers, stop_received
    from fsdpqdiag.rank import stacklog
    from fsdpqdiag.report.model import EXIT_INTERRUPTED
    from fsdpqdiag.stack import bnb_import

    if in_launched_job():
        import faulthandler

        # Under torchrun this process is a rank that no launcher of ours watches: a native
        # crash is then seen only in torchrun's log, which this makes carry the Python stack.
        faulthandler.enable()
    stacklog.install()
    bnb_import.defer_compile_at_import()  # the tool's own process: never a user's script

    if not in_launched_job():
        streams.install()
        install_stop_handlers()
        try:
            streams.run_guarded(app)
        except SystemExit as done:
            # A stop outside a launch (while writing the report, say) reaches typer as a
            # KeyboardInterrupt, which it ends with 130: give the signal's own code.
            signum = stop_received()
            if signum is not None and done.code == EXIT_INTERRUPTED:
                raise SystemExit(128 + signum) from None
            raise
        return
    # Under torchrun this process is a rank: leave once rank 0's outputs are written.
    try:
        app()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    else:
        code = 0
    leave_job(code)
