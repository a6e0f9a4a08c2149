"""``Session``: several commands of the library sharing what their launches share.

    with fsdpqdiag.api.Session() as session:
        first = session.reproduce(world_sizes=[1], device="cpu")
        second = session.fix(world_sizes=[1], device="cpu")

The second command's CPU ranks fork from the zygote the first one started (torch and
bitsandbytes imported once, not per command); every process of the session ends when it
closes. ``fsdpqdiag.api.reproduce(...)`` and the other plain functions run in a short
session of their own, and the CLI opens one per command: all three start ranks alike.
"""

from __future__ import annotations

from fsdpqdiag.api import commands, running, sweep
from fsdpqdiag.launcher.session import LaunchSession


class Session(LaunchSession):
    """Each method is the api function of the same name, run in this session."""

    def reproduce(self, *args, **kwargs):
        return commands.reproduce(*args, session=self, **kwargs)

    def localize(self, *args, **kwargs):
        return commands.localize(*args, session=self, **kwargs)

    def fix(self, *args, **kwargs):
        return commands.fix(*args, session=self, **kwargs)

    def forensics(self, *args, **kwargs):
        return commands.forensics(*args, session=self, **kwargs)

    def matrix(self, *args, **kwargs):
        return sweep.matrix(*args, session=self, **kwargs)

    def doctor(self, *args, **kwargs):
        return commands.doctor(*args, session=self, **kwargs)

    def run_probe(self, *args, **kwargs):
        return running.run_probe(*args, session=self, **kwargs)

    def run_probes(self, *args, **kwargs):
        return running.run_probes(*args, session=self, **kwargs)

    def preflight(self, *args, **kwargs):
        return running.preflight(*args, session=self, **kwargs)
