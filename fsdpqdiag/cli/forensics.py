"""``fsdpqdiag forensics``: per-module byte forensics of a real quantized model."""

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
    WorldSizes,
    app,
    check_outputs,
    end_command,
    fail,
    model_files,
    run_library,
)
from fsdpqdiag.report.model import EXIT_CODES_HELP


@app.command(epilog=EXIT_CODES_HELP)
def forensics(
    model: Annotated[str | None, typer.Option(help="Local Hugging Face causal-LM directory.")] = None,
    preset: Annotated[
        str, typer.Option(help="tiny-llama | tinyllama-1.1b (when no --model).")
    ] = "tiny-llama",
    bits: Annotated[int, typer.Option(help="4 (Params4bit) or 8 (Int8Params).")] = 4,
    quant_type: Annotated[str, typer.Option(help="nf4 | fp4.")] = "nf4",
    double_quant: Annotated[bool, typer.Option(help="bnb_4bit_use_double_quant.")] = True,
    quant_storage: Annotated[
        str, typer.Option(help="bnb_4bit_quant_storage (bf16, fp16, fp32, uint8).")
    ] = "bf16",
    lora: Annotated[bool, typer.Option(help="Wrap with PEFT LoRA.")] = False,
    ws: WorldSizes = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 900.0,
    inject: Inject = None,
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """For every quantized weight of a real model: original vs _local_tensor vs forward's vs full_tensor()."""
    from fsdpqdiag.core.config import canonical_dtype

    quiet = (
        check_outputs(json_path, markdown_path, inputs=model_files(model)) or quiet
    )  # a table would mix into a - output
    try:
        storage = canonical_dtype(quant_storage)
    except ValueError as exc:
        raise fail(str(exc)) from None
    report = run_library(
        lambda session, progress: session.forensics(
            model=model,
            preset=preset,
            bits=bits,
            quant_type=quant_type,
            double_quant=double_quant,
            quant_storage=storage,
            lora=lora,
            world_sizes=ws or (),
            device=device,
            timeout_s=timeout,
            inject=inject,
            backend=backend,
            argv=["forensics", *sys.argv[2:]],
            on_progress=progress,
        )
    )
    raise end_command(report, json_path, markdown_path, quiet, wide)
