"""Every command ends with its conclusion.

A help: line per attributed finding (component, where to file, known issue or "none known",
the deciding control), one summary line with the exit code's meaning, and the next step.
Drawn from the committed reports of every command, so no rank is launched; one `report -f
table` in a pipe checks the wiring."""

import os
import subprocess
import sys

import pytest

from fsdpqdiag.cli.reports import report_tables
from fsdpqdiag.evidence.attribution import ATTRIBUTED_VERDICTS
from fsdpqdiag.report.conclusion import PLACEHOLDER_JSON, conclude, shown_path, upstream_name
from fsdpqdiag.report.model import Report
from tests.report.test_render_width import REPORTS, WIDTH, _render
from tests.support import ROOT


def _flat(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


@pytest.mark.parametrize("path", REPORTS, ids=[p.name for p in REPORTS])
def test_every_report_ends_with_its_conclusion_at_80_columns(path):
    report = Report.load(path)
    lines = _render(report_tables(report, path=path))
    assert not [line for line in lines if len(line) > WIDTH]
    text = _flat(lines)
    attributed = [r for r in report.results if r.verdict in ATTRIBUTED_VERDICTS]
    helps = [line for line in lines if line.startswith("help: ")]
    assert len(helps) == len(attributed)
    for result in attributed:
        attribution = result.evidence.get("attribution") or {}
        target = attribution.get("report_to")
        assert (f"file at {target}" if target else "nothing to file upstream") in text
    if any(not (r.evidence.get("attribution") or {}).get("known_issues") for r in attributed):
        assert "known issue: none known" in text
    code = report.exit_code()
    assert f"exit {code}: " in text
    summary = [line for line in lines if line.startswith("summary: ")]
    assert len(summary) == 1 and lines.index(summary[0]) > max(map(lines.index, helps), default=-1)
    assert any(line.startswith("next: ") for line in lines)


@pytest.mark.parametrize("path", REPORTS, ids=[p.name for p in REPORTS])
def test_next_step_names_the_report_to_file_for_each_upstream(path):
    report = Report.load(path)
    conclusion = conclude(report, path)
    steps = " ".join(conclusion.next_steps)
    upstream = {f.report_to for f in conclusion.findings.values() if f.report_to}
    for repo in upstream:
        assert f"fsdpqdiag report {shown_path(path)} --upstream {upstream_name(repo)}" in steps
    if report.exit_code() == 0 and not conclusion.findings and report.command != "fix":
        assert conclusion.next_steps == ("nothing to do",)


def test_without_a_kept_report_the_hint_says_how_to_keep_one():
    path = next(p for p in REPORTS if p.name == "reproduce-ws2-gloo-shared-h200-torch2.11-bnb0.50.2.json")
    steps = " ".join(conclude(Report.load(path)).next_steps)
    assert f"fsdpqdiag report {PLACEHOLDER_JSON} --upstream pytorch" in steps
    assert f"rerun with --json {PLACEHOLDER_JSON}" in steps


def test_report_table_in_a_pipe_ends_with_the_conclusion_whole():
    path = next(p for p in REPORTS if p.name == "reproduce-ws2-gloo-shared-h200-torch2.11-bnb0.50.2.json")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    completed = subprocess.run(
        [sys.executable, "-m", "fsdpqdiag", "report", str(path), "-f", "table"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(env, PYTHONPATH=str(ROOT), COLUMNS="80"),
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert not [line for line in lines if len(line) > WIDTH]
    text = _flat(lines)
    assert "help: REPRODUCED nan-canonicalization (ws=2): torch.distributed.fsdp; file at" in text
    assert "known issue: bitsandbytes-foundation/bitsandbytes#1945" in text
    # the report as the user would name it from here: every token of the command whole
    shown = path.relative_to(ROOT)
    assert f"next: file for pytorch/pytorch: fsdpqdiag report {shown} --upstream pytorch" in text


def test_every_command_has_a_view_and_no_view_branches_on_a_command_name():
    import ast

    from fsdpqdiag.render.views import VIEWS
    from fsdpqdiag.report import commands

    assert set(VIEWS) == set(commands.COMMANDS.values())
    assert all(kind.name == name for name, kind in commands.COMMANDS.items())
    # A report of a command this version does not know is drawn as reproduce's.
    assert commands.kind_of("no-such-command") is commands.REPRODUCE
    # No renderer or CLI module compares a report's command with a name.
    for folder in ("fsdpqdiag/render", "fsdpqdiag/cli"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute):
                    assert node.left.attr != "command", f"{path.name}:{node.lineno}"


def test_a_doctor_report_exits_by_its_capabilities_and_shows_the_preflight_alone():
    from fsdpqdiag.render.views import report_view

    every_check = [checked for path in REPORTS for checked in Report.load(path).preflight]
    checked = next(c for c in every_check if all(capability["ok"] for capability in c["capabilities"]))
    failed = {**checked, "capabilities": [{**checked["capabilities"][0], "ok": False}]}
    held = Report("doctor", [], {}, [], world_sizes=[1], preflight=[checked])
    broken = Report("doctor", [], {}, [], world_sizes=[1, 2], preflight=[checked, failed])
    assert held.exit_code() == 0 and broken.exit_code() == 3
    text = "\n".join(_render(report_view(broken)))
    assert text.count("stack preflight, ") == 2 and "summary:" not in text
