"""The library behind the CLI: every command is a function returning a ``Report``.

Input a user can get wrong is checked here first (``BadInput``), before any rank starts
or any file is written; what the stack under test does becomes a ``ProbeResult``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from fsdpqdiag import attribution

# Importing fsdpqdiag.tasks registers every rank task: a task run in this process (under
# torchrun, ``rank.run_in_job``) is looked up in the registry it fills.
from fsdpqdiag import tasks as _every_task  # noqa: F401
from fsdpqdiag.config import BACKENDS, DEVICES, LinearConfig, RankTask, RunConfig
from fsdpqdiag.report import SKIPPED, UNSUPPORTED, ProbeResult, Report


class BadInput(ValueError):
    """A mistake in what the user asked for: one line, exit 2, nothing run or written."""


def require_stack() -> None:
    """torch with distributed support and an importable bitsandbytes, or a one-line error."""
    if importlib.util.find_spec("torch") is None:
        raise BadInput("torch is not installed")
    import torch.distributed

    if not torch.distributed.is_available():
        raise BadInput("this torch build has no distributed support (torch.distributed)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInput("bitsandbytes is not installed: pip install bitsandbytes")
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes import cextension
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"bitsandbytes does not import: {type(exc).__name__}: {exc}") from exc
    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    if mock is not None and isinstance(getattr(cextension, "lib", None), mock):
        # bitsandbytes imports without its native library and fails only at the first kernel
        # call; a diagnosis on such a stack would blame FSDP2 for a broken install.
        first_line = (getattr(cextension.lib, "error_msg", "") or "").strip().splitlines()
        detail = first_line[0] if first_line else "no native library could be loaded"
        raise BadInput(f"bitsandbytes has no usable native library: {detail}")
    from fsdpqdiag import bnb_cpu_path

    try:
        bnb_cpu_path.override()
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str) -> str:
    if requested not in DEVICES:
        raise BadInput(f"unknown device {requested!r} (known: {', '.join(DEVICES)})")
    gpus = visible_gpus()
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    if requested == "cuda" and gpus == 0:
        raise BadInput("--device cuda, but no CUDA GPU is visible")
    return requested


def default_world_size(device: str) -> int:
    """2 where the devices allow, since FSDP2 shards for real only above world size 1."""
    if device == "cuda":
        return 2 if visible_gpus() >= 2 else 1
    return 2


def resolve_backend(requested: str, device: str) -> str:
    if requested not in BACKENDS:
        raise BadInput(f"unknown backend {requested!r} (known: {', '.join(BACKENDS)})")
    if requested == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if requested == "nccl" and device != "cuda":
        raise BadInput("--backend nccl needs --device cuda")
    return requested


def check_world_size(world_size: int, device: str, backend: str | None = None) -> None:
    if world_size < 1:
        raise BadInput(f"--ws must be >= 1, got {world_size}")
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if device == "cuda" and backend == "nccl" and world_size > visible_gpus():
        raise BadInput(
            f"--ws {world_size} needs {world_size} GPUs with NCCL, but {visible_gpus()} are visible "
            "(--backend gloo lets ranks share GPUs)"
        )


def check_inject(inject: str | None) -> None:
    from fsdpqdiag import faults

    if inject is not None and inject not in faults.FAULTS:
        raise BadInput(f"unknown fault {inject!r} for --inject (known: {', '.join(faults.FAULTS)})")


def check_probes(names: Sequence[str]) -> list[str]:
    from fsdpqdiag.tasks import PROBES

    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise BadInput(f"unknown probe {unknown[0]!r} (known: {', '.join(PROBES)})")
    return merged(names) or list(PROBES)


def merged(values: Sequence) -> list:
    """A repeatable option's values with repeats merged, in first-seen order: asking twice
    for the same probe or world size asks for it once, not for the same work twice."""
    return list(dict.fromkeys(values))


def run_probe(name: str, probe_config: dict, run: RunConfig) -> ProbeResult:
    """Launch one probe on ``run.world_size`` ranks and decide its verdict."""
    from fsdpqdiag.launch import run_task
    from fsdpqdiag.tasks import get_probe

    unmet = get_probe(name).needs.unmet(run)
    if unmet is not None:
        return _skipped(name, probe_config, run, unmet)
    started = time.monotonic()
    outcomes = run_task(RankTask(probe=name, probe_config=probe_config, run=run))
    return _decide(name, probe_config, run, outcomes, time.monotonic() - started)


def run_probes(
    names: Sequence[str],
    probe_config: dict,
    run: RunConfig,
    on_start: Callable[[str], None] | None = None,
) -> list[ProbeResult]:
    """Several probes in as few launches as their failures allow (see ``fsdpqdiag.batch``):
    one launch for all, and after a rank dies, hangs or raises inside a probe, a fresh
    launch from the probe after it."""
    return run_checked(names, probe_config, run, None, on_start)[0]


def run_checked(
    names: Sequence[str],
    probe_config: dict,
    run: RunConfig,
    subject: dict | None,
    on_start: Callable[[str], None] | None = None,
) -> tuple[list[ProbeResult], dict | None]:
    """``run_probes`` led by the stack preflight of ``subject`` (unless None) in the same
    launch, and the preflight: a launch costs seconds of imports, the preflight's own work
    a fraction of one. A probe whose preconditions failed is UNSUPPORTED, run or not: one
    that shared the preflight's launch already ran, one after it is not run."""
    from fsdpqdiag import batch
    from fsdpqdiag import preflight as stack
    from fsdpqdiag.launch import run_task
    from fsdpqdiag.tasks import get_probe

    results: dict[str, ProbeResult] = {}
    for name in names:
        unmet = get_probe(name).needs.unmet(run)
        if unmet is not None:
            results[name] = _skipped(name, probe_config, run, unmet)
    pending = [n for n in names if n not in results]
    items = [batch.Item(stack.NAME, stack.NAME, subject)] if subject is not None else []
    items += [batch.Item(name, name, probe_config) for name in pending]
    checked: dict | None = None

    def settle(parts: list[batch.ProbeOutcomes]) -> list[str]:
        nonlocal checked
        for part in parts:
            if part.probe == stack.NAME:
                # Where the launch died inside it, the preflight relaunches for the rest.
                checked = stack.run_preflight(run, subject, part.outcomes, part.duration_s)
            else:
                results[part.probe] = _decide(
                    part.probe, probe_config, run, part.outcomes, part.duration_s, checked
                )
        if checked is None:
            return []
        # Not run: a probe whose preconditions failed in the preflight.
        ran = {part.probe for part in parts}
        refused = [n for n in pending if n not in ran and n not in results]
        refused = [n for n in refused if unsupported(n, probe_config, run, checked)]
        for name in refused:
            results[name] = unsupported(name, probe_config, run, checked)
        return refused

    new_watch = (lambda: batch.watch_progress(on_start)) if on_start else None
    batch.run_resilient(items, run, run_task, settle, new_watch)
    if checked is not None:
        for name, result in list(results.items()):
            refused = result.verdict != UNSUPPORTED and unsupported(name, probe_config, run, checked)
            if refused:
                # It ran beside the preflight: its own verdict is kept as evidence, not as the verdict.
                refused.evidence["measured"] = {"verdict": result.verdict, "summary": result.summary}
                refused.ranks, refused.duration_s = result.ranks, result.duration_s
                results[name] = refused
    return [results[name] for name in names], checked


