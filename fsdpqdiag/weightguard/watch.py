"""``fsdpqdiag watch``: run an unchanged training command with the weight guard in every process.

The command runs as the user would run it (``torchrun ...``, ``accelerate launch ...``,
``python train.py``), its output on the terminal. A ``sitecustomize`` directory put first on
``PYTHONPATH`` makes every Python process it starts wrap ``fully_shard`` (``guard_auto``), so the
guard attaches where the script shards its model, with no change to the script. Each guarded
process writes its record into a directory named by ``envvars.GUARD_DIR``; when the command
ends, normally, by error or by a trip, those records are merged into one report.

The command is the user's own process tree, not ranks of ours: it is started and waited for
here, not by ``fsdpqdiag.launcher.launch``, which owns the probes' ranks (ports, timeouts, reaping).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdpqdiag import envvars
from fsdpqdiag.core.verdict import VerdictKind
from fsdpqdiag.report.model import ERROR, NOT_REPRODUCED, REPRODUCED, SKIPPED, ProbeResult, Report
from fsdpqdiag.weightguard import job
from fsdpqdiag.weightguard.presentation import PRESENTATION  # noqa: F401 - found by RESULT_KIND

# The probe name a guard's results carry in a report. No rank task writes them, so the
# renderers find PRESENTATION (weightguard.presentation) by this name through fsdpqdiag.tasks.
RESULT_KIND = "guard"

SITE_DIR = Path(__file__).with_name("_watch_site")
EXIT_TRIPPED = 1
EXIT_UNCHECKED = 3
WATCH_EXIT_CODES = (
    "Exit codes: the command's own exit code when the guard checked and stayed silent (128+N when "
    "a signal N ended it); 1 when the guard tripped (a guarded weight reached forward altered, "
    "with --fix too: the fix did not help), whatever the command returned; 2 bad input (no "
    "command after --, unknown fault or fix, unwritable output: nothing run, nothing written); "
    "3 nothing was checked (no process called fully_shard, or the guard attached to no quantized "
    "weight) although the command succeeded: not a pass."
)


class WatchInputError(ValueError):
    """A mistake in the watch invocation itself (one line, exit 2)."""


@dataclass
class WatchOutcome:
    report: Report
    command_exit: int
    exit_code: int
    checked: bool = True
    # Multi-node: whether this node writes the report, and which node does (weightguard.job).
    job: dict | None = None


def check_command(command: list[str]) -> None:
    if not command:
        raise WatchInputError("no command to watch: give it after --, e.g. fsdpqdiag watch -- torchrun ...")
    program = command[0]
    if os.sep not in program and shutil.which(program) is None:
        raise WatchInputError(f"cannot run {program!r}: not found on PATH")
    if os.sep in program and not os.access(program, os.X_OK):
        raise WatchInputError(f"cannot run {program!r}: not an executable file")


def child_environment(
    state_dir: Path,
    *,
    params: str,
    action: str,
    every: int,
    inject: str | None,
    fix: str | None = None,
    report_path: str | None = None,
) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(SITE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[envvars.GUARD_DIR] = str(state_dir)
    env[envvars.GUARD_PARAMS], env[envvars.GUARD_ACTION] = params, action
    env[envvars.GUARD_EVERY] = str(every)
    if inject:
        env[envvars.GUARD_INJECT] = inject
    else:
        env.pop(envvars.GUARD_INJECT, None)
    if fix:
        env[envvars.GUARD_FIX] = fix
    else:
        env.pop(envvars.GUARD_FIX, None)
    env.pop(envvars.GUARD_RANK_PROCESS, None)  # each rank process of the command claims its own
    if report_path:
        env[envvars.GUARD_REPORT] = report_path
    else:
        env.pop(envvars.GUARD_REPORT, None)
    return env


def run(
    command: list[str],
    *,
    params: str = "quantized",
    action: str = "report",
    every: int = 1,
    inject: str | None = None,
    fix: str | None = None,
    argv: list[str] | None = None,
    report_path: str | None = None,
) -> WatchOutcome:
    """Run ``command`` guarded (with workaround ``fix`` applied in every process); the merged
    report and the exit code ``watch`` answers with."""
    check_command(command)
    if inject:
        from fsdpqdiag.stack import faults

        faults.get(inject)  # ValueError naming the known faults
    if fix:
        from fsdpqdiag import fixes

        fixes.check_installable(fix)  # ValueError: unknown, or not applicable from outside
    state_dir = Path(tempfile.mkdtemp(prefix="fsdpqdiag-watch-"))
    try:
        options = dict(params=params, action=action, every=every, inject=inject, fix=fix)
        env = child_environment(state_dir, report_path=report_path, **options)
        process = subprocess.Popen(command, env=env)
        forwarded = _forward_stop_signals(process)
        try:
            returncode = process.wait()
        finally:
            for signum, previous in forwarded.items():
                signal.signal(signum, previous)
        command_exit = returncode if returncode >= 0 else 128 - returncode
        states, job_view = job.combine(job.read_states(state_dir), job.read_job(state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    report = build_report(
        states,
        argv=list(argv or ["watch", "--", *command]),
        command_exit=command_exit,
        command=command,
        injected=inject,
        params=params,
        action=action,
        every=every,
        fix=fix,
        job_view=job_view,
    )
    (result,) = report.results
    checked = bool(result.evidence.get("checks"))
    if result.verdict == REPRODUCED:
        exit_code = EXIT_TRIPPED
    elif not checked and command_exit == 0:
        exit_code = EXIT_UNCHECKED  # a silent exit 0 would read as a pass in CI
    else:
        exit_code = command_exit
    return WatchOutcome(report, command_exit, exit_code, checked, job_view)


def _forward_stop_signals(process: subprocess.Popen) -> dict:
    """SIGTERM/SIGHUP to watch reach the command (torchrun then stops its ranks), and watch
    still merges what the ranks recorded. SIGINT from a terminal reaches the whole foreground
    process group already: watch waits for the command instead of dying first."""
    previous = {}

    def forward(signum, frame) -> None:
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, forward)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda s, f: None)
    return previous


def _merge_counts(target: dict, source: dict | None) -> None:
    for key, value in (source or {}).items():
        target[key] = target.get(key, 0) + value


def merge_modules(states: list[dict]) -> list[dict]:
    """One row per altered parameter over every rank: first step, ranks, elements and bytes
    summed over the ranks' own slices, classes and post patterns merged."""
    rows: dict[str, dict] = {}
    for state in sorted(states, key=lambda s: s.get("rank", 0)):
        for finding in state.get("findings", []):
            row = rows.setdefault(
                finding["parameter"],
                {
                    "module": finding["module"],
                    "parameter": finding["parameter"],
                    "kind": finding.get("kind"),
                    "first_step": finding.get("first_step"),
                    "ranks": [],
                    "differing_elements": 0,
                    "differing_bytes": 0,
                    "original_classes": {},
                    "post_bit_patterns": {},
                    "shard_byte_true": True,
                    "samples": [],
                    "summary": finding.get("summary"),
                },
            )
            steps = [s for s in (row["first_step"], finding.get("first_step")) if s is not None]
            row["first_step"] = min(steps) if steps else None
            row["ranks"].append(finding.get("rank"))
            row["differing_elements"] += finding.get("differing_elements") or 0
            row["differing_bytes"] += finding.get("differing_bytes") or 0
            _merge_counts(row["original_classes"], finding.get("original_classes"))
            _merge_counts(row["post_bit_patterns"], finding.get("post_bit_patterns"))
            row["shard_byte_true"] = row["shard_byte_true"] and bool(finding.get("shard_byte_true", True))
            if finding.get("comparable") is False:
                row["comparable"], row["reason"] = False, finding.get("reason")
            room = 16 - len(row["samples"])
            row["samples"] += (finding.get("samples") or [])[:room]
            if row.get("fingerprint") is None and finding.get("fingerprint"):
                row["fingerprint"] = finding["fingerprint"]
    return sorted(
        rows.values(),
        key=lambda r: (r["first_step"] if r["first_step"] is not None else 1 << 62, r["parameter"]),
    )


