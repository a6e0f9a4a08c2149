"""Shared wiring of every command: the typer app, one-line errors, output checks.

torch is imported lazily (inside commands), so ``fsdpqdiag --help`` stays fast. Each
command lives in its own module of this package and is registered in ``__init__``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fsdpqdiag import envvars
from fsdpqdiag.report.model import EXIT_BAD_INPUT, EXIT_CODES_HELP, check_writable
from fsdpqdiag.stack.faults import FAULTS  # stdlib only: --help stays torch-free

ENVIRONMENT_HELP = (
    f"Environment: {envvars.CACHE}=DIR where built model presets are kept (default: "
    f"$XDG_CACHE_HOME/fsdpqdiag or ~/.cache/fsdpqdiag); {envvars.RANK_START}=spawn|fork how ranks "
    "start (default: forked from one warm process on a CPU-only machine, spawned where a GPU is "
    f"visible); {envvars.BNB_CPU_REPACK}=on|off forces bitsandbytes' CPU kernel path (on: the "
    f"AVX512-BF16 weight repack, off: plain dequantize) whatever the CPU. {envvars.RESULT}, "
    f"{envvars.STACK} and {envvars.GUARD_PREFIX}* are set by fsdpqdiag for the processes it starts."
)

# How wide a list of choices is laid out in --help: the help column of an 80-column terminal.
CHOICES_WIDTH = 44


def choices_help(text: str, choices) -> str:
    """Help text ending with its choices as a block click never rewraps (the ``\\b`` marker),
    so that no name is cut at a hyphen or at the terminal's edge."""
    lines = textwrap.wrap(
        ", ".join(choices), width=CHOICES_WIDTH, break_on_hyphens=False, break_long_words=False
    )
    return text + "\n\n\b\n" + "\n".join(lines)


# Metavars that read like values, by the Python type an option parses into; an option may
# name its own (SECONDS, DIR).
METAVARS = {int: "N", float: "NUMBER", Path: "PATH", str: "NAME"}


def _parsed_type(param):
    """The element type an option parses into: typer describes it (``type_descriptor``), a
    plain click option by its ParamType."""
    from typing import get_args, get_origin

    described = getattr(param, "type_descriptor", None)
    if described is None:
        return {"integer": int, "float": float, "path": Path}.get(getattr(param.type, "name", ""), str)
    annotation = described.annotation
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation)
    return annotation


def _value_metavars(command) -> None:
    for param in getattr(command, "params", ()):
        if param.param_type_name == "argument":
            # An argument's name already says what it is (REPORT, A, B): typer would add its
            # Python type after it ("REPORT <path>").
            param.display_type_rich = lambda ctx: None
            continue
        if param.is_flag or param.metavar is not None:
            continue
        param.metavar = METAVARS.get(_parsed_type(param), "VALUE")
    for sub in getattr(command, "commands", {}).values():
        _value_metavars(sub)


