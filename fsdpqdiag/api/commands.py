"""The commands that run probes on one layer or model: reproduce, localize, fix,
forensics, and doctor (the stack preflight alone)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from fsdpqdiag.analyses import fix_verify
from fsdpqdiag.analyses import forensics as forensics_task
from fsdpqdiag.analyses import localize as localize_task
from fsdpqdiag.api import memory
from fsdpqdiag.api.checks import (
    BadInput,
    check_probes,
    check_storage_pairs,
    checked_linear,
    merged,
    require_stack,
    run_configs,
)
from fsdpqdiag.api.running import (
    preflight,
    run_checked,
    run_items_checked,
    run_probe,
    run_unless_unsupported,
)
from fsdpqdiag.core.config import LinearConfig, RunConfig
from fsdpqdiag.evidence import attribution
from fsdpqdiag.launcher import batch
from fsdpqdiag.launcher.session import LaunchSession, in_session
from fsdpqdiag.probes import storage_dtype_mismatch
from fsdpqdiag.report.commands import DOCTOR, FIX, FORENSICS, LOCALIZE, REPRODUCE
from fsdpqdiag.report.model import ProbeResult, Report


def _at_each_world_size(
    runs: Sequence[RunConfig], run_one: Callable[[RunConfig], tuple[list[ProbeResult], dict | None]]
) -> tuple[list[ProbeResult], list[dict | None]]:
    """``run_one(run)`` at each world size, in order: every result, and each run's preflight."""
    results: list[ProbeResult] = []
    checks: list[dict | None] = []
    for run in runs:
        ran, checked = run_one(run)
        results.extend(ran)
        checks.append(checked)
    return results, checks


def _announcer(
    on_progress: Callable[[str], None] | None, run: RunConfig, naming_the_stack: bool = True
) -> Callable[[str], None]:
    """The progress line of each step of ``run``: what runs, at which world size (and on
    which device and backend)."""

    def announce(what: str) -> None:
        if on_progress:
            where = f" on {run.device}/{run.backend}" if naming_the_stack else ""
            on_progress(f"{what} at world size {run.world_size}{where}")

    return announce


