"""``fsdpqdiag fix``: verify workarounds bit for bit and show the unfixed run beside them."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fsdpqdiag.analyses.fix_verify import TARGETS  # imports no torch
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
    run_library,
)
from fsdpqdiag.fixes import FIXES

FIX_EXIT_CODES = (
    "Verdicts: VERIFIED bit-identical to training without FSDP; NOT VERIFIED diverges; STATE LOST "
    "bit-identical training but a checkpoint loses state it needs (the int8 row scales, SCB); NO FIX "
    "NEEDED the unfixed row already matches. "
    "Exit codes: 0 every workaround VERIFIED (or none needed); 1 a workaround NOT VERIFIED or STATE LOST; "
    "2 bad input (nothing run, "
    "nothing written); 3 a workaround run ended in ERROR, TIMEOUT, CRASHED or UNSUPPORTED; 130 interrupted "
    "(143 / 129 after SIGTERM / SIGHUP)."
)


@app.command(epilog=FIX_EXIT_CODES)
def fix(
    workaround: Annotated[
        list[str] | None,
        typer.Option(
            "--workaround",
            "-w",
            help=choices_help("Workaround to verify (repeatable):", [*FIXES, "all"]),
        ),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            help=choices_help(
                "What is trained (repeatable): linear is one Linear4bit + LoRA, tiny-llama the preset "
                "+ PEFT LoRA:",
                TARGETS,
            ),
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps compared bit for bit.")] = 3,
    ws: WorldSizes = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 600.0,
    inject: Inject = None,
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Verify workarounds bit for bit against training without FSDP (loss, LoRA grads, K steps)."""

    quiet = check_outputs(json_path, markdown_path) or quiet
    report = run_library(
        lambda session, progress: session.fix(
            workarounds=workaround or ("all",),
            targets=target or ("linear",),
            steps=steps,
            world_sizes=ws or (),
            device=device,
            timeout_s=timeout,
            inject=inject,
            backend=backend,
            argv=["fix", *sys.argv[2:]],
            on_progress=progress,
        )
    )
    raise end_command(report, json_path, markdown_path, quiet, wide)
