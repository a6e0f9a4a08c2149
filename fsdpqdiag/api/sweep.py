"""``matrix``: the configuration-invariance sweep, its on-disk record and ``--resume``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

from fsdpqdiag.analyses.matrix.task import NAME as MATRIX_TASK
from fsdpqdiag.api import memory
from fsdpqdiag.api.checks import (
    BadInput,
    merged,
    require_stack,
    run_configs,
)
from fsdpqdiag.api.running import (
    attribute,
    unsupported,
)
from fsdpqdiag.launcher.session import LaunchSession, in_session
from fsdpqdiag.rank import job_store
from fsdpqdiag.report.commands import MATRIX
from fsdpqdiag.report.model import ProbeResult, Report


@in_session
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
    *,
    session: LaunchSession,
) -> Report:
    """The configuration-invariance matrix at each world size, with the invariance analysis.

    ``preset`` (tiny-llama) and ``lora`` (True) are None when not given, so that ``resume``
    can tell an option the user asked for from a default: a resumed sweep runs exactly the
    plan in its record's header, and an option that contradicts it is refused."""
    from pathlib import Path

    from fsdpqdiag.stack.models import DEFAULT_PRESET, ModelSourceError, resolve_model

    if resume is not None and out_dir is not None and Path(resume).resolve() != Path(out_dir).resolve():
        raise BadInput.about(
            "{resume=0} continues the sweep in its own directory; drop {out_dir=1}", resume, out_dir
        )
    writes_record = (resume or out_dir) is not None and os.environ.get("RANK", "0") == "0"

    # Under torchrun's agents every rank runs what rank 0 read (the other nodes' disks need not
    # hold the record, nor see rank 0's appends at the same moment).
    asked = (cells, grid, world_sizes, device, backend, model, preset, lora, inject)
    recovered = job_store.share_from_rank_0(
        "matrix", lambda: _read_record(resume, out_dir, writes_record, asked), timeout_s
    )
    if recovered is not None:
        plan = recovered.plan
        selected = plan.cell_list()
        world_sizes, device, backend, inject = plan.world_sizes, plan.device, plan.backend, plan.inject
        model, preset, lora = plan.model, plan.preset, plan.lora
    else:
        selected = _selected_cells(cells, grid)
        preset = preset or DEFAULT_PRESET
        lora = True if lora is None else lora
    runs = run_configs(world_sizes, device, backend, timeout_s, inject)
    directory = resume or out_dir
    on_progress = memory.noting(on_progress, memory.check_model(model, preset, runs))
    require_stack(session)
    try:
        model_path = resolve_model(model, preset)  # builds the preset once, before any rank
    except ModelSourceError as exc:
        raise BadInput(str(exc)) from exc
    # Every check passed: only now is anything written.
    if writes_record:
        _write_record(directory, recovered, selected, runs, model, preset, lora, inject)
    sweep = _Sweep(
        selected,
        base_config={"model": str(model_path), "lora": lora, "out_dir": directory},
        label=model or preset,
        lora=lora,
        isolate_cells=isolate_cells,
        done=recovered.done if recovered is not None else {},
        on_progress=on_progress,
        on_cell=on_cell,
        session=session,
    )
    for run in runs:
        sweep.run(run)
    analysis = sweep.analysis()
    if recovered is not None:
        analysis["resume"] = recovered.summary()
    results, checks = sweep.results, sweep.checks
    return Report(MATRIX.name, list(argv), session.stack(), results, analysis=analysis, preflight=checks)


def _read_record(resume: str | None, out_dir: str | None, writes_record: bool, asked: tuple):
    """The sweep to resume, checked against the options ``asked``; or, for a new sweep that
    this process records, its --out checked. Read on the disk of the rank that writes it."""
    from pathlib import Path

    if resume is None:
        if out_dir is not None and writes_record:
            _check_new_sweep_dir(Path(out_dir))
        return None
    found = _recover_sweep(Path(resume))
    _refuse_conflicts(found.plan, resume, *asked)
    return found


def _selected_cells(cells: Sequence[str], grid: Sequence[str]) -> list:
    from fsdpqdiag.analyses import matrix as mx

    try:
        return mx.select_cells(cells, grid)
    except BadInput:
        raise
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def _write_record(directory: str, recovered, selected, runs, model, preset, lora, inject) -> None:
    """Repair the record of a resumed sweep, or start the record of a new one."""
    from pathlib import Path

    from fsdpqdiag.analyses import matrix as mx

    path = Path(directory)
    if recovered is not None:
        mx.repair(path, recovered)
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput.about("cannot create {out_dir} directory {0}: {1}", directory, exc.strerror) from exc
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