def preflight(run: RunConfig, subject: dict, on_progress: Callable[[str], None] | None = None) -> dict:
    """The stack preflight of one run (see ``fsdpqdiag.preflight``): what each report carries."""
    from fsdpqdiag import preflight as stack

    if on_progress:
        on_progress(f"preflight at world size {run.world_size} on {run.device}/{run.backend}")
    return stack.run_preflight(run, subject)


def unsupported(name: str, probe_config: dict, run: RunConfig, checked: dict) -> ProbeResult | None:
    """UNSUPPORTED for a probe whose preconditions failed in the preflight ``checked``, or None.

    Such a probe is not run: on a stack that fails with ordinary tensors it could only
    report the stack's failure as the bug's.
    """
    from fsdpqdiag import preflight as stack
    from fsdpqdiag.tasks import get_probe

    probe = get_probe(name)
    if probe.needs.unmet(run) is not None:
        return None  # SKIPPED says more: the probe cannot run here at all
    decided = stack.unsupported_verdict(name, probe.preconditions, checked, run)
    if decided is None:
        return None
    _attribute(name, decided, run)
    return ProbeResult(
        verdict=decided.verdict,
        summary=decided.summary,
        evidence=decided.evidence,
        reason=decided.summary,
        **_common(name, probe_config, run),
    )


