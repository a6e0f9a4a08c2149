"""``fsdpqdiag doctor``: the stack preflight alone (every report also carries it)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fsdpqdiag.cli.app import Backend, Device, Inject, Timeout, app, is_reporting_rank, run_library, stdout

DOCTOR_EXIT_CODES = (
    "Exit codes: 0 every capability ok; 2 bad input (nothing run); 3 a capability failed "
    "(probes that rely on it report UNSUPPORTED); 130 interrupted."
)


@app.command(epilog=DOCTOR_EXIT_CODES)
def doctor(
    ws: Annotated[
        int | None,
        typer.Option("--ws", help="World size. Default: 2 where the devices allow, else 1."),
    ] = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 300.0,
    inject: Inject = None,
    model: Annotated[str | None, typer.Option(help="Local Hugging Face causal-LM directory.")] = None,
    preset: Annotated[
        str, typer.Option(help="tiny-llama | tinyllama-1.1b (when no --model).")
    ] = "tiny-llama",
    json_out: Annotated[bool, typer.Option("--json", help="Print the preflight as JSON.")] = False,
) -> None:
    """Can this stack run the probes? Collectives on ordinary tensors, bitsandbytes' kernel path,
    the dtype FSDP2 all-gathers each unit of the model in.

    Example: fsdpqdiag doctor --ws 2 --device cpu --json
    """
    from fsdpqdiag import api
    from fsdpqdiag.render.preflight_table import preflight_table
    from fsdpqdiag.report.model import EXIT_CLEAN, EXIT_PROBE_FAILED

    checked = run_library(
        lambda progress: api.doctor(
            world_size=ws,
            device=device,
            backend=backend,
            timeout_s=timeout,
            inject=inject,
            model=model,
            preset=preset,
            on_progress=progress,
        )
    )
    if is_reporting_rank():
        if json_out:
            print(json.dumps(checked, indent=2))
        else:
            stdout.print(preflight_table(checked))
    raise typer.Exit(EXIT_CLEAN if api.preflight_ok(checked) else EXIT_PROBE_FAILED)