def attribute(modules: list[dict]) -> tuple[str, list[str]]:
    """Byte-true shards with altered bytes in forward: FSDP2's unshard altered them; where a
    shard itself changed, something wrote into it and the guard cannot say what."""
    from fsdpqdiag.evidence import attribution

    if not modules:
        return attribution.UNDETERMINED, ["nothing altered"]
    shards_true = all(m["shard_byte_true"] for m in modules)
    matches = sorted({name for m in modules for name in ((m.get("fingerprint") or {}).get("matches") or [])})
    decided_by = [
        f"shards byte-true against their set-up digests in {'all' if shards_true else 'not all'} "
        f"{len(modules)} altered weights",
        "fingerprint: " + (", ".join(matches) or "no candidate conversion"),
    ]
    if shards_true:
        return attribution.TORCH_FSDP, decided_by
    return attribution.UNDETERMINED, decided_by


def build_report(
    states: list[dict],
    *,
    argv: list[str],
    command_exit: int | None,
    command: list[str] | None = None,
    injected: str | None = None,
    params: str | None = None,
    action: str | None = None,
    every: int | None = None,
    fix: str | None = None,
    job_view: dict | None = None,
) -> Report:
    """The merged ``fsdpqdiag.report/1`` report of every guarded process."""
    from fsdpqdiag.evidence import attribution
    from fsdpqdiag.report.commands import WATCH

    states = [s for s in states if s]
    first = states[0] if states else {}
    injected = injected or first.get("injected")
    fix = fix or (first.get("fix") or {}).get("name")
    job_size = (job_view or {}).get("world_size") or 1  # where no rank guarded anything
    world_size = max((s.get("world_size", 1) for s in states), default=job_size)
    config: dict[str, Any] = {
        "command": command or first.get("argv") or [],
        "params": params or first.get("params"),
        "action": action or first.get("action"),
        "every": every or first.get("every"),
        "command_exit": command_exit,
        "fix": fix,
    }
    modules = merge_modules(states)
    evidence = _evidence(states, modules)
    if job_view and (job_view.get("world_size") or 1) > 1:
        keys = ("world_size", "ranks_answered", "lost_ranks", "hosts", "timeout_s")
        evidence["job"] = {key: job_view.get(key) for key in keys}
    if fix:
        failed = [f"rank {s.get('rank', 0)}: {(s.get('fix') or {}).get('error')}" for s in states]
        evidence["fix"] = {"name": fix, "errors": [e for e in failed if not e.endswith(": None")]}
    verdict, summary = _verdict(states, evidence, command_exit)
    result = ProbeResult(
        probe=RESULT_KIND,
        verdict=verdict,
        world_size=world_size,
        device=first.get("device", "unknown"),
        backend=first.get("backend", "unknown"),
        config=config,
        injected=injected,
        summary=summary,
        evidence=evidence,
        ranks=[
            {
                "rank": s.get("rank", 0),
                "status": "ok",
                "evidence": {k: s.get(k) for k in ("pid", "steps", "forward_calls", "setup_s", "closed")},
            }
            for s in states
        ],
        reason=summary if verdict == SKIPPED else None,
    )
    if verdict == REPRODUCED:
        component, decided_by = attribute(modules)
        evidence["attribution"] = attribution.record(
            component,
            decided_by,
            probe=RESULT_KIND,
            verdict=verdict,
            summary=summary,
            evidence=evidence,
            backend=result.backend,
            device=result.device,
            injected=injected,
        )
    return Report(WATCH.name, argv, job.stack_of(states), [result], world_sizes=[world_size])