def _run_checked(name: str, probe_config: dict, run: RunConfig, checked: dict) -> ProbeResult:
    return unsupported(name, probe_config, run, checked) or run_probe(name, probe_config, run)


def _one_checked(name: str, probe_config: dict, run: RunConfig, subject: dict) -> tuple[ProbeResult, dict]:
    """One probe, led by the preflight in its launch."""
    (result,), checked = run_checked([name], probe_config, run, subject)
    return result, checked


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


def _attribute(name: str, decided, run: RunConfig, signal: str | None = None) -> None:
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
    _attribute(name, decided, run, signal=next((o.signal for o in outcomes if o.signal), None))
    return ProbeResult(
        verdict=decided.verdict,
        summary=decided.summary,
        evidence=decided.evidence,
        ranks=[o.to_dict() for o in outcomes],
        reason=decided.summary if decided.verdict not in ("REPRODUCED", "NOT REPRODUCED") else None,
        duration_s=round(duration_s, 3),
        **_common(name, probe_config, run),
    )


def _runs(
    world_sizes: Sequence[int], device: str, backend: str, timeout_s: float, inject: str | None
) -> list[RunConfig]:
    """Validated run configurations, one per world size, or BadInput."""
    from fsdpqdiag.launch import check_job_environment

    try:
        check_job_environment()
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    check_inject(inject)
    resolved = resolve_device(device)
    resolved_backend = resolve_backend(backend, resolved)
    sizes = merged(world_sizes) or [default_world_size(resolved)]
    for world_size in sizes:
        check_world_size(world_size, resolved, resolved_backend)
    # nan compares false with everything, so "<= 0" alone let it through to the ranks.
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise BadInput(f"--timeout must be > 0 and finite, got {timeout_s}")
    return [
        RunConfig(
            world_size=ws, device=resolved, timeout_s=timeout_s, inject=inject, backend=resolved_backend
        )
        for ws in sizes
    ]


def _linear(linear: LinearConfig | None) -> LinearConfig:
    linear = linear or LinearConfig()
    try:
        linear.validate()
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    return linear


def _check_storage_pairs(linear: LinearConfig) -> None:
    """storage-dtype-mismatch packs the layer in every storage dtype of its pairs, not only
    in --quant-storage: a geometry one of them cannot hold is refused here, not per rank."""
    from fsdpqdiag.config import packing_problem
    from fsdpqdiag.probes.storage_dtype_mismatch import combinations

    for storage, _ in combinations(dataclasses.asdict(linear)):
        problem = packing_problem(linear.in_features, linear.out_features, storage)
        if problem:
            raise BadInput(f"{problem} (the storage-dtype-mismatch probe also packs it as {storage})")


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
) -> Report:
    """Run the selected probes (all by default) at each world size, all of one world size in
    one launch (relaunching after a probe that kills it)."""
    from fsdpqdiag import env

    require_stack()
    linear = _linear(linear)
    names = check_probes(probes)
    if "storage-dtype-mismatch" in names:
        _check_storage_pairs(linear)
    probe_config = dataclasses.asdict(linear)
    results, checks = [], []
    for run in _runs(world_sizes, device, backend, timeout_s, inject):

        def on_start(name: str, run: RunConfig = run) -> None:
            if on_progress:
                on_progress(f"{name} at world size {run.world_size} on {run.device}/{run.backend}")

        ran, checked = run_checked(names, probe_config, run, {"linear": probe_config}, on_start)
        checks.append(checked)
        results.extend(ran)
    return Report(command="reproduce", argv=list(argv), env=env.capture(), results=results, preflight=checks)


