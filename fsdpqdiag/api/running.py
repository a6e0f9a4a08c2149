"""Running probes and deciding their verdicts: one launch per world size led by the stack
preflight, a fresh launch after a probe that kills it, and each verdict's attribution."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fsdpqdiag.core.config import RankTask, RunConfig
from fsdpqdiag.evidence import attribution
from fsdpqdiag.launcher.session import LaunchSession, in_session
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED, SKIPPED, UNSUPPORTED, ProbeResult


@in_session
def run_probe(name: str, probe_config: dict, run: RunConfig, *, session: LaunchSession) -> ProbeResult:
    """Launch one probe on ``run.world_size`` ranks and decide its verdict."""
    from fsdpqdiag.tasks import get_probe

    unmet = get_probe(name).needs.unmet(run)
    if unmet is not None:
        return _skipped(name, probe_config, run, unmet)
    started = time.monotonic()
    outcomes = session.run_task(RankTask(probe=name, probe_config=probe_config, run=run))
    return _decide(name, probe_config, run, outcomes, time.monotonic() - started)


@in_session
def run_probes(
    names: Sequence[str],
    probe_config: dict,
    run: RunConfig,
    on_start: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> list[ProbeResult]:
    """Several probes in as few launches as their failures allow (see ``fsdpqdiag.launcher.batch``):
    one launch for all, and after a rank dies, hangs or raises inside a probe, a fresh
    launch from the probe after it."""
    return run_checked(names, probe_config, run, None, on_start, session=session)[0]


@in_session
def run_checked(
    names: Sequence[str],
    probe_config: dict,
    run: RunConfig,
    subject: dict | None,
    on_start: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> tuple[list[ProbeResult], dict | None]:
    """``run_probes`` led by the stack preflight of ``subject`` (unless None) in the same
    launch, and the preflight: a launch costs seconds of imports, the preflight's own work
    a fraction of one. A probe whose preconditions failed is UNSUPPORTED, run or not: one
    that shared the preflight's launch already ran, one after it is not run."""
    from fsdpqdiag.launcher import batch

    items = [batch.Item(name, name, probe_config) for name in names]
    results, checked = run_items_checked(items, run, subject, on_start, session=session)
    return [results[name] for name in names], checked


