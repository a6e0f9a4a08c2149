"""`fsdpqdiag localize` as a rank task (the replay lives in fsdpqdiag.localize)."""

from __future__ import annotations

from typing import Any

from fsdpqdiag.probes.base import Needs, Probe


def _run(config: dict[str, Any], ctx):
    from fsdpqdiag import localize

    return localize.run(config, ctx)


def _verdict(outcomes):
    from fsdpqdiag import localize

    return localize.verdict(outcomes)


PROBE = Probe(
    name="localize",
    description=(
        "Replay FSDP2's unshard op by op on every bf16 NaN pattern; name the first op that alters bytes"
    ),
    run=_run,
    verdict=_verdict,
    needs=Needs(),
)