class OneLineErrors(TyperGroup):
    """click's own usage errors (a value of the wrong type, an unknown option, an extra
    argument) answer in one line on stderr with exit 2, like every other mistake, instead of
    click's usage block and error panel."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _value_metavars(self)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.exceptions.TyperException as exc:
            # typer carries its own copy of click, whose ClickException derives from this;
            # help was printed already when no arguments were given.
            if not hasattr(exc, "format_message"):
                raise
            if type(exc).__name__ != "NoArgsIsHelpError":
                print_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            stderr.print("Aborted!")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="fsdpqdiag",
    cls=OneLineErrors,
    help=(
        "Diagnose byte-level bugs of PyTorch FSDP2 sharding bitsandbytes quantized weights "
        "(bitsandbytes #1945 and relatives)."
    ),
    epilog=EXIT_CODES_HELP
    + " compare: 0 identical, 4 verdicts identical but numbers differ, 1 verdicts differ."
    + "\n\n"
    + ENVIRONMENT_HELP,
    no_args_is_help=True,
    invoke_without_command=True,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
stdout = Console()
stderr = Console(stderr=True)


def print_error(message: str) -> None:
    # Escaped: a message quotes what the user typed, and "[/x]" in it would be taken for
    # rich markup (a MarkupError traceback instead of the error).
    stderr.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """One line on stderr and exit 2: the answer to every mistake a user can make."""
    print_error(message)
    return typer.Exit(EXIT_BAD_INPUT)


# The flag of each library parameter a ``BadInput`` may name: the library's messages name
# its parameters, the CLI's name what the user typed.
FLAGS = {
    "world_sizes": "--ws",
    "device": "--device",
    "backend": "--backend",
    "timeout_s": "--timeout",
    "inject": "--inject",
    "steps": "--steps",
    "bits": "--bits",
    "model": "--model",
    "preset": "--preset",
    "lora": "--lora/--no-lora",
    "cells/grid": "--cells/--grid",
    "cells": "--cells",
    "grid": "--grid",
    "quant_type": "--quant-type",
    "in_features": "--in-features",
    "out_features": "--out-features",
    "batch": "--batch",
    "weight_seed": "--weight-seed",
    "input_seed": "--input-seed",
    "compute_dtype": "--compute-dtype",
    "param_dtype": "--param-dtype",
    "reduce_dtype": "--reduce-dtype",
    "resume": "--resume",
    "out_dir": "--out",
}


class FlagNames:
    """A ``BadInput``'s wording on the command line: each parameter by its flag (``FLAGS``),
    set to a value as it is typed (``--ws 1 2``, ``--no-lora``)."""

    def parameter(self, name: str) -> str:
        return FLAGS[name]

    def setting(self, name: str, value) -> str:
        flag = FLAGS[name]
        if isinstance(value, bool):  # a --x/--no-x pair: the half that sets this value
            on, _, off = flag.partition("/")
            return on if value else off
        if value is None:
            return f"no {flag}"
        if isinstance(value, list):
            return f"{flag} {' '.join(str(v) for v in value)}"
        return f"{flag} {value}"


def bad_input(exc) -> typer.Exit:
    """``fail`` with a library ``BadInput``, its parameters named by their flags."""
    return fail(exc.worded(FlagNames()))


def is_reporting_rank() -> bool:
    """Under torchrun every rank runs the command; only global rank 0 writes and prints."""
    return os.environ.get("RANK", "0") == "0"


def model_files(model: str | None) -> tuple[Path, ...]:
    """The files of a --model directory: inputs that no output may overwrite."""
    directory = Path(model).expanduser() if model else None
    if directory is None or not directory.is_dir():
        return ()
    return tuple(entry for entry in directory.iterdir() if entry.is_file())


def check_outputs(
    *paths: Path | None, inputs: tuple[Path, ...] = (), binary: tuple[Path | None, ...] = ()
) -> bool:
    """Refuse, before any work, an output that cannot be written as a regular file, that
    would overwrite one of this run's inputs, or that another output of the run also names
    (``--json x --markdown x`` would silently keep only the last). ``-`` is stdout, for one
    output at most and none of the ``binary`` ones (a PNG or Parquet file). True when an
    output is stdout: the command then prints no table, which would be mixed into it."""
    from fsdpqdiag.cli.streams import is_stdout
    from fsdpqdiag.report.model import same_file

    if any(is_stdout(path) for path in binary):
        raise fail("a binary output (--plot, --parquet) cannot be - (stdout): give it a file")
    wanted = [path for path in (*paths, *binary) if path is not None]
    if sum(is_stdout(path) for path in wanted) > 1:
        raise fail("two outputs are - (stdout): at most one output can be stdout")
    for index, path in enumerate(wanted):
        if is_stdout(path):
            continue
        try:
            check_writable(path)
        except ValueError as exc:
            raise fail(f"cannot write {path}: {exc}") from None
        for source in inputs:
            if same_file(path, source):
                raise fail(f"cannot write {path}: it is the input {source}, which would be lost")
        for other in wanted[:index]:
            if not is_stdout(other) and same_file(path, other):
                raise fail(f"cannot write {path}: another output of this run ({other}) is the same file")
    return any(is_stdout(path) for path in wanted)


def write_outputs(*outputs: tuple[Path | None, object]) -> None:
    """Write each (path, text or bytes-producing callable) whose path is given; a file that
    cannot be written after the work is done ends the command with EXIT_WRITE_ERROR."""
    from fsdpqdiag.cli.streams import OutputWriteError, write_output
    from fsdpqdiag.report.model import EXIT_WRITE_ERROR

    for path, data in outputs:
        if path is None:
            continue
        try:
            write_output(path, data() if callable(data) else data)
        except OutputWriteError as exc:
            print_error(str(exc))
            raise typer.Exit(EXIT_WRITE_ERROR) from None


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Diagnose byte-level bugs of FSDP2 sharding bitsandbytes quantized weights."""
    if version:
        from fsdpqdiag import __version__

        stdout.print(f"fsdpqdiag {__version__}")
        raise typer.Exit(0)


