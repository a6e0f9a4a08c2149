"""``fsdpqdiag localize``: the first op of FSDP2's unshard path that alters bytes."""

from __future__ import annotations

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
    app,
    check_outputs,
    end_command,
    run_library,
)
from fsdpqdiag.report.model import EXIT_CODES_HELP


@app.command(epilog=EXIT_CODES_HELP)
def localize(
    ws: Annotated[
        list[int] | None,
        typer.Option("--ws", help="World size of the real-unshard replay (repeatable). Default 1."),
    ] = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 300.0,
    inject: Inject = None,
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    in_features: Annotated[int, typer.Option(help="Payload Linear4bit input features.")] = 256,
    out_features: Annotated[int, typer.Option(help="Payload Linear4bit output features.")] = 256,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Replay FSDP2's unshard op by op on every bf16 NaN pattern; name the first op that alters bytes."""
    from fsdpqdiag.core.config import LinearConfig

    quiet = check_outputs(json_path, markdown_path) or quiet
    report = run_library(
        lambda session, progress: session.localize(
            linear=LinearConfig(in_features=in_features, out_features=out_features),
            world_sizes=ws or (1,),
            device=device,
            timeout_s=timeout,
            inject=inject,
            backend=backend,
            argv=["localize", *sys.argv[2:]],
            on_progress=progress,
        )
    )
    raise end_command(report, json_path, markdown_path, quiet, wide)
