"""``env``, ``report`` and ``compare``: reports made for upstream issues."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fsdpqdiag.cli.app import (
    JsonPath,
    MarkdownPath,
    Quiet,
    Wide,
    app,
    check_outputs,
    fail,
    print_tables,
    stderr,
    stdout,
    write_outputs,
)
from fsdpqdiag.cli.streams import STDOUT, is_stdout

COMPARE_EXIT_CODES = (
    "Exit codes: 0 identical to the last bit; 4 verdicts identical, numbers differ (the same runs "
    "measured different evidence); 1 verdicts differ (or a result is in one report only), or the "
    "runs were configured differently; 2 incomparable or unreadable."
)
REPORT_FORMATS = (
    "Formats: on a terminal the table; in a pipe, a file (-o) or with --upstream, Markdown; "
    "-f picks one. --plot alone writes only the picture."
)


def report_tables(report, wide: bool = False, path: Path | None = None):
    """The rich view of any report: its command's view and conclusion, as the command
    printed them (``fsdpqdiag.render.views``)."""
    from fsdpqdiag.render.views import report_view

    return report_view(report, wide, path)


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
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """The stack under test: torch/CUDA/NCCL, bitsandbytes and its native library, GPUs, driver.

    Example: fsdpqdiag env --markdown - (a block to paste into an issue)
    """
    from fsdpqdiag.rank import env as environment
    from fsdpqdiag.render.env_table import env_markdown, env_table

    quiet = check_outputs(json_path, markdown_path) or quiet
    captured = environment.capture()
    write_outputs(
        (json_path, lambda: json.dumps(captured, indent=2) + "\n"),
        (markdown_path, lambda: env_markdown(captured) + "\n"),
    )
    if not quiet:
        print_tables(env_table(captured, wide), wide)


@app.command(epilog=REPORT_FORMATS)
def report(
    path: Annotated[
        Path, typer.Argument(metavar="REPORT", help="A JSON report written by any fsdpqdiag command.")
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="md | table | json (default: table on a terminal, md otherwise)."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout (- is stdout).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG byte map of the altered elements.")] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Markdown for one repository's bug template, with only the findings attributed to it "
            "(pytorch, bitsandbytes, transformers, peft, axolotl).",
        ),
    ] = None,
    wide: Wide = False,
) -> None:
    """Render any report: a table, Markdown for an upstream issue, or JSON.

    Example: fsdpqdiag report run.json --upstream bitsandbytes -o issue.md
    """
    if format not in (None, "md", "table", "json"):
        raise fail(f"unknown format {format!r} (known: md, table, json)")
    if upstream is not None and format not in (None, "md"):
        raise fail("--upstream renders Markdown only (drop --format)")
    check_outputs(output, inputs=(path,), binary=(plot,))
    loaded = _load(path)
    if plot is not None:
        _plot(loaded, path, plot)
        if format is None and output is None and upstream is None:
            return  # the picture was asked for, not a rendering on stdout as well
    to_stdout = output is None or is_stdout(output)
    if format is None:
        terminal = to_stdout and stdout.is_terminal and upstream is None
        format = "table" if terminal else "md"
    if format == "table" and to_stdout:
        print_tables(report_tables(loaded, wide, path), wide)
        return
    write_outputs((output or Path(STDOUT), lambda: _rendered(loaded, format, wide, path, upstream)))


def _plot(loaded, path: Path, plot: Path) -> None:
    from fsdpqdiag.render.plot import byte_map, byte_map_sources

    if not byte_map_sources(loaded):
        raise fail(f"{path} holds no element positions to map")
    drawn = byte_map(loaded, plot)
    if drawn:
        stderr.print(
            f"wrote a byte map of {drawn} altered tensor(s) to {plot}", highlight=False, soft_wrap=True
        )
    else:
        stderr.print(
            f"no byte map: no element of {path} was altered (every compared byte kept), {plot} not written",
            highlight=False,
            soft_wrap=True,
        )


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
    a: Annotated[Path, typer.Argument(metavar="A", help="First report.")],
    b: Annotated[Path, typer.Argument(metavar="B", help="Second report.")],
    json_path: JsonPath = None,
    listing: Annotated[
        bool, typer.Option("--all", help="List every leaf that differs, after the verdicts and key numbers.")
    ] = False,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Compare two reports to the last bit: what changed first (verdicts, then key numbers), then
    the rest.

    Example: fsdpqdiag compare reports/a.json reports/b.json --all
    """
    from dataclasses import asdict

    from fsdpqdiag.render.compare_table import compare_view
    from fsdpqdiag.report.compare import Incomparable, compare

    quiet = check_outputs(json_path, inputs=(a, b)) or quiet
    left, right = _load(a), _load(b)
    try:
        result = compare(left, right)
    except Incomparable as exc:
        raise fail(str(exc)) from None
    document = {**asdict(result), "exit_code": result.exit_code}
    write_outputs((json_path, lambda: json.dumps(document, indent=2, default=str) + "\n"))
    if not quiet:
        print_tables(compare_view(result, left, right, wide, listing), wide)
    raise typer.Exit(result.exit_code)