def localize(
    linear: LinearConfig | None = None,
    world_sizes: Sequence[int] = (1,),
    device: str = "auto",
    timeout_s: float = 300.0,
    inject: str | None = None,
    backend: str = "auto",
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
) -> Report:
    """Replay FSDP2's unshard path stage by stage on every bf16 NaN pattern."""
    from fsdpqdiag import env

    require_stack()
    linear = _linear(linear or LinearConfig(in_features=256, out_features=256))
    # The payload plants every bf16 NaN pattern (2 signs x 127 non-zero mantissas) in the
    # packed bf16 storage; a smaller layer would replay without them and prove nothing.
    nan_patterns = 254
    containers = (linear.in_features * linear.out_features + 1) // 2 // 2
    if containers < nan_patterns:
        raise BadInput(
            f"a {linear.out_features}x{linear.in_features} layer packs into {containers} bf16 containers; "
            f"the payload needs {nan_patterns} (in_features * out_features >= {nan_patterns * 4})"
        )
    runs = _runs(world_sizes, device, backend, timeout_s, inject)
    results, checks = [], []
    for run in runs:
        if on_progress:
            on_progress(f"localize at world size {run.world_size} on {run.device}/{run.backend}")
        config = dataclasses.asdict(linear)
        result, checked = _one_checked("localize", config, run, {"linear": config})
        checks.append(checked)
        results.append(result)
    return Report(command="localize", argv=list(argv), env=env.capture(), results=results, preflight=checks)


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
) -> Report:
    """Verify each workaround bit for bit next to the unfixed run, per target and world size."""
    from fsdpqdiag import env, fixes
    from fsdpqdiag.fix_verify import TARGETS

    require_stack()
    names = list(fixes.FIXES) if "all" in workarounds or not workarounds else merged(workarounds)
    targets = merged(targets)
    for name in names:
        if name not in fixes.FIXES:
            raise BadInput(f"unknown workaround {name!r} (known: {', '.join(fixes.FIXES)}, all)")
    for target in targets:
        if target not in TARGETS:
            raise BadInput(f"unknown fix target {target!r} (known: {', '.join(TARGETS)})")
    if steps < 1:
        raise BadInput(f"--steps must be >= 1, got {steps}")
    from fsdpqdiag.models import PRESETS, ModelSourceError, preset_dir

    runs = _runs(world_sizes, device, backend, timeout_s, inject)
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
    results, checks = [], []
    for run in runs:
        checked = preflight(run, subject, on_progress)
        checks.append(checked)
        for target in targets:
            for name in ["none", *names]:
                if on_progress:
                    on_progress(f"{name} on {target} at world size {run.world_size}")
                config = {"workaround": name, "target": target, "steps": steps}
                results.append(_run_checked("fix-verify", config, run, checked))
    return Report(command="fix", argv=list(argv), env=env.capture(), results=results, preflight=checks)