# Options shared by every command that launches ranks; one definition, one help text.
WorldSizes = Annotated[
    list[int] | None,
    typer.Option("--ws", help="World size (repeatable). Default: 2 where the devices allow, else 1."),
]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda (auto: cuda when a GPU is visible).")]
Backend = Annotated[
    str,
    typer.Option(help="auto | gloo | nccl (auto: nccl on cuda, gloo on cpu; gloo lets ranks share a GPU)."),
]
Timeout = Annotated[
    float, typer.Option(metavar="SECONDS", help="Seconds per launch before every rank is killed.")
]
Inject = Annotated[
    str | None,
    typer.Option(
        help=choices_help("Positive control: replace a real step with a known-faulty one:", FAULTS),
    ),
]
JsonPath = Annotated[Path | None, typer.Option("--json", help="Write the JSON report here (- for stdout).")]
MarkdownPath = Annotated[
    Path | None,
    typer.Option("--markdown", help="Write the Markdown report here (- for stdout)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No table on stdout.")]
Wide = Annotated[
    bool,
    typer.Option(
        "--wide",
        help="Every column of every table, each value on one line, however long the lines get "
        "(default: the columns that fit the terminal; 80 in a pipe or a CI log).",
    ),
]


def print_tables(renderable, wide: bool) -> None:
    """Print a command's tables; a --wide table keeps its right edge past the console width."""
    stdout.print(renderable, crop=not wide)


def end_command(
    report,
    json_path: Path | None,
    markdown_path: Path | None,
    quiet: bool,
    wide: bool,
    *,
    exit_code: int | None = None,
    outputs: tuple | None = None,
    after_outputs=None,
) -> typer.Exit:
    """The ending every command shares, returned for the command to raise. On the reporting
    rank (rank 0 under torchrun): the outputs written atomically (the report's JSON and
    Markdown, either may be ``-``, unless ``outputs`` gives others as (path, data) pairs),
    then ``after_outputs()`` (a command's own files and notes), then the report's view and
    conclusion unless quiet. The exit code is the one the report decides, or ``exit_code``."""
    from fsdpqdiag.render import markdown
    from fsdpqdiag.render.views import report_view

    if is_reporting_rank():
        if outputs is None:
            outputs = ((json_path, report.to_json), (markdown_path, lambda: markdown.render(report)))
        write_outputs(*outputs)
        if after_outputs is not None:
            after_outputs()
        if not quiet:
            print_tables(report_view(report, wide, json_path, exit_code), wide)
    return typer.Exit(report.exit_code() if exit_code is None else exit_code)


class ProgressLines:
    """One line on stderr per step of a run as it finishes (the next one's start ends it)."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.since = time.monotonic()

    def started(self, text: str) -> None:
        self.finish()
        self.current, self.since = text, time.monotonic()

    def finish(self) -> None:
        if self.current is not None:
            seconds = time.monotonic() - self.since
            stderr.print(f"done: {self.current} ({seconds:.1f} s)", highlight=False, soft_wrap=True)
        self.current = None


def run_library(call, status_text: str = "starting…"):
    """``call(session, on_progress)`` the library in one session (the command's launches share
    its zygotes), with a progress line on stderr; map its failures to exit codes."""
    from fsdpqdiag.api import BadInput, Session
    from fsdpqdiag.report.model import EXIT_INTERRUPTED

    try:
        with stderr.status(status_text) as status, Session() as session:
            if stderr.is_terminal:
                return call(session, lambda text: status.update(f"running {text}…"))
            # No terminal (a pipe, a CI log): the spinner draws nothing, so each step says
            # when it is done, one line each, instead of minutes of silence.
            lines = ProgressLines()
            done = call(session, lines.started)
            lines.finish()
            return done
    except BadInput as exc:
        raise bad_input(exc) from None
    except KeyboardInterrupt as exc:
        # The launcher has already killed and reaped every rank; nothing was written.
        # SIGTERM and SIGHUP arrive as Stopped, a KeyboardInterrupt, and end the same way.
        import signal

        from fsdpqdiag.launcher.stop_signals import stop_signal_of

        signum = stop_signal_of(exc)
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        stderr.print(f"interrupted{by}: every rank was stopped, no report written")
        raise typer.Exit(EXIT_INTERRUPTED - signal.SIGINT + signum) from None
