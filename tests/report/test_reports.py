"""`env`, `report`, `compare` and the schema, on real reports (CPU runs and committed GPU runs)."""

import json
from pathlib import Path

import jsonschema
import pytest

from fsdpqdiag.render.markdown import GITHUB_COMMENT_LIMIT, render
from fsdpqdiag.report.model import Report, json_schema
from tests.support import (
    LOCALIZE_WS1,
    ROOT,
    SMALL_FEATURES,
    fix_all,
    matrix_default,
    reproduce_small,
    worker_session,
)

GPU_REPORTS = sorted((ROOT / "reports").glob("*.json"))


@pytest.fixture(scope="module")
def cpu_reports(tmp_path_factory, shared_cli):
    from fsdpqdiag.core.config import LinearConfig

    out = tmp_path_factory.mktemp("reports")
    # At WS=2, the run of every probe that test_reproduce and the probe tests share.
    made = {"ws2": shared_cli(*reproduce_small(2)).json_path}
    # Three runs of one probe, in the worker's session: torch and bitsandbytes imported once.
    for label, seed in {"ws1": 42, "ws1-again": 42, "ws1-seed7": 7}.items():
        linear = LinearConfig(in_features=SMALL_FEATURES, out_features=SMALL_FEATURES, weight_seed=seed)
        report = worker_session().reproduce(
            probes=["nan-canonicalization"], linear=linear, world_sizes=[1], device="cpu"
        )
        made[label] = out / f"{label}.json"
        made[label].write_text(report.to_json())
    return made


@pytest.mark.parametrize("path", GPU_REPORTS, ids=[p.name for p in GPU_REPORTS])
def test_committed_reports_validate_and_render(path):
    data = json.loads(path.read_text())
    jsonschema.validate(data, json_schema())
    report = Report.from_dict(data)
    text = render(report)
    assert len(text) <= GITHUB_COMMENT_LIMIT
    for result in report.results:
        assert f"**{result.verdict}**" in text
    assert f"fsdpqdiag {report.command}" in text and report.env["torch"]["version"] in text
    if report.command == "reproduce":  # its probes have standalone scripts for maintainers
        from fsdpqdiag.render import reproducer

        lines = text.split("<details>", 1)[0].splitlines()
        for result in report.results:
            script, line = reproducer.script_of(result.probe), reproducer.command(result)
            if script is None:
                continue
            assert f"`{script}`" in text  # named beside every result
            # ... and run, with the result's configuration, under "To reproduce" only where it
            # reproduced
            listed = any(row.strip().split("  # ")[0] == line for row in lines)
            same_line_reproduced = any(
                other.verdict == "REPRODUCED" and reproducer.command(other) == line
                for other in report.results
            )
            assert listed == same_line_reproduced, (result.probe, result.verdict, line)


def test_key_numbers_of_forensics_and_a_refused_fully_shard():
    # the H100 reports: forensics whose ranks died in full_tensor(), torch 2.11's refusal
    forensics = Report.from_dict(
        json.loads(
            (
                ROOT / "reports/forensics-tinyllama-1.1b-ws2-gloo-shared-h100-torch2.11-bnb0.50.2.json"
            ).read_text()
        )
    )
    assert "| 154 of 154 weights altered, 192791 elements;" in render(forensics)
    assert "full_tensor(): SIGSEGV |" in render(forensics)
    probes = Report.from_dict(
        json.loads((ROOT / "reports/reproduce-ws1-h100-torch2.11-bnb0.50.2.json").read_text())
    )
    assert "| fully_shard raised RuntimeError: only Tensors of floating point dtype" in render(probes)


def test_compare_identical_and_different(run_cli, cpu_reports):
    same = run_cli("compare", str(cpu_reports["ws1"]), str(cpu_reports["ws1-again"]))
    assert same.returncode == 0 and "IDENTICAL" in same.stdout
    other_ws = run_cli("compare", str(cpu_reports["ws1"]), str(cpu_reports["ws2"]), "--json", "-")
    assert other_ws.returncode == 1
    listing = json.loads(other_ws.stdout)
    assert listing["only_in_a"] and listing["only_in_b"]
    other_seed = run_cli("compare", str(cpu_reports["ws1"]), str(cpu_reports["ws1-seed7"]), "--json", "-")
    assert other_seed.returncode == 1
    paths = {d["path"] for d in json.loads(other_seed.stdout)["differences"]}
    assert "config.weight_seed" in paths and "evidence.sha256" in paths


