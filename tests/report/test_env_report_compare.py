"""`report` and `compare` on a forensics report: evidence shaped per module, not per probe section."""

import json

import jsonschema

from fsdpqdiag.render.markdown import GITHUB_COMMENT_LIMIT, render
from fsdpqdiag.report.compare import EXIT_NUMBERS_DIFFER
from fsdpqdiag.report.model import Report, json_schema
from tests.support import forensics_default


def test_forensics_report_renders_and_compares(run_cli, shared_cli, tmp_path):
    made = shared_cli(*forensics_default(1))
    assert made.returncode in (0, 1), made.stderr
    path = made.json_path
    data = json.loads(path.read_text())
    jsonschema.validate(data, json_schema())
    report = Report.from_dict(data)
    text = render(report)
    assert len(text) <= GITHUB_COMMENT_LIMIT and text.startswith("## fsdpqdiag forensics")
    for module in report.results[0].evidence["modules"]:
        assert module["module"] in text
    assert f"**{report.results[0].verdict}**" in text

    same = run_cli("compare", str(path), str(path))
    assert same.returncode == 0 and "IDENTICAL" in same.stdout
    # One altered leaf deep inside a module's evidence must be found and named by its path.
    altered = tmp_path / "altered.json"
    data["results"][0]["evidence"]["modules"][0]["nan_elements"] += 1
    altered.write_text(json.dumps(data))
    differs = run_cli("compare", str(path), str(altered), "--json", "-")
    # Only evidence moved, no verdict: compare's own code for "verdicts identical, numbers differ".
    assert differs.returncode == EXIT_NUMBERS_DIFFER
    paths = [d["path"] for d in json.loads(differs.stdout)["differences"]]
    assert paths == ["evidence.modules[0].nan_elements"]
