"""What a probe is: a name, what it needs, a per-rank function and a verdict.

``run(config, ctx)`` executes on every rank and returns that rank's evidence (plain
JSON-able data); ``verdict(outcomes)`` reads every rank's outcome and decides. Neither
prints. Probe modules import torch only inside ``run`` so that the registry, and with it
``fsdpqdiag --help``, stays cheap.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.core.config import RunConfig
from fsdpqdiag.core.outcome import RankOutcome, RankStatus
from fsdpqdiag.core.presentation import DetailTable, Presentation
from fsdpqdiag.report.model import CRASHED, ERROR, TIMEOUT


@dataclass(frozen=True)
class Needs:
    packages: tuple[str, ...] = ("bitsandbytes",)
    devices: tuple[str, ...] = ("cpu", "cuda")
    min_world_size: int = 1
    # What it needs besides when its configuration names a model (``"model"``), which it then
    # loads through transformers: the preflight counts a model's FSDP units, a layer's without.
    with_model: tuple[str, ...] = ()

    def packages_for(self, config: dict[str, Any]) -> tuple[str, ...]:
        """The packages a run with ``config`` imports."""
        return self.packages + (self.with_model if config.get("model") else ())

    def unmet(self, run: RunConfig) -> str | None:
        """Why this probe cannot run here, or None."""
        for package in self.packages:
            if importlib.util.find_spec(package) is None:
                return f"needs the Python package {package!r}, which is not installed"
        if run.device not in self.devices:
            return f"runs on {', '.join(self.devices)} only, not {run.device}"
        if run.world_size < self.min_world_size:
            return f"needs world size >= {self.min_world_size}"
        return None


@dataclass
class Verdict:
    verdict: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    name: str
    description: str
    run: Callable[[dict[str, Any], Any], dict[str, Any]]
    verdict: Callable[[list[RankOutcome]], Verdict]
    needs: Needs = Needs()
    standalone: str | None = None  # the matching script in reproducers/
    # evidence of a REPRODUCED/CRASHED/INCONCLUSIVE/UNSUPPORTED verdict -> (component, the
    # controls that decided it); see fsdpqdiag.evidence.attribution. None: "undetermined".
    attribute: Callable[[dict[str, Any]], tuple[str, list[str]]] | None = None
    # Capabilities of the stack preflight (names in fsdpqdiag.analyses.preflight.CAPABILITIES) the
    # probe relies on; one that failed there makes the probe UNSUPPORTED. Every probe
    # unshards through FSDP2's all-gather.
    preconditions: tuple[str, ...] = ("all_gather_into_tensor",)
    # The preflight checks the stack with ordinary tensors: only an injected fault that stands
    # for a broken stack (Fault.stack_wide) is applied around it.
    stack_faults_only: bool = False
    # A task that runs other probes (the batch) and applies the injected fault around each.
    applies_fault: bool = False
    # Its positive controls: names in fsdpqdiag.stack.faults.FAULTS, each of which must flip its
    # verdict (tests/probes/test_probe_contract.py checks they exist; the probe's tests flip it).
    controls: tuple[str, ...] = ()

    # How its result reads: key numbers, its own table (see fsdpqdiag.core.presentation). The
    # renderers find it by the probe name a result carries, never by naming the probe.
    presentation: Presentation = Presentation()

    def key_numbers(self, evidence: dict[str, Any]) -> str:
        """The few numbers of its evidence that matter, in one line of plain text."""
        return self.presentation.key_numbers(evidence)

    def detail(self, evidence: dict[str, Any]) -> DetailTable | None:
        """Its own table of the evidence (a row per configuration it tried), or None."""
        return self.presentation.detail(evidence)


def failure_verdict(outcomes: list[RankOutcome], keep_evidence: bool = False) -> Verdict | None:
    """The verdict of a launch in which a rank did not finish, or None if all finished.

    A signal outranks a timeout, which outranks an exception: the first is the bug a
    probe hunts, the others may be its consequence on the peers. ``keep_evidence`` adds
    what rank 0 measured before the launch ended to the verdict's evidence.
    """
    failed = _failure_verdict(outcomes)
    if failed is not None and keep_evidence:
        failed.evidence.update(outcomes[0].evidence)
    return failed


def failing_rank(outcomes: list[RankOutcome]) -> RankOutcome | None:
    """The rank whose end decides a launch in which a rank did not finish, or None if all
    finished: the first that died by a signal, else the first that hung, else the one that
    raised first (later ones usually report the broken collective it left behind; ranks
    that wrote when they failed are ordered by that, the rest by when the launcher saw them
    end). A rank the launcher killed after a peer ended (aborted) only where none raised."""
    for status in (RankStatus.CRASHED, RankStatus.TIMEOUT):
        ended = [o for o in outcomes if o.status == status]
        if ended:
            return ended[0]
    errored = [o for o in outcomes if o.status in (RankStatus.ERROR, RankStatus.ABORTED)]
    if not errored:
        return None
    raised = [o for o in errored if o.status == RankStatus.ERROR] or errored
    return min(raised, key=lambda o: (o.failed_at is None, o.failed_at or 0.0, o.duration_s))


def _failure_verdict(outcomes: list[RankOutcome]) -> Verdict | None:
    first = failing_rank(outcomes)
    if first is None:
        return None
    if first.status == RankStatus.CRASHED:
        ranks = ", ".join(str(o.rank) for o in outcomes if o.status == RankStatus.CRASHED)
        return Verdict(
            CRASHED,
            f"rank(s) {ranks} died by {first.signal} during {first.stage or 'setup'}",
            {"signal": first.signal, "stage": first.stage, **_stack_of(first)},
        )
    if first.status == RankStatus.TIMEOUT:
        ranks = ", ".join(str(o.rank) for o in outcomes if o.status == RankStatus.TIMEOUT)
        return Verdict(
            TIMEOUT,
            f"rank(s) {ranks} did not finish "
            f"(last stage: {first.stage or 'setup'}); every rank was killed and reaped",
            {"stage": first.stage},
        )
    last_line = first_line(first.error) or first.status
    return Verdict(
        ERROR,
        f"rank {first.rank} failed during {first.stage or 'setup'}: {last_line}",
        {"stage": first.stage, "exception": last_line},
    )


def first_line(text: str | None) -> str | None:
    """The first line of a rank's error text (the exception), or None where it has none."""
    return text.strip().splitlines()[0] if text and text.strip() else None


def unfinished_rank(outcome: RankOutcome) -> dict[str, Any]:
    """A rank that did not finish a late stage, as evidence beside what it measured before
    (Mechanism B's death in full_tensor() next to Mechanism A's forward evidence)."""
    return {
        "status": outcome.status,
        "signal": outcome.signal,
        "rank": outcome.rank,
        "error": first_line(outcome.error),
        **_stack_of(outcome),
    }


def _stack_of(outcome: RankOutcome) -> dict[str, str]:
    """The Python stack of a rank a signal killed, as evidence; nothing where there is none
    (older outcomes, or a SIGKILL, which leaves faulthandler no chance to write)."""
    return {"python_stack": outcome.python_stack} if outcome.python_stack else {}


def ranks_agree(outcomes: list[RankOutcome], keys: Callable[[dict], Any]) -> bool:
    values = [keys(o.evidence) for o in outcomes]
    return all(v == values[0] for v in values)
