"""``fsdpqdiag matrix``: #1945's configuration-invariance sweep, with the conclusion computed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fsdpqdiag.analyses.matrix.cells import DEFAULT_CELLS  # imports no torch
from fsdpqdiag.cli.app import (
    Backend,
    Device,
    Inject,
    JsonPath,
    MarkdownPath,
    Quiet,
    Timeout,
    Wide,
    WorldSizes,
    app,
    check_outputs,
    choices_help,
    end_command,
    model_files,
    run_library,
    stderr,
    write_outputs,
)
from fsdpqdiag.report.model import EXIT_CODES_HELP


@app.command(epilog=EXIT_CODES_HELP)
def matrix(
    cells: Annotated[
        list[str] | None,
        typer.Option(
            "--cells", help=choices_help("Cells to run (repeatable):", [c.name for c in DEFAULT_CELLS])
        ),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="DIM=v1,v2 over cell A: quant_storage, quant_type, reshard_after_forward, "
            "double_quant, mp, wrap (repeatable: the product).",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Local Hugging Face causal-LM directory.")] = None,
    # None means "not given": --resume then keeps what the sweep recorded.
    preset: Annotated[
        str | None, typer.Option(help="tiny-llama | tinyllama-1.1b (when no --model). Default: tiny-llama.")
    ] = None,
    lora: Annotated[
        bool | None,
        typer.Option("--lora/--no-lora", help="Wrap with PEFT LoRA, as #1945's matrix did (default)."),
    ] = None,
    ws: WorldSizes = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 900.0,
    inject: Inject = None,
    isolate_cells: Annotated[bool, typer.Option(help="One launch per cell (the slow, naive way).")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Directory: one JSON line per cell as it finishes.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the sweep recorded in this --out directory.")
    ] = None,
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    csv: Annotated[Path | None, typer.Option(help="Write the cells as CSV (pandas; - for stdout).")] = None,
    parquet: Annotated[Path | None, typer.Option(help="Write the cells as Parquet (needs pyarrow).")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG heat map of |Δloss| and differing elements.")
    ] = None,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Sweep #1945's cells A–G and H, I (A without the bf16 cast: an empty MixedPrecisionPolicy,
    and no mp_policy at all), or a --grid; compute what the outcome is invariant in, and
    whether it needs the cast. A configuration FSDP2 refuses is REFUSED: its answer, not an ERROR."""
    quiet = _check_matrix_outputs(json_path, markdown_path, csv, parquet, plot, resume or out, model) or quiet
    report = _run_with_progress(
        cells=cells or (),
        grid=grid or (),
        model=model,
        preset=preset,
        lora=lora,
        world_sizes=ws or (),
        device=device,
        timeout_s=timeout,
        inject=inject,
        backend=backend,
        isolate_cells=isolate_cells,
        out_dir=str(out) if out else None,
        resume=str(resume) if resume else None,
        argv=["matrix", *sys.argv[2:]],
    )

    def after_the_report() -> None:
        _note_what_resume_set_aside(report, resume)
        _write_cell_outputs(report, csv, parquet, plot)

    # Under torchrun, every rank leaves only once rank 0 has written (``launch.leave_job``).
    raise end_command(report, json_path, markdown_path, quiet, wide, after_outputs=after_the_report)


def _check_matrix_outputs(json_path, markdown_path, csv, parquet, plot, sweep_dir, model) -> bool:
    """True when an output is stdout (no table then). The sweep's own record is read back
    by --resume: no other output may land on it."""
    to_stdout = check_outputs(
        json_path,
        markdown_path,
        csv,
        binary=(parquet, plot),
        inputs=((sweep_dir / "cells.jsonl",) if sweep_dir is not None else ()) + model_files(model),
    )
    if parquet is not None:
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            from fsdpqdiag.cli.app import fail

            raise fail("--parquet needs pyarrow, which is not installed")
    return to_stdout


def _run_with_progress(**options):
    """``api.matrix(**options)`` with a progress bar that names each cell's verdict."""
    from rich.progress import Progress

    from fsdpqdiag.analyses import matrix as mx

    # Off a terminal a transient bar draws nothing but a blank line, which would make a
    # refusal two lines on stderr.
    with Progress(console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        bar = progress.add_task("matrix", total=None)

        def on_cell(name: str, row: dict) -> None:
            progress.update(bar, advance=1, description=f"cell {name}: {mx.cell_verdict(row)}")
            if not stderr.is_terminal:  # a pipe or a CI log: one line per cell as it finishes
                stderr.print(f"cell {name}: {mx.cell_verdict(row)}", highlight=False, soft_wrap=True)

        return run_library(
            lambda session, status: session.matrix(**options, on_progress=status, on_cell=on_cell)
        )


def _write_cell_outputs(report, csv, parquet, plot) -> None:
    """The cells as CSV / Parquet / heat map."""
    from fsdpqdiag.analyses import matrix as mx
    from fsdpqdiag.render.matrix_table import heat_map

    cells_used = list(dict.fromkeys(mx.Cell(**r.config["cell"]) for r in report.results))
    rows = {
        ws_: {r.config["cell"]["name"]: r.evidence for r in report.results if r.world_size == ws_}
        for ws_ in report.world_sizes
    }
    frame = mx.dataframe(cells_used, rows)
    write_outputs((csv, lambda: frame.to_csv(index=False)), (parquet, frame.to_parquet))
    if plot is not None:
        heat_map(report, plot)


def _note_what_resume_set_aside(report, resume: Path | None) -> None:
    """A resumed sweep whose record held a torn line or bad records says so: those cells
    were run again, and the lines are kept in cells.rejected.jsonl."""
    recovered = report.analysis.get("resume") or {}
    rejected = recovered.get("rejected_records") or []
    if not (rejected or recovered.get("torn_line_truncated")):
        return
    parts = (
        [f"{len(rejected)} bad record(s) (lines {', '.join(str(r['line']) for r in rejected)})"]
        if rejected
        else []
    )
    if recovered.get("torn_line_truncated"):
        parts.append("a torn last line")
    stderr.print(
        f"resume: set aside {' and '.join(parts)} of {resume}/cells.jsonl into cells.rejected.jsonl; "
        "those cells were run again",
        highlight=False,
    )
