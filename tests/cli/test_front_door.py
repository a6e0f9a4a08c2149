"""One CLI convention on every command.

Help, outputs, progress, compare's conclusion, report's default and byte map, tables that
never split a token.

In-process, on the committed reports under reports/: no rank is launched here (the runs that
launch ranks are asked these questions by test_doctor, test_reports and test_cli).
"""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fsdpqdiag.cli import app
from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import preflight_table
from fsdpqdiag.report.compare import EXIT_NUMBERS_DIFFER
from tests.support import ROOT

REPORTS = ROOT / "reports"
CPU_213 = REPORTS / "reproduce-ws2-cpu-2core-torch2.13-bnb0.50.2.json"
H200 = REPORTS / "reproduce-ws2-gloo-shared-h200-torch2.11-bnb0.50.2.json"
CPU_2141 = REPORTS / "reproduce-ws2-cpu-2core-torch2.14.1-bnb0.50.2.json"
MATRIX = REPORTS / "matrix-ws2-cpu-2core-torch2.14.1-bnb0.50.2.json"


def invoke(*args: str):
    # COLUMNS: click lays help out for the terminal it is told of; 80 is a CI log's width.
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "80"}, catch_exceptions=False)


def _render(renderable, width: int = 80) -> list[str]:
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(renderable, crop=False)
    return buffer.getvalue().splitlines()


def test_every_command_takes_dash_h_and_names_values_like_values():
    from typer.main import get_command

    commands = get_command(app).commands
    for name in commands:
        result = invoke(name, "-h")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output
        assert not re.search(r"<(list\[\w+\]|str|int|float|bool|path)>", result.output), (name, result.output)
    root = invoke("-h")
    assert root.exit_code == 0 and "--install-completion" in root.output
    for variable in ("FSDPQDIAG_BNB_CPU_REPACK", "FSDPQDIAG_CACHE", "FSDPQDIAG_RANK_START"):
        assert variable in root.output


@pytest.mark.parametrize(
    "command, choices",
    [
        ("reproduce", "fsdpqdiag.tasks:PROBES"),
        ("reproduce", "fsdpqdiag.stack.faults:FAULTS"),
        ("fix", "fsdpqdiag.fixes:FIXES"),
        ("fix", "fsdpqdiag.analyses.fix_verify:TARGETS"),
        ("matrix", "fsdpqdiag.analyses.matrix.cells:DEFAULT_CELLS"),
        ("watch", "fsdpqdiag.fixes:installable"),
    ],
)
def test_help_lists_every_choice_whole_at_80_columns(command, choices):
    import importlib

    module, name = choices.split(":")
    found = getattr(importlib.import_module(module), name)
    names = found() if callable(found) else [getattr(item, "name", item) for item in found]
    text = invoke(command, "--help").output
    assert max(map(len, text.splitlines())) <= 80
    words = set(re.findall(r"[\w.-]+", text))
    missing = [choice for choice in names if choice not in words]
    assert not missing, f"{command} --help cuts or omits {missing}:\n{text}"


def _first_line(result) -> str:
    return result.output.strip().splitlines()[0]


def test_compare_identical_says_so_first_and_exits_0():
    result = invoke("compare", str(CPU_213), str(CPU_213))
    assert result.exit_code == 0 and _first_line(result).startswith("IDENTICAL")


def test_compare_of_numbers_alone_says_verdicts_identical_first(tmp_path):
    data = json.loads(CPU_213.read_text())
    moved = next(r for r in data["results"] if r["probe"] == "moe-expert-quant")
    moved["evidence"]["loss"] += 2.0**-20  # a last-bit loss on another stack
    altered = tmp_path / "altered.json"
    altered.write_text(json.dumps(data))
    kept = tmp_path / "compare.json"
    result = invoke("compare", str(CPU_213), str(altered), "--json", str(kept))
    assert result.exit_code == EXIT_NUMBERS_DIFFER, result.output
    assert _first_line(result).startswith("VERDICTS IDENTICAL, NUMBERS DIFFER")
    document = json.loads(kept.read_text())
    assert document["exit_code"] == EXIT_NUMBERS_DIFFER
    assert [d["path"] for d in document["differences"]] == ["evidence.loss"]
    assert "key numbers that moved" in result.output
    # the leaf itself is listed under --all
    assert "evidence.loss" in invoke("compare", str(CPU_213), str(altered), "--all").output