def matrix(
    cells: Sequence[str] = (),
    grid: Sequence[str] = (),
    model: str | None = None,
    preset: str | None = None,
    lora: bool | None = None,
    world_sizes: Sequence[int] = (),
    device: str = "auto",
    timeout_s: float = 600.0,
    inject: str | None = None,
    backend: str = "auto",
    isolate_cells: bool = False,
    out_dir: str | None = None,
    resume: str | None = None,
    argv: Sequence[str] = (),
    on_progress: Callable[[str], None] | None = None,
    on_cell: Callable[[str, dict], None] | None = None,
) -> Report:
    """The configuration-invariance matrix at each world size, with the invariance analysis.

    ``preset`` (tiny-llama) and ``lora`` (True) are None when not given, so that ``resume``
    can tell an option the user asked for from a default: a resumed sweep runs exactly the
    plan in its record's header, and an option that contradicts it is refused."""
    from pathlib import Path

    from fsdpqdiag import env
    from fsdpqdiag import matrix as mx
    from fsdpqdiag.launch import run_task
    from fsdpqdiag.models import DEFAULT_PRESET, ModelSourceError, resolve_model

    require_stack()
    recovered = None
    if resume is not None and out_dir is not None and Path(resume).resolve() != Path(out_dir).resolve():
        raise BadInput(f"--resume {resume} continues the sweep in its own directory; drop --out {out_dir}")
    if resume is not None:
        recovered = _recover_sweep(Path(resume))
        plan = recovered.plan
        _refuse_conflicts(
            plan, resume, cells, grid, world_sizes, device, backend, model, preset, lora, inject
        )
        selected = plan.cell_list()
        world_sizes, device, backend, inject = plan.world_sizes, plan.device, plan.backend, plan.inject
        model, preset, lora = plan.model, plan.preset, plan.lora
    else:
        try:
            selected = mx.select_cells(cells, grid)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        preset = preset or DEFAULT_PRESET
        lora = True if lora is None else lora
    runs = _runs(world_sizes, device, backend, timeout_s, inject)
    directory = resume or out_dir
    writes_record = directory is not None and os.environ.get("RANK", "0") == "0"
    if out_dir is not None and resume is None and writes_record:
        _check_new_sweep_dir(Path(out_dir))
    try:
        model_path = resolve_model(model, preset)  # builds the preset once, before any rank
    except ModelSourceError as exc:
        raise BadInput(str(exc)) from exc
    # Every check passed: only now is anything written.
    if writes_record:
        path = Path(directory)
        if recovered is not None:
            mx.repair(path, recovered)
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BadInput(f"cannot create --out directory {directory}: {exc.strerror}") from exc
            plan = mx.SweepPlan(
                cells=[dataclasses.asdict(c) for c in selected],
                world_sizes=[run.world_size for run in runs],
                device=runs[0].device,
                backend=runs[0].backend,
                model=str(Path(model).resolve()) if model else None,
                preset=preset,
                lora=lora,
                inject=inject,
            )
            mx.start_record(path, plan)
    done = recovered.done if recovered is not None else {}
    base_config = {"model": str(model_path), "lora": lora, "out_dir": directory}
    rows_by_ws: dict[int, dict[str, dict]] = {}
    results: list[ProbeResult] = []
    checks = []
    subject = {"model": {"model": str(model_path), "label": model or preset, "lora": lora}}
    for run in runs:
        checked = preflight(run, subject, on_progress)
        checks.append(checked)
        if on_progress:
            on_progress(f"{len(selected)} cells at world size {run.world_size} on {run.device}/{run.backend}")
        refused = unsupported("matrix", {}, run, checked)
        if refused is not None:
            # No cell can separate the bug from the stack here: none is run.
            rows = {cell.name: {"status": "unsupported", "error": refused.summary} for cell in selected}
        else:
            rows = mx.sweep(
                selected, run, base_config, run_task, isolate=isolate_cells, done=done, on_cell=on_cell
            )
        rows_by_ws[run.world_size] = rows
        for cell in selected:
            row = rows[cell.name]
            result = ProbeResult(
                probe="matrix",
                verdict=mx.cell_verdict(row),
                world_size=run.world_size,
                device=run.device,
                backend=run.backend,
                config={"cell": dataclasses.asdict(cell), "lora": lora, "model": model or preset},
                injected=run.inject,
                summary=row.get("error") or cell.describe() or "defaults",
                evidence=({**row, **refused.evidence} if refused is not None else row),
            )
            _attribute("matrix", result, run, signal=row.get("signal"))
            results.append(result)
    # Two readings of "the outcome": the exact loss bits and byte-diff pattern, and the
    # verdict (does the bug show?), which a different baseline model does not move.
    analysis: dict[str, Any] = {
        str(ws): {
            "exact": mx.invariance(mx.table_rows(selected, rows)),
            "verdict": mx.invariance(mx.table_rows(selected, rows, by_verdict=True)),
        }
        for ws, rows in rows_by_ws.items()
    }
    analysis["isolate_cells"] = isolate_cells
    if recovered is not None:
        analysis["resume"] = recovered.summary()
    report = Report(
        command="matrix",
        argv=list(argv),
        env=env.capture(),
        results=results,
        analysis=analysis,
        preflight=checks,
    )
    return report


def _recover_sweep(directory) -> Any:
    from fsdpqdiag import matrix as mx

    record = directory / mx.RECORD_NAME
    if not record.is_file():
        raise BadInput(f"--resume {directory}: no {mx.RECORD_NAME} there to resume from")
    if not os.access(directory, os.W_OK) or not os.access(record, os.W_OK):
        raise BadInput(f"--resume {directory}: {mx.RECORD_NAME} or its directory is not writable")
    try:
        return mx.recover(directory)
    except mx.SweepRecordError as exc:
        raise BadInput(f"--resume {directory}: {record} cannot be resumed: {exc}") from exc
    except OSError as exc:
        raise BadInput(f"--resume {directory}: cannot read {record}: {exc.strerror}") from exc


