"""``fsdpqdiag reproduce``: bitsandbytes #1945's two reproducers with byte evidence."""

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
    bad_input,
    check_outputs,
    choices_help,
    end_command,
    fail,
    run_library,
)
from fsdpqdiag.errors import BadInput
from fsdpqdiag.report.model import EXIT_CODES_HELP
from fsdpqdiag.tasks import PROBES  # imports no torch: --help stays fast


@app.command(epilog=EXIT_CODES_HELP)
def reproduce(
    probe: Annotated[
        list[str] | None,
        typer.Option(
            "--probe", "-p", help=choices_help("Probe to run (repeatable); all by default:", PROBES)
        ),
    ] = None,
    ws: WorldSizes = None,
    device: Device = "auto",
    backend: Backend = "auto",
    timeout: Timeout = 300.0,
    inject: Inject = None,
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    in_features: Annotated[int, typer.Option(help="Linear4bit input features.")] = 1024,
    out_features: Annotated[int, typer.Option(help="Linear4bit output features.")] = 1024,
    quant_type: Annotated[str, typer.Option(help="nf4 | fp4.")] = "nf4",
    quant_storage: Annotated[
        str, typer.Option(help="Packed storage dtype (bf16, fp16, fp32, uint8).")
    ] = "bf16",
    compute_dtype: Annotated[str, typer.Option(help="Linear4bit compute dtype.")] = "bf16",
    param_dtype: Annotated[str, typer.Option(help="MixedPrecisionPolicy param_dtype (or none).")] = "bf16",
    reduce_dtype: Annotated[str, typer.Option(help="MixedPrecisionPolicy reduce_dtype (or none).")] = "fp32",
    double_quant: Annotated[bool, typer.Option(help="Double quantization (compress_statistics).")] = True,
    bias: Annotated[bool, typer.Option(help="Give the layer a bias.")] = False,
    weight_seed: Annotated[int, typer.Option(help="Seed of the weight.")] = 42,
    input_seed: Annotated[int, typer.Option(help="Seed of the input.")] = 123,
    batch: Annotated[int, typer.Option(help="Rows of the input.")] = 2,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Run bitsandbytes #1945's reproducers (Mechanisms A and B) with byte-level evidence."""
    from fsdpqdiag.core.config import LinearConfig, canonical_dtype

    quiet = check_outputs(json_path, markdown_path) or quiet
    try:
        linear = LinearConfig(
            in_features=in_features,
            out_features=out_features,
            quant_type=quant_type,
            compute_dtype=canonical_dtype(compute_dtype),
            quant_storage=canonical_dtype(quant_storage),
            double_quant=double_quant,
            bias=bias,
            weight_seed=weight_seed,
            input_seed=input_seed,
            batch=batch,
            param_dtype=canonical_dtype(param_dtype, allow_none=True),
            reduce_dtype=canonical_dtype(reduce_dtype, allow_none=True),
        )
        linear.validate()
    except BadInput as exc:
        raise bad_input(exc) from None
    except ValueError as exc:
        raise fail(str(exc)) from None

    report = run_library(
        lambda session, progress: session.reproduce(
            probes=probe or (),
            linear=linear,
            world_sizes=ws or (),
            device=device,
            timeout_s=timeout,
            inject=inject,
            backend=backend,
            argv=["reproduce", *sys.argv[2:]] if len(sys.argv) > 1 else ["reproduce"],
            on_progress=progress,
        )
    )
    raise end_command(report, json_path, markdown_path, quiet, wide)
