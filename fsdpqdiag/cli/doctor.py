"""``fsdpqdiag doctor``: the stack preflight alone (every report also carries it)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

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
    end_command,
    run_library,
)

DOCTOR_EXIT_CODES = (
    "Exit codes: 0 every capability ok; 2 bad input (nothing run); 3 a capability failed "
    "(probes that rely on it report UNSUPPORTED); 130 interrupted. --json writes the preflight "
    "object of one world size, a list of them for several --ws."
)


@app.command(epilog=DOCTOR_EXIT_CODES)
def doctor(
    ws: WorldSizes = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 300.0,
    inject: Inject = None,
    model: Annotated[
        str | None, typer.Option(metavar="DIR", help="Local Hugging Face causal-LM directory.")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="tiny-llama | tinyllama-1.1b (when no --model).")
    ] = "tiny-llama",
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Can this stack run the probes? Collectives on ordinary tensors, bitsandbytes' kernel path,
    the dtype FSDP2 all-gathers each unit of the model in.

    Example: fsdpqdiag doctor --ws 1 --ws 2 --device cpu --json doctor.json
    """
    from fsdpqdiag.render.preflight_table import checks_markdown_lines

    quiet = check_outputs(json_path, markdown_path) or quiet
    report = run_library(
        lambda session, progress: session.doctor(
            world_sizes=ws or (),
            device=device,
            backend=backend,
            timeout_s=timeout,
            inject=inject,
            model=model,
            preset=preset,
            argv=["doctor", *sys.argv[2:]],
            on_progress=progress,
        )
    )
    checks = report.preflight
    # One world size: its object, as every report's preflight entry; several: a list.
    document = checks[0] if len(checks) == 1 else checks
    outputs = (
        (json_path, lambda: json.dumps(document, indent=2) + "\n"),
        (markdown_path, lambda: "\n".join(checks_markdown_lines(checks)).lstrip("\n") + "\n"),
    )
    raise end_command(report, json_path, markdown_path, quiet, wide, outputs=outputs)