@in_session
def run_items_checked(
    items: Sequence,
    run: RunConfig,
    subject: dict | None,
    on_start: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> tuple[dict[str, ProbeResult], dict | None]:
    """``run_checked`` for items (``fsdpqdiag.launcher.batch.Item``) that may run one task under
    several configurations (``fix``: one ``fix-verify`` per workaround): each result under
    its item's key."""
    from fsdpqdiag.analyses import preflight as stack
    from fsdpqdiag.launcher import batch
    from fsdpqdiag.tasks import get_probe

    by_key = {item.key: item for item in items}
    results: dict[str, ProbeResult] = {}
    for item in items:
        unmet = get_probe(item.task).needs.unmet(run)
        if unmet is not None:
            results[item.key] = _skipped(item.task, item.config, run, unmet)
    pending = [item for item in items if item.key not in results]
    launched = [batch.Item(stack.NAME, stack.NAME, subject)] if subject is not None else []
    launched += pending
    checked: dict | None = None

    def refusal(item) -> ProbeResult | None:
        return unsupported(item.task, item.config, run, checked) if checked is not None else None

    def settle(parts: list[batch.ProbeOutcomes]) -> list[str]:
        nonlocal checked
        for part in parts:
            if part.probe == stack.NAME and subject is not None:
                # Where the launch died inside it, the preflight relaunches for the rest.
                checked = stack.run_preflight(run, subject, session.run_task, part.outcomes, part.duration_s)
            else:
                item = by_key[part.probe]
                results[item.key] = _decide(
                    item.task, item.config, run, part.outcomes, part.duration_s, checked
                )
        if checked is None:
            return []
        # Not run: an item whose preconditions failed in the preflight.
        ran = {part.probe for part in parts}
        not_run = [i for i in pending if i.key not in ran and i.key not in results]
        refused = {i.key: result for i in not_run if (result := refusal(i)) is not None}
        results.update(refused)
        return list(refused)

    new_watch = (lambda: batch.watch_progress(on_start)) if on_start else None
    batch.run_resilient(launched, run, session.run_task, settle, new_watch)
    if checked is not None:
        for key, result in list(results.items()):
            refused = result.verdict != UNSUPPORTED and refusal(by_key[key])
            if refused:
                # It ran beside the preflight: its own verdict is kept as evidence, not as the verdict.
                refused.evidence["measured"] = {"verdict": result.verdict, "summary": result.summary}
                refused.ranks, refused.duration_s = result.ranks, result.duration_s
                results[key] = refused
    return results, checked


@in_session
def preflight(
    run: RunConfig,
    subject: dict,
    on_progress: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> dict:
    """The stack preflight of one run (see ``fsdpqdiag.analyses.preflight``): what each report carries."""
    from fsdpqdiag.analyses import preflight as stack

    if on_progress:
        on_progress(f"preflight at world size {run.world_size} on {run.device}/{run.backend}")
    return stack.run_preflight(run, subject, session.run_task)


def unsupported(name: str, probe_config: dict, run: RunConfig, checked: dict) -> ProbeResult | None:
    """UNSUPPORTED for a probe whose preconditions failed in the preflight ``checked``, or None.

    Such a probe is not run: on a stack that fails with ordinary tensors it could only
    report the stack's failure as the bug's.
    """
    from fsdpqdiag.analyses import preflight as stack
    from fsdpqdiag.tasks import get_probe

    probe = get_probe(name)
    if probe.needs.unmet(run) is not None:
        return None  # SKIPPED says more: the probe cannot run here at all
    decided = stack.unsupported_verdict(name, probe.preconditions, checked, run)
    if decided is None:
        return None
    attribute(name, decided, run)
    return ProbeResult(
        verdict=decided.verdict,
        summary=decided.summary,
        evidence=decided.evidence,
        reason=decided.summary,
        **_common(name, probe_config, run),
    )


def run_unless_unsupported(
    name: str, probe_config: dict, run: RunConfig, checked: dict, session: LaunchSession
) -> ProbeResult:
    """UNSUPPORTED where the preflight ``checked`` says so (see ``unsupported``), else run."""
    return unsupported(name, probe_config, run, checked) or run_probe(
        name, probe_config, run, session=session
    )


def _common(name: str, probe_config: dict, run: RunConfig) -> dict:
    return dict(
        probe=name,
        world_size=run.world_size,
        device=run.device,
        backend=run.backend,
        config=probe_config,
        injected=run.inject,
    )


def _skipped(name: str, probe_config: dict, run: RunConfig, reason: str) -> ProbeResult:
    return ProbeResult(verdict=SKIPPED, summary=reason, reason=reason, **_common(name, probe_config, run))


def attribute(name: str, decided, run: RunConfig, signal: str | None = None) -> None:
    """Put the attribution record into a verdict that names a culprit (see ``attribution``)."""
    from fsdpqdiag.tasks import get_probe

    if decided.verdict not in attribution.ATTRIBUTED_VERDICTS:
        return
    probe = get_probe(name)
    given = decided.evidence.get("attribution")
    if given:  # a verdict decided by a control outside the probe (the stack preflight)
        component, decided_by = given["component"], given.get("decided_by") or []
    elif probe.attribute:
        component, decided_by = probe.attribute(decided.evidence)
    else:
        component, decided_by = (
            attribution.UNDETERMINED,
            ["this task runs no control that separates the suspects"],
        )
    decided.evidence["attribution"] = attribution.record(
        component,
        decided_by,
        probe=name,
        verdict=decided.verdict,
        summary=decided.summary,
        evidence=decided.evidence,
        backend=run.backend,
        device=run.device,
        signal=signal,
        injected=run.inject,
    )


def _decide(
    name: str,
    probe_config: dict,
    run: RunConfig,
    outcomes: list,
    duration_s: float,
    checked: dict | None = None,
) -> ProbeResult:
    """The verdict of a probe's ranks; ``checked``, the preflight of the same launch, tells
    the attribution which of the probe's preconditions held on ordinary tensors."""
    from fsdpqdiag.tasks import get_probe

    probe = get_probe(name)
    decided = probe.verdict(outcomes)
    if checked is not None:
        held = {c["name"] for c in checked.get("capabilities", []) if c["ok"]}
        decided.evidence["preflight_held"] = [name for name in probe.preconditions if name in held]
    attribute(name, decided, run, signal=next((o.signal for o in outcomes if o.signal), None))
    return ProbeResult(
        verdict=decided.verdict,
        summary=decided.summary,
        evidence=decided.evidence,
        ranks=[o.to_dict() for o in outcomes],
        reason=decided.summary if decided.verdict not in (REPRODUCED, NOT_REPRODUCED) else None,
        duration_s=round(duration_s, 3),
        **_common(name, probe_config, run),
    )


def preflight_ok(checked: dict) -> bool:
    return all(capability["ok"] for capability in checked.get("capabilities", []))
