"""``fsdpqdiag watch -- COMMAND ...``: an unchanged training command, guarded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fsdpqdiag.cli.app import (
    Inject,
    JsonPath,
    MarkdownPath,
    Quiet,
    Wide,
    app,
    bad_input,
    check_outputs,
    choices_help,
    end_command,
    fail,
    print_error,
)
from fsdpqdiag.fixes import installable
from fsdpqdiag.weightguard.watch import WATCH_EXIT_CODES

Fix = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help=choices_help(
            "Apply this workaround in every process, around fully_shard; the report says "
            "whether forward then received true bytes:",
            installable(),
        ),
    ),
]


@app.command(
    epilog=WATCH_EXIT_CODES,
    context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True},
)
def watch(
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="COMMAND", help="The training command, after --, as you would run it."),
    ] = None,
    params: Annotated[
        str, typer.Option(help="quantized (Params4bit, Int8Params, int8/uint8) | all (trainable too).")
    ] = "quantized",
    action: Annotated[
        str, typer.Option(help="report (let the run finish) | warn (once per module) | raise (stop it).")
    ] = "report",
    every: Annotated[int, typer.Option(help="Verify the forwards of every N-th optimizer step.")] = 1,
    inject: Inject = None,
    fix: Fix = None,
    json_path: JsonPath = None,
    markdown_path: MarkdownPath = None,
    quiet: Quiet = False,
    wide: Wide = False,
) -> None:
    """Run a training command with the weight guard in every Python process it starts.

    The guard attaches where the script calls fully_shard (no code change), verifies at every
    unshard that the bytes forward receives still digest to the shards', and on the command's
    end writes one report: the altered modules, the first step, where to file it.

    Example: fsdpqdiag watch --json w.json -- torchrun --nproc-per-node 2 train.py

    With a workaround: fsdpqdiag watch --fix fsdp2-bytes -- torchrun --nproc-per-node 2 train.py
    """
    from fsdpqdiag import fixes
    from fsdpqdiag.api import BadInput, check_inject
    from fsdpqdiag.weightguard import watch as watching
    from fsdpqdiag.weightguard.guard import ACTION_CHOICES, PARAM_CHOICES

    if params not in PARAM_CHOICES:
        raise fail(f"unknown --params {params!r} (known: {', '.join(PARAM_CHOICES)})")
    if action not in ACTION_CHOICES:
        raise fail(f"unknown --action {action!r} (known: {', '.join(ACTION_CHOICES)})")
    if every < 1:
        raise fail(f"--every must be at least 1, got {every}")
    try:
        check_inject(inject)  # the message every other command gives
    except BadInput as exc:
        raise bad_input(exc) from None
    if fix is not None:
        try:
            fixes.check_installable(fix)
        except ValueError as exc:
            raise fail(str(exc)) from None
    quiet = check_outputs(json_path, markdown_path) or quiet
    command = list(command or [])
    try:
        watching.check_command(command)
    except watching.WatchInputError as exc:
        raise fail(str(exc)) from None
    outcome = watching.run(
        command,
        params=params,
        action=action,
        every=every,
        inject=inject,
        fix=fix,
        argv=["watch", *sys.argv[2:]],
        report_path=str(Path(json_path).resolve()) if json_path and json_path != "-" else None,
    )
    ending = _end(outcome, json_path, markdown_path, quiet, wide)
    if not outcome.checked:
        # Even with -q: an exit without a finding must not pass for a clean run.
        print_error(f"watch: {outcome.report.results[0].summary}")
    raise ending


def _end(outcome, json_path, markdown_path, quiet: bool, wide: bool):
    """``end_command`` for watch's outcome. One report per job: the node of the lowest rank
    writes it (weightguard.job); the other nodes say where it is."""
    writes = outcome.job is None or outcome.job["writes"]
    return end_command(
        outcome.report,
        json_path,
        markdown_path,
        quiet,
        wide,
        exit_code=outcome.exit_code,
        outputs=None if writes else (),
        after_outputs=None if writes else lambda: _say_where(outcome),
    )


def _say_where(outcome) -> None:
    """Where the node that writes the job's report writes it."""
    from rich.markup import escape

    from fsdpqdiag.cli.app import stderr

    lead = outcome.job["writer"]
    where = lead["report"] or "its --json/--markdown outputs"
    line = f"watch: rank {lead['rank']}'s node ({lead['host']}) writes the job's report: {where}"
    stderr.print(escape(line), highlight=False, soft_wrap=True)