def test_compare_leads_with_the_verdicts_that_changed():
    result = invoke("compare", str(H200), str(CPU_2141))
    assert result.exit_code == 1
    text = result.output
    assert _first_line(result).startswith("VERDICTS DIFFER")
    from fsdpqdiag.report.compare import compare
    from fsdpqdiag.report.model import Report

    changed = compare(Report.load(H200), Report.load(CPU_2141)).of_kind("verdict")
    assert changed, "the pair was chosen for its verdict changes"
    assert text.index("verdicts that changed") < text.index("key numbers that moved")
    for item in changed:
        assert item["result"] in text.split("key numbers that moved")[0]
    assert "--all lists them" in text
    assert "{'" not in text and "['" not in text  # no Python reprs
    listing = invoke("compare", str(H200), str(CPU_2141), "--all").output
    assert "{'" not in listing and "['" not in listing
    assert max(map(len, listing.splitlines())) <= 80


def test_report_plot_says_where_it_wrote_and_refuses_an_empty_map(tmp_path):
    untouched = tmp_path / "untouched.png"
    result = invoke("report", str(CPU_213), "--plot", str(untouched))
    assert result.exit_code == 0 and not untouched.exists()
    assert "no byte map" in result.stderr and result.stdout == ""
    reproduced = next(REPORTS.glob("reproduce-ws1-h100-*-nan-canonicalize.json"))
    drawn = tmp_path / "map.png"
    result = invoke("report", str(reproduced), "--plot", str(drawn))
    assert result.exit_code == 0 and drawn.read_bytes()[:4] == b"\x89PNG"
    assert f"to {drawn}" in " ".join(result.stderr.split()) and result.stdout == ""


def test_a_token_too_long_for_its_column_is_shortened_in_the_middle_and_whole_under_wide():
    digest = "sha256:" + "0123456789abcdef" * 6
    rows = [["model.layers.0.self_attn.q_proj", digest], ["model.layers.1.mlp.down_proj", "short"]]
    table = FittedTable((Column("module"), Column("digest", breakable=True)), rows)
    lines = _render(table, 60)
    assert max(map(len, lines)) <= 60
    shortened = next(line for line in lines if "…" in line)
    assert "sha256:01" in shortened and "cdef" in shortened  # both ends kept, on one line
    assert any("model.layers.0.self_attn.q_proj" in line for line in lines)
    wide = _render(FittedTable(table.columns, rows, wide=True), 60)
    assert any(digest in line for line in wide)


def test_doctor_tables_keep_unit_names_whole_at_80_columns():
    checked = json.loads(MATRIX.read_text())["preflight"][0]
    lines = _render(preflight_table(checked))
    assert max(map(len, lines)) <= 80
    for unit in checked["fsdp_units"]["units"]:
        assert any(unit["unit"] in line for line in lines), unit["unit"]


def test_doctor_runs_every_world_size_and_writes_its_outputs(monkeypatch, tmp_path):
    """The wiring of repeated --ws, --json PATH and --markdown PATH. The preflight itself is
    the committed one of a real run (test_doctor runs real ones); what is checked here is
    that each world size asked for is run and written."""
    from fsdpqdiag.api import commands
    from fsdpqdiag.stack import models

    measured = json.loads(MATRIX.read_text())["preflight"][0]
    asked: list[int] = []

    def preflight_of(run, *args, **kwargs):
        asked.append(run.world_size)
        return {**measured, "world_size": run.world_size}

    monkeypatch.setattr(commands, "preflight", preflight_of)
    monkeypatch.setattr(models, "resolve_model", lambda model, preset: tmp_path)
    json_path, markdown_path = tmp_path / "d.json", tmp_path / "d.md"
    result = invoke(
        "doctor", "--device", "cpu", "--ws", "1", "--ws", "2", "--json", str(json_path),
        "--markdown", str(markdown_path), "-q",
    )  # fmt: skip
    assert asked == [1, 2]
    assert result.stdout == ""
    assert [c["world_size"] for c in json.loads(json_path.read_text())] == [1, 2]
    text = markdown_path.read_text()
    assert "ws=1" in text and "ws=2" in text and "| capability | ok | detail |" in text
    ok = all(c["ok"] for c in measured["capabilities"])
    assert result.exit_code == (0 if ok else 3)


def test_doctor_refuses_a_bad_second_world_size_before_running_the_first(monkeypatch):
    from fsdpqdiag.api import commands

    def never(*args, **kwargs):
        raise AssertionError("a world size ran before every --ws was checked")

    monkeypatch.setattr(commands, "preflight", never)
    result = invoke("doctor", "--device", "cpu", "--ws", "1", "--ws", "0")
    assert result.exit_code == 2 and "--ws must be >= 1" in result.stderr


def test_progress_off_a_terminal_is_one_line_per_step_as_it_finishes(capsys):
    from fsdpqdiag.cli.app import run_library

    def steps(session, progress):
        progress("preflight at world size 2")
        progress("nan-canonicalization at world size 2")
        return "done"

    assert run_library(steps) == "done"
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "done: preflight at world size 2",
        "done: nan-canonicalization at world size 2",
    ]