def _refuse_conflicts(
    plan, resume, cells, grid, world_sizes, device, backend, model, preset, lora, inject
) -> None:
    """BadInput when an option given with --resume contradicts the recorded plan: resuming a
    LoRA sweep with --no-lora used to reuse the LoRA rows and label them lora: false."""
    from pathlib import Path

    from fsdpqdiag import matrix as mx

    asked: list[tuple[str, Any, Any]] = []  # (option, recorded, requested)
    if cells or grid:
        try:
            requested = [dataclasses.asdict(c) for c in mx.select_cells(cells, grid)]
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        if requested != plan.cells:
            asked.append(("--cells/--grid", [c["name"] for c in plan.cells], [c["name"] for c in requested]))
    if world_sizes:
        asked.append(("--ws", plan.world_sizes, merged(world_sizes)))
    if device != "auto":
        asked.append(("--device", plan.device, device))
    if backend != "auto":
        asked.append(("--backend", plan.backend, backend))
    if model is not None:
        asked.append(("--model", plan.model, str(Path(model).resolve())))
    if preset is not None:
        asked.append(("--preset", plan.preset, preset))
    if lora is not None:
        asked.append(("--lora/--no-lora", plan.lora, lora))
    if inject is not None:
        asked.append(("--inject", plan.inject, inject))

    def shown(option: str, value: Any) -> str:
        if isinstance(value, bool):
            return "--lora" if value else "--no-lora"
        if value is None:
            return f"no {option}"
        if isinstance(value, list):
            return f"{option} {' '.join(str(v) for v in value)}"
        return f"{option} {value}"

    for option, recorded, requested in asked:
        if requested != recorded:
            raise BadInput(
                f"--resume {resume}: the sweep was recorded with {shown(option, recorded)}, this "
                f"command asks for {shown(option, requested)}; leave {option} out to continue it"
            )


def _check_new_sweep_dir(path) -> None:
    """A new sweep's --out must not hold another sweep (its records would mix with this
    one's) and must be creatable; nothing is created here."""
    from fsdpqdiag import matrix as mx

    if (path / mx.RECORD_NAME).exists():
        raise BadInput(
            f"--out {path} already holds a sweep ({mx.RECORD_NAME}): --resume {path} continues it, "
            "or choose another directory"
        )
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {path} is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"cannot create --out directory {path}: {existing} is not writable")


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
) -> Report:
    """Per-module byte forensics of a real quantized causal LM under FSDP2."""
    from fsdpqdiag import env
    from fsdpqdiag.config import QUANT_TYPES
    from fsdpqdiag.models import ModelSourceError, resolve_model

    require_stack()
    if bits not in (4, 8):
        raise BadInput(f"--bits must be 4 or 8, got {bits}")
    if quant_type not in QUANT_TYPES:
        raise BadInput(f"unknown quant type {quant_type!r} (known: {', '.join(QUANT_TYPES)})")
    runs = _runs(world_sizes, device, backend, timeout_s, inject)
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
    results, checks = [], []
    for run in runs:
        if on_progress:
            on_progress(f"forensics at world size {run.world_size} on {run.device}/{run.backend}")
        result, checked = _one_checked("forensics", config, run, subject)
        checks.append(checked)
        result.config["model"] = model or preset
        results.append(result)
    return Report(command="forensics", argv=list(argv), env=env.capture(), results=results, preflight=checks)


def doctor(
    world_size: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    timeout_s: float = 300.0,
    inject: str | None = None,
    model: str | None = None,
    preset: str = "tiny-llama",
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """The stack preflight alone, on one device, backend and world size, for the model under
    test (``--model DIR`` or a preset) wrapped as forensics and the matrix wrap it."""
    from fsdpqdiag.models import ModelSourceError, resolve_model

    require_stack()
    (run,) = _runs([world_size] if world_size is not None else [], device, backend, timeout_s, inject)
    try:
        path = resolve_model(model, preset)
    except ModelSourceError as exc:
        raise BadInput(str(exc)) from exc
    return preflight(run, {"model": {"model": str(path), "label": model or preset}}, on_progress)


def preflight_ok(checked: dict) -> bool:
    return all(capability["ok"] for capability in checked.get("capabilities", []))
