"""What a run concluded and what to do next, as data.

Each finding's component, where to file it, the known upstream issue and the control that
decided it; the counts; what the exit code means; the next step.

Every command ends with this (``fsdpqdiag.render.conclusion`` draws it), so a user reads
from the console alone what is broken, whom to tell and what to run next, the way ruff and
cargo end a diagnostic with a ``help:`` line. Stdlib only: renderers import it without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fsdpqdiag.core.verdict import VerdictKind
from fsdpqdiag.evidence.attribution import ATTRIBUTED_VERDICTS, KNOWN_ISSUES
from fsdpqdiag.report.commands import kind_of
from fsdpqdiag.report.model import (
    EXIT_CLEAN,
    EXIT_FOUND,
    EXIT_PROBE_FAILED,
    Report,
)

# The name `fsdpqdiag report --upstream NAME` takes: the repository's own name.
_FOUND = (VerdictKind.REPRODUCED, VerdictKind.CRASHED, VerdictKind.INCONCLUSIVE)
_TOOL_FAILED = (VerdictKind.ERROR, VerdictKind.TIMEOUT)
# Where to put the report when the run kept none (no --json): the hint must be runnable.
PLACEHOLDER_JSON = "R.json"


@dataclass(frozen=True)
class Finding:
    """One attributed result, as the console's ``help:`` line names it."""

    verdict: str
    label: str
    component: str
    report_to: str | None
    known_issues: tuple[str, ...]
    decided_by: str
    more_controls: int


@dataclass(frozen=True)
class Conclusion:
    # The findings in the order of the results; the key is the result's index.
    findings: dict[int, Finding]
    counts: tuple[tuple[str, int], ...]
    total: int
    exit_code: int
    exit_meaning: str
    next_steps: tuple[str, ...] = field(default_factory=tuple)


def upstream_name(report_to: str) -> str:
    """``pytorch/pytorch`` -> ``pytorch``; ``bitsandbytes-foundation/bitsandbytes`` -> ``bitsandbytes``."""
    return report_to.rsplit("/", 1)[-1]


def _known(label: str) -> str:
    """The curated issue's reference and the release that fixed it, without its title."""
    for issue in KNOWN_ISSUES:
        if issue.label() == label:
            return issue.ref + (f" (fixed in {issue.fixed_in})" if issue.fixed_in else "")
    return label


def result_label(result) -> str:
    return f"{result.probe} (ws={result.world_size})" + (
        f" [inject {result.injected}]" if result.injected else ""
    )


def finding_of(result) -> Finding | None:
    """The attribution of a result whose verdict names a culprit, or None."""
    if result.verdict not in ATTRIBUTED_VERDICTS:
        return None
    attribution = result.evidence.get("attribution") or {}
    decided = list(attribution.get("decided_by") or [])
    return Finding(
        verdict=result.verdict,
        label=result_label(result),
        component=attribution.get("component") or "not attributed",
        report_to=attribution.get("report_to"),
        known_issues=tuple(_known(label) for label in attribution.get("known_issues") or ()),
        decided_by=decided[0] if decided else "no control recorded",
        more_controls=max(len(decided) - 1, 0),
    )


def _exit_meaning(report: Report, code: int) -> str:
    kind = kind_of(report.command)
    if code == EXIT_CLEAN:
        return kind.clean_meaning
    if code == EXIT_FOUND:
        return kind.found_meaning
    if code == EXIT_PROBE_FAILED:
        return "a run could not decide (ERROR, TIMEOUT, CRASHED or UNSUPPORTED)"
    return "see --help"


def shown_path(path: str | Path) -> str:
    """A path as short as it can be shown: relative to the working directory where it lies
    under it, so that the command in a hint stays whole on an 80-column line."""
    relative = os.path.relpath(Path(path).absolute())
    return str(path) if relative.startswith("..") else relative


def _report_steps(report: Report, findings: list[Finding], json_path: str | None) -> list[str]:
    path = shown_path(json_path) if json_path else PLACEHOLDER_JSON
    keep = "" if json_path else f" (rerun with --json {PLACEHOLDER_JSON} to keep the report)"
    steps = []
    upstream = sorted(
        {f.report_to for f in findings if f.report_to and f.verdict in (*_FOUND, VerdictKind.UNSUPPORTED)}
    )
    for repo in upstream:
        steps.append(f"file for {repo}: fsdpqdiag report {path} --upstream {upstream_name(repo)}{keep}")
    found = [r for r in report.results if r.verdict in _FOUND and not r.injected]
    if found and kind_of(report.command).suggests_fix:
        first = found[0]
        steps.append(
            f"try a workaround on this stack: fsdpqdiag fix --device {first.device} --ws {first.world_size}"
        )
    if any(r.injected and r.verdict in _FOUND for r in report.results) and not found:
        steps.append("the injected fault was detected: the positive control works; nothing to file")
    failed = sorted({r.probe for r in report.results if r.verdict in _TOOL_FAILED})
    if failed:
        steps.append(
            "a run failed in the tool, not the stack: rerun it alone with --json to keep its "
            f"exception ({', '.join(failed)})"
        )
    return steps


def apply_steps(report: Report) -> list[str]:
    """How to apply each workaround `fix` verified in one's own run: in a script, in a
    Trainer, around an unchanged command; or that the stack needs none."""
    steps = []
    for result in report.results:
        name = result.config.get("workaround")
        if result.verdict == VerdictKind.NO_FIX_NEEDED:
            steps.append(
                f"this stack needs no fix: unfixed training on {result.config.get('target')} "
                "is bit-identical to training without FSDP"
            )
        elif result.verdict == VerdictKind.VERIFIED and name and name != "none":
            steps += [
                f"apply {name} in a script: import fsdpqdiag.fixes; fsdpqdiag.fixes.apply({name!r}) "
                "before fully_shard",
                f"apply {name} in a Trainer: callbacks=[GuardCallback(fix={name!r})] "
                "(from fsdpqdiag.integrations.hf_trainer)",
                f"apply {name} around a command: fsdpqdiag watch --fix {name} -- torchrun ... train.py",
            ]
    return list(dict.fromkeys(steps))


def conclude(report: Report, json_path: str | Path | None = None, exit_code: int | None = None) -> Conclusion:
    """The conclusion of ``report``. ``json_path``: where its JSON was kept, so the next step
    names a file that exists; ``exit_code``: the command's, where it is not the report's own."""
    code = report.exit_code() if exit_code is None else exit_code
    findings = {i: f for i, r in enumerate(report.results) if (f := finding_of(r)) is not None}
    counts: dict[str, int] = {}
    for member in VerdictKind:
        n = sum(1 for r in report.results if r.verdict == member)
        if n:
            counts[member.value] = n
    steps = apply_steps(report) + _report_steps(
        report, list(findings.values()), str(json_path) if json_path else None
    )
    if not steps:
        steps = ["nothing to do"]
    return Conclusion(
        findings=findings,
        counts=tuple(counts.items()),
        total=len(report.results),
        exit_code=code,
        exit_meaning=_exit_meaning(report, code),
        next_steps=tuple(steps),
    )