def test_compare_refuses_foreign_and_corrupt_reports(run_cli, cpu_reports, tmp_path):
    foreign = tmp_path / "foreign.json"
    data = json.loads(cpu_reports["ws1"].read_text())
    data["schema"] = "fsdpqdiag.report/99"
    foreign.write_text(json.dumps(data))
    refused = run_cli("compare", str(cpu_reports["ws1"]), str(foreign))
    assert refused.returncode == 2 and "unsupported report schema" in refused.stderr
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(cpu_reports["ws1"].read_text()[:100])
    assert run_cli("report", str(corrupt)).returncode == 2
    not_report = tmp_path / "list.json"
    not_report.write_text("[1, 2]")
    assert "not an fsdpqdiag report" in run_cli("compare", str(not_report), str(not_report)).stderr


def test_report_formats_round_trip(run_cli, cpu_reports, tmp_path):
    out = tmp_path / "again.json"
    assert run_cli("report", str(cpu_reports["ws2"]), "--format", "json", "-o", str(out)).returncode == 0
    assert json.loads(out.read_text()) == json.loads(cpu_reports["ws2"].read_text())
    md = run_cli("report", str(cpu_reports["ws2"]))
    assert md.returncode == 0 and "## fsdpqdiag reproduce" in md.stdout
    assert "<details><summary>environment</summary>" in md.stdout
    table = run_cli("report", str(cpu_reports["ws2"]), "--format", "table")
    assert "nan-canonicalization" in table.stdout
    assert run_cli("report", str(cpu_reports["ws2"]), "--format", "pdf").returncode == 2


def test_byte_map_of_a_report_with_positions(run_cli, tmp_path):
    reproduced = next(p for p in GPU_REPORTS if "nan-canonicalize" in p.name)
    png = tmp_path / "map.png"
    result = run_cli("report", str(reproduced), "--plot", str(png), "-o", str(tmp_path / "r.md"))
    assert result.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"


# ws1: one probe, whose results fit once their JSON blocks fold; ws2: every probe, whose
# tables alone outgrow the limit 60 times over, so the lines are cut too.
@pytest.mark.parametrize("label", ["ws1", "ws2"])
def test_oversized_report_is_folded_under_the_github_limit(cpu_reports, label):
    report = Report.load(cpu_reports[label])
    report.results = report.results * 60
    text = render(report)
    assert len(text) <= GITHUB_COMMENT_LIMIT
    assert "Folded to fit GitHub" in text
    assert text.count("**NOT REPRODUCED**") + text.count("**REPRODUCED**") >= 60
    assert text.startswith("## fsdpqdiag reproduce")
    assert ("lines (the JSON report" in text) == (label == "ws2")


def test_env_command(run_cli):
    result = run_cli("env", "--json", "-")
    data = json.loads(result.stdout)
    assert result.returncode == 0
    for key in ("python", "torch", "bitsandbytes", "transformers", "peft", "gpus", "driver"):
        assert key in data
    # In-process: a second interpreter would import torch and bitsandbytes again (seconds).
    from typer.testing import CliRunner

    from fsdpqdiag.cli import app

    markdown = CliRunner().invoke(app, ["env", "--markdown", "-"])
    assert markdown.exit_code == 0 and "| torch.version |" in markdown.stdout


# The runs test_localize, test_fix and test_matrix ask their own questions of.
EVERY_COMMAND = {
    "localize": LOCALIZE_WS1,
    "fix": fix_all(1),
    "matrix": matrix_default(1),
}


@pytest.mark.parametrize("command", EVERY_COMMAND)
def test_every_command_output_validates(shared_cli, command):
    result = shared_cli(*EVERY_COMMAND[command])
    jsonschema.validate(result.report, json_schema())
    assert result.markdown_path.read_text().startswith(f"## fsdpqdiag {command}")


def test_unknown_schema_version_is_refused_by_the_loader(tmp_path):
    from fsdpqdiag.report.model import ReportError

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": "fsdpqdiag.report/2", "results": []}))
    with pytest.raises(ReportError, match="unsupported report schema"):
        Report.load(path)
    assert Path(path).exists()
