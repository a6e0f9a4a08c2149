"""The command line. Each command is one module here; importing it registers it."""

from fsdpqdiag.cli import fix, forensics, localize, matrix, reports, reproduce  # noqa: F401 (registers them)
from fsdpqdiag.cli.app import app


def main() -> None:
    app()