@in_session
def reproduce(
    probes: Sequence[str] = (),
    linear: LinearConfig | None = None,
    world_sizes: Sequence[int] = (),
    device: str = "auto",
    timeout_s: float = 300.0,
    inject: str | None = None,
    backend: str = "auto",
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> Report:
    """Run the selected probes (all by default) at each world size, all of one world size in
    one launch (relaunching after a probe that kills it)."""
    linear = checked_linear(linear)
    names = check_probes(probes)
    if storage_dtype_mismatch.PROBE.name in names:
        check_storage_pairs(linear)
    probe_config = dataclasses.asdict(linear)
    runs = run_configs(world_sizes, device, backend, timeout_s, inject)
    estimate = memory.layer_estimate(linear.in_features, linear.out_features, linear.batch)
    on_progress = memory.noting(on_progress, memory.check(estimate, runs))
    require_stack(session)
    results, checks = _at_each_world_size(
        runs,
        lambda run: run_checked(
            names, probe_config, run, {"linear": probe_config}, _announcer(on_progress, run), session=session
        ),
    )
    attribution.cite_reference(results)
    return Report(REPRODUCE.name, list(argv), session.stack(), results, preflight=checks)


@in_session
def localize(
    linear: LinearConfig | None = None,
    world_sizes: Sequence[int] = (1,),
    device: str = "auto",
    timeout_s: float = 300.0,
    inject: str | None = None,
    backend: str = "auto",
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> Report:
    """Replay FSDP2's unshard path stage by stage on every bf16 NaN pattern."""
    linear = checked_linear(linear or LinearConfig(in_features=256, out_features=256))
    # The payload plants every bf16 NaN pattern (2 signs x 127 non-zero mantissas) in the
    # packed bf16 storage; a smaller layer would replay without them and prove nothing.
    nan_patterns = 254
    containers = (linear.in_features * linear.out_features + 1) // 2 // 2
    if containers < nan_patterns:
        raise BadInput(
            f"a {linear.out_features}x{linear.in_features} layer packs into {containers} bf16 containers; "
            f"the payload needs {nan_patterns} (in_features * out_features >= {nan_patterns * 4})"
        )
    runs = run_configs(world_sizes, device, backend, timeout_s, inject)
    estimate = memory.layer_estimate(linear.in_features, linear.out_features, linear.batch)
    on_progress = memory.noting(on_progress, memory.check(estimate, runs))
    require_stack(session)
    config = dataclasses.asdict(linear)

    def replay(run: RunConfig) -> tuple[list[ProbeResult], dict | None]:
        _announcer(on_progress, run)("localize")
        return run_checked([localize_task.PROBE.name], config, run, {"linear": config}, session=session)

    results, checks = _at_each_world_size(runs, replay)
    return Report(LOCALIZE.name, list(argv), session.stack(), results, preflight=checks)


@in_session
def fix(
    workarounds: Sequence[str] = ("all",),
    targets: Sequence[str] = ("linear",),
    steps: int = 3,
    world_sizes: Sequence[int] = (),
    device: str = "auto",
    timeout_s: float = 600.0,
    inject: str | None = None,
    backend: str = "auto",
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> Report:
    """Verify each workaround bit for bit next to the unfixed run, per target and world size."""
    from fsdpqdiag import fixes
    from fsdpqdiag.analyses.fix_verify import TARGETS

    # Every name given is checked, "all" beside it too: a typo is never run as "all".
    for name in workarounds:
        if name != "all" and name not in fixes.FIXES:
            raise BadInput(f"unknown workaround {name!r} (known: {', '.join(fixes.FIXES)}, all)")
    names = list(fixes.FIXES) if "all" in workarounds or not workarounds else merged(workarounds)
    targets = merged(targets)
    for target in targets:
        if target not in TARGETS:
            raise BadInput(f"unknown fix target {target!r} (known: {', '.join(TARGETS)})")
    if steps < 1:
        raise BadInput.about("{steps} must be >= 1, got {0}", steps)
    from fsdpqdiag.stack.models import PRESETS, ModelSourceError, preset_dir

    runs = run_configs(world_sizes, device, backend, timeout_s, inject)
    require_stack(session)
    for target in targets:
        if target in PRESETS:
            try:
                preset_dir(target)  # built once here, not raced by the ranks
            except ModelSourceError as exc:
                raise BadInput(str(exc)) from exc
    # The FSDP units the preflight reads: the first preset target's model, else the layer.
    model_targets = [t for t in targets if t in PRESETS]
    subject = (
        {"model": {"model": str(preset_dir(model_targets[0])), "label": model_targets[0], "lora": True}}
        if model_targets
        else {"linear": dataclasses.asdict(LinearConfig())}
    )
    items = [
        batch.Item(
            f"{w} on {target}", fix_verify.PROBE.name, {"workaround": w, "target": target, "steps": steps}
        )
        for target in targets
        for w in ["none", *names]
    ]

    def verify(run: RunConfig) -> tuple[list[ProbeResult], dict | None]:
        on_start = _announcer(on_progress, run, naming_the_stack=False)
        ran, checked = run_items_checked(items, run, subject, on_start, session=session)
        _rerun_after_an_unrestored_undo(items, ran, run, checked, session)
        return [ran[item.key] for item in items], checked

    results, checks = _at_each_world_size(runs, verify)
    return Report(FIX.name, list(argv), session.stack(), results, preflight=checks)


def _rerun_after_an_unrestored_undo(
    items: list, ran: dict, run: RunConfig, checked: dict | None, session: LaunchSession
) -> None:
    """The workarounds share a launch, each undone before the next is applied. One whose undo
    left bitsandbytes or FSDP2 patched (``restored_after_undo`` false) would have changed the
    runs after it: those are run again, each in a launch of its own."""
    keys = [item.key for item in items]
    unrestored = [k for k in keys if ran[k].evidence.get("restored_after_undo") is False]
    if not unrestored:
        return
    for item in items[keys.index(unrestored[0]) + 1 :]:
        if checked is not None:
            ran[item.key] = run_unless_unsupported(item.task, item.config, run, checked, session)
        else:
            ran[item.key] = run_probe(item.task, item.config, run, session=session)


@in_session
def forensics(
    model: str | None = None,
    preset: str = "tiny-llama",
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: str = "bfloat16",
    lora: bool = False,
    world_sizes: Sequence[int] = (),
    device: str = "auto",
    timeout_s: float = 900.0,
    inject: str | None = None,
    backend: str = "auto",
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> Report:
    """Per-module byte forensics of a real quantized causal LM under FSDP2."""
    from fsdpqdiag.core.config import QUANT_TYPES
    from fsdpqdiag.stack.models import ModelSourceError, resolve_model

    if bits not in (4, 8):
        raise BadInput.about("{bits} must be 4 or 8, got {0}", bits)
    if quant_type not in QUANT_TYPES:
        raise BadInput(f"unknown quant type {quant_type!r} (known: {', '.join(QUANT_TYPES)})")
    runs = run_configs(world_sizes, device, backend, timeout_s, inject)
    on_progress = memory.noting(on_progress, memory.check_model(model, preset, runs))
    require_stack(session)
    try:
        path = resolve_model(model, preset)
    except ModelSourceError as exc:
        raise BadInput(str(exc)) from exc
    config = {
        "model": str(path),
        "bits": bits,
        "quant_type": quant_type,
        "double_quant": double_quant,
        "quant_storage": quant_storage,
        "lora": lora,
    }
    subject = {"model": {**config, "label": model or preset}}

    def examine(run: RunConfig) -> tuple[list[ProbeResult], dict | None]:
        _announcer(on_progress, run)("forensics")
        (result,), checked = run_checked([forensics_task.PROBE.name], config, run, subject, session=session)
        result.config["model"] = model or preset  # the name asked for, not the cache path
        return [result], checked

    results, checks = _at_each_world_size(runs, examine)
    return Report(FORENSICS.name, list(argv), session.stack(), results, preflight=checks)


@in_session
def doctor(
    world_sizes: Sequence[int] = (),
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 300.0,
    inject: str | None = None,
    model: str | None = None,
    preset: str = "tiny-llama",
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
    *,
    session: LaunchSession,
) -> Report:
    """The stack preflight alone at each world size (the default one when none is given),
    for the model under test (``model`` or a preset) wrapped as forensics and the matrix wrap
    it: a report with no probe result, one preflight per world size. Every size is checked
    before the first launch: a bad second world size costs no run."""
    from fsdpqdiag.stack.models import ModelSourceError, resolve_model

    runs = run_configs(world_sizes, device, backend, timeout_s, inject)
    require_stack(session)
    try:
        path = resolve_model(model, preset)
    except ModelSourceError as exc:
        raise BadInput(str(exc)) from exc
    subject = {"model": {"model": str(path), "label": model or preset}}
    checks = [preflight(run, subject, on_progress, session=session) for run in runs]
    return Report(
        command=DOCTOR.name,
        argv=list(argv),
        env=session.stack(),
        results=[],
        world_sizes=[run.world_size for run in runs],
        preflight=checks,
    )
