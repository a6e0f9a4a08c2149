"""``env``, ``report`` and ``compare``: reports made for upstream issues."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fsdpqdiag.cli.app import Wide, app, check_outputs, fail, print_tables, stdout, write_outputs
from fsdpqdiag.cli.streams import STDOUT, is_stdout

COMPARE_EXIT_CODES = "Exit codes: 0 identical; 1 different (listed); 2 incomparable or unreadable."


def report_tables(report, wide: bool = False, path: Path | None = None):
    """The rich view of any report: the table of the command that wrote it, the table of
    probe results for the others. The choice is made here, where commands are wired to
    their renderers (each command prints its own view the same way), so that no renderer
    branches on a command."""
    from fsdpqdiag.render.fix_table import fix_table
    from fsdpqdiag.render.forensics_table import forensics_table
    from fsdpqdiag.render.localize_table import localize_table
    from fsdpqdiag.render.matrix_table import matrix_table
    from fsdpqdiag.render.table import findings_table, reproduce_table

    views = {
        "matrix": matrix_table,
        "fix": fix_table,
        "localize": localize_table,
        "forensics": forensics_table,
        "watch": findings_table,
    }
    from fsdpqdiag.render.conclusion import with_conclusion
    from fsdpqdiag.report.conclusion import conclude

    return with_conclusion(views.get(report.command, reproduce_table)(report, wide), conclude(report, path))


def _load(path: Path):
    from fsdpqdiag.report.model import Report, ReportError

    try:
        return Report.load(path)
    except ReportError as exc:
        raise fail(str(exc)) from None


def _upstream_markdown(loaded, upstream: str) -> str:
    from fsdpqdiag.render import upstream as upstream_view

    try:
        return upstream_view.render(loaded, upstream)
    except ValueError as exc:  # an unknown repository, or nothing attributed to it
        raise fail(str(exc)) from None


@app.command()
def env(
    json_out: Annotated[bool, typer.Option("--json", help="Print the environment as JSON.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print it as a Markdown block.")] = False,
    wide: Wide = False,
) -> None:
    """The stack under test: torch/CUDA/NCCL, bitsandbytes and its native library, GPUs, driver."""
    from fsdpqdiag.rank import env as environment
    from fsdpqdiag.render.env_table import env_markdown, env_table

    captured = environment.capture()
    if json_out:
        stdout.print_json(json.dumps(captured))
        return
    if markdown:
        print(env_markdown(captured))
        return
    print_tables(env_table(captured, wide), wide)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A JSON report written by any fsdpqdiag command.")],
    format: Annotated[str, typer.Option("--format", "-f", help="md | table | json")] = "md",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout (- is stdout).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG byte map of the altered elements.")] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Markdown for one repository's bug template, with only the findings attributed to it "
            "(pytorch, bitsandbytes, transformers, peft, axolotl)."
        ),
    ] = None,
    wide: Wide = False,
) -> None:
    """Render any report: Markdown for an upstream issue, a table, or JSON.

    Example: fsdpqdiag report run.json --upstream bitsandbytes -o issue.md
    """
    if format not in ("md", "table", "json"):
        raise fail(f"unknown format {format!r} (known: md, table, json)")
    if upstream is not None and format != "md":
        raise fail("--upstream renders Markdown only (drop --format)")
    check_outputs(output, inputs=(path,), binary=(plot,))
    loaded = _load(path)
    if plot is not None:
        from fsdpqdiag.render.plot import byte_map

        if byte_map(loaded, plot) == 0:
            raise fail(f"{path} holds no element positions to map")
    if format == "table" and (output is None or is_stdout(output)):
        print_tables(report_tables(loaded, wide, path), wide)
        return
    write_outputs((output or Path(STDOUT), lambda: _rendered(loaded, format, wide, path, upstream)))


def _rendered(loaded, format: str, wide: bool, path: Path, upstream: str | None) -> str:
    if format == "table":
        from rich.console import Console

        console = Console(record=True, width=200, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(report_tables(loaded, wide, path), crop=not wide)
        return console.export_text()
    if format == "md" and upstream is not None:
        text = _upstream_markdown(loaded, upstream)
    elif format == "md":
        from fsdpqdiag.render.markdown import render

        text = render(loaded)
    else:
        text = loaded.to_json()
    return text if text.endswith("\n") else text + "\n"


@app.command(epilog=COMPARE_EXIT_CODES)
def compare(
    a: Annotated[Path, typer.Argument(help="First report.")],
    b: Annotated[Path, typer.Argument(help="Second report.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    wide: Wide = False,
) -> None:
    """Compare two reports to the last bit: verdicts, element positions, bit patterns, losses."""
    from dataclasses import asdict

    from fsdpqdiag.render.compare_table import differences_table
    from fsdpqdiag.report.compare import Incomparable, compare

    left, right = _load(a), _load(b)
    try:
        result = compare(left, right)
    except Incomparable as exc:
        raise fail(str(exc)) from None
    if json_out:
        stdout.print_json(json.dumps(asdict(result), default=str))
    else:
        verdict = "IDENTICAL" if result.identical else "DIFFERENT"
        stdout.print(
            f"[bold]{verdict}[/]: {result.matched} results matched, {len(result.differences)} differences"
        )
        for label, keys in (("only in A", result.only_in_a), ("only in B", result.only_in_b)):
            if keys:
                stdout.print(f"{label}: {', '.join(keys)}")
        if result.differences:
            print_tables(differences_table(result.differences, wide), wide)
        if result.environment:
            stdout.print(
                f"[dim]environments differ in {len(result.environment)} fields "
                f"(e.g. {', '.join(e['path'] for e in result.environment[:4])})[/]"
            )
    raise typer.Exit(0 if result.identical else 1)