def _evidence(states: list[dict], modules: list[dict]) -> dict[str, Any]:
    guarded = {g["parameter"] for s in states for g in s.get("guarded", [])}
    evidence: dict[str, Any] = {
        "guarded": len(guarded),
        "guarded_parameters": sorted(guarded),
        "skipped": [item for s in states for item in s.get("skipped", [])][:50],
        "errors": [f"rank {s.get('rank', 0)}: {e}" for s in states for e in s.get("errors", [])][:50],
        "processes": len(states),
        "params": next((s["params"] for s in states if s.get("params")), "quantized"),
        "checks": sum(g.get("checks", 0) for s in states for g in s.get("guarded", [])),
        "steps": max((s.get("steps", 0) for s in states), default=0),
        "altered_modules": len(modules),
        "first_step": min((m["first_step"] for m in modules if m["first_step"] is not None), default=None),
        "modules": modules,
        "ranks_agree": len(
            {json.dumps(sorted(f["parameter"] for f in s.get("findings", []))) for s in states}
        )
        <= 1,
    }
    evidence["fingerprint"] = next((m["fingerprint"] for m in modules if m.get("fingerprint")), None)
    return evidence


def _verdict(
    states: list[dict], evidence: dict[str, Any], command_exit: int | None
) -> tuple[VerdictKind, str]:
    guarded, modules = evidence["guarded"], evidence["modules"]
    exit_note = "" if command_exit is None else f"; the command exited with code {command_exit}"
    fix = evidence.get("fix")
    fixed = f"with fix {fix['name']} applied, " if fix else ""
    if fix and fix["errors"]:
        exit_note = f"; the fix could not be applied on {', '.join(fix['errors'])}" + exit_note
    lost = (evidence.get("job") or {}).get("lost_ranks")
    if lost:
        timeout_s = evidence["job"]["timeout_s"]
        within = f"within {timeout_s:g} s " if timeout_s else "at the guard's close "
        exit_note = (
            f"; rank(s) {', '.join(map(str, lost))} lost: no record {within}"
            "(their node died, stopped answering, or was stopped first)" + exit_note
        )
    if not states:
        return SKIPPED, "nothing checked: no process of the command called fully_shard" + exit_note
    if not guarded and evidence["errors"]:
        return ERROR, "nothing checked: " + evidence["errors"][0] + exit_note
    if modules:
        names = ", ".join(m["module"] for m in modules[:8]) + (" …" if len(modules) > 8 else "")
        return REPRODUCED, (
            f"{fixed}{len(modules)} of {guarded} guarded weights {'still ' if fix else ''}reached forward "
            f"altered, first at step {evidence['first_step']}: {names} "
            f"({sum(m['differing_elements'] for m in modules)} elements differ in the ranks' own slices)"
            + ("; the fix does not help here" if fix else "")
            + exit_note
        )
    if lost:
        checked = f"not every rank checked: {evidence['checks']} checks byte-true on the others"
        return ERROR, checked + exit_note
    if not evidence["checks"]:
        what = f"no forward of the {guarded} guarded weights was verified" if guarded else (
            f"fully_shard was called but the guard attached to no {evidence['params']} weight"
        )  # fmt: skip
        return SKIPPED, "nothing checked: " + what + exit_note
    summary = (
        f"{fixed}every one of {guarded} guarded weights reached forward byte-true in {evidence['checks']} "
        f"checks over {evidence['steps']} optimizer steps" + exit_note
    )
    if evidence["errors"]:
        summary += f"; {len(evidence['errors'])} guard error(s), those weights unverified"
    return NOT_REPRODUCED, summary