@dataclasses.dataclass
class _Sweep:
    """The selected cells at each world size: the preflight, then the cells (none where the
    preflight leaves the stack unable to separate the bug from itself), one result each."""

    selected: list
    base_config: dict[str, Any]
    label: str | None
    lora: bool
    isolate_cells: bool
    done: dict
    on_progress: Callable[[str], None] | None
    on_cell: Callable[[str, dict], None] | None
    session: LaunchSession
    rows_by_ws: dict[int, dict[str, dict]] = dataclasses.field(default_factory=dict)
    results: list[ProbeResult] = dataclasses.field(default_factory=list)
    checks: list[dict] = dataclasses.field(default_factory=list)

    def run(self, run) -> None:
        from fsdpqdiag.analyses import matrix as mx
        from fsdpqdiag.analyses import preflight as stack
        from fsdpqdiag.launcher import batch

        subject = {"model": {"model": self.base_config["model"], "label": self.label, "lora": self.lora}}
        if self.on_progress:  # one launch: the preflight, then the cells
            self.on_progress(
                f"preflight and {len(self.selected)} cells at world size {run.world_size} "
                f"on {run.device}/{run.backend}"
            )
        decided: dict[str, Any] = {}

        def refuses_the_cells(part) -> bool:
            # The preflight leads the cells' launch: a launch costs seconds of imports.
            decided["checked"] = stack.run_preflight(
                run, subject, self.session.run_task, part.outcomes, part.duration_s
            )
            decided["refused"] = unsupported(MATRIX_TASK, {}, run, decided["checked"])
            return decided["refused"] is not None

        rows = mx.sweep(
            self.selected,
            run,
            self.base_config,
            self.session.run_task,
            isolate=self.isolate_cells,
            done=self.done,
            on_cell=self.on_cell,
            lead=(batch.Item(stack.NAME, stack.NAME, subject), refuses_the_cells),
        )
        self.checks.append(decided["checked"])
        refused = decided["refused"]
        if refused is not None:
            # No cell can separate the bug from the stack here. A cell that ran beside the
            # preflight keeps its row as evidence, not as its row.
            rows = {
                cell.name: {
                    "status": "unsupported",
                    "error": refused.summary,
                    **({"measured": rows[cell.name]} if cell.name in rows else {}),
                }
                for cell in self.selected
            }
        self.rows_by_ws[run.world_size] = rows
        for cell in self.selected:
            row = rows[cell.name]
            result = ProbeResult(
                probe=MATRIX_TASK,
                verdict=mx.cell_verdict(row),
                world_size=run.world_size,
                device=run.device,
                backend=run.backend,
                config={"cell": dataclasses.asdict(cell), "lora": self.lora, "model": self.label},
                injected=run.inject,
                summary=row.get("error") or cell.describe() or "defaults",
                evidence=({**row, **refused.evidence} if refused is not None else row),
            )
            attribute(MATRIX_TASK, result, run, signal=row.get("signal"))
            self.results.append(result)

    def analysis(self) -> dict[str, Any]:
        """Two readings of "the outcome": the exact loss bits and byte-diff pattern, and the
        verdict (does the bug show?), which a different baseline model does not move."""
        from fsdpqdiag.analyses import matrix as mx

        analysis: dict[str, Any] = {
            str(ws): {
                "exact": mx.invariance(mx.table_rows(self.selected, rows)),
                "verdict": mx.invariance(mx.table_rows(self.selected, rows, by_verdict=True)),
            }
            for ws, rows in self.rows_by_ws.items()
        }
        analysis["isolate_cells"] = self.isolate_cells
        return analysis


def _recover_sweep(directory) -> Any:
    from fsdpqdiag.analyses import matrix as mx

    record = directory / mx.RECORD_NAME
    if not record.is_file():
        raise BadInput.about("{resume=0}: no {1} there to resume from", str(directory), mx.RECORD_NAME)
    if not os.access(directory, os.W_OK) or not os.access(record, os.W_OK):
        raise BadInput.about(
            "{resume=0}: {1} or its directory is not writable", str(directory), mx.RECORD_NAME
        )
    try:
        return mx.recover(directory)
    except mx.SweepRecordError as exc:
        raise BadInput.about(
            "{resume=0}: {1} cannot be resumed: {2}; start the sweep again with {out_dir}",
            str(directory),
            record,
            exc,
        ) from exc
    except OSError as exc:
        raise BadInput.about(
            "{resume=0}: cannot read {1}: {2}", str(directory), record, exc.strerror
        ) from exc


def _refuse_conflicts(
    plan, resume, cells, grid, world_sizes, device, backend, model, preset, lora, inject
) -> None:
    """BadInput when a parameter given with ``resume`` contradicts the recorded plan: the
    recorded rows answer the recorded plan only (a LoRA sweep's rows are not rows without LoRA)."""
    from pathlib import Path

    from fsdpqdiag.analyses import matrix as mx

    asked: list[tuple[str, Any, Any]] = []  # (parameter, recorded, requested)
    if cells or grid:
        try:
            requested = [dataclasses.asdict(c) for c in mx.select_cells(cells, grid)]
        except BadInput:
            raise
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        if requested != plan.cells:
            asked.append(("cells/grid", [c["name"] for c in plan.cells], [c["name"] for c in requested]))
    if world_sizes:
        asked.append(("world_sizes", plan.world_sizes, merged(world_sizes)))
    if device != "auto":
        asked.append(("device", plan.device, device))
    if backend != "auto":
        asked.append(("backend", plan.backend, backend))
    if model is not None:
        asked.append(("model", plan.model, str(Path(model).resolve())))
    if preset is not None:
        asked.append(("preset", plan.preset, preset))
    if lora is not None:
        asked.append(("lora", plan.lora, lora))
    if inject is not None:
        asked.append(("inject", plan.inject, inject))
    for parameter, recorded, requested in asked:
        if requested != recorded:
            raise BadInput.about(
                (
                    "{resume=0}: the sweep was recorded with {option=1}, this command asks for "
                    "{option=2}; leave {option} out to continue it"
                ).replace("option", parameter),
                resume,
                recorded,
                requested,
            )


def _check_new_sweep_dir(path) -> None:
    """A new sweep's --out must not hold another sweep (its records would mix with this
    one's) and must be creatable; nothing is created here."""
    from fsdpqdiag.analyses import matrix as mx

    if (path / mx.RECORD_NAME).exists():
        raise BadInput.about(
            "{out_dir=0} already holds a sweep ({1}): {resume=0} continues it, or choose another directory",
            str(path),
            mx.RECORD_NAME,
        )
    if path.exists() and not path.is_dir():
        raise BadInput.about("{out_dir=0} is not a directory", str(path))
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput.about(
            "cannot create {out_dir} directory {0}: {1} is not writable", str(path), existing
        )
