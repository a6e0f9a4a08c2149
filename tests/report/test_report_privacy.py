"""Nothing local or secret leaves the machine: the redaction, every committed report, and the
``--upstream`` view of the committed bitsandbytes finding."""

import copy
import json
import shlex
from pathlib import Path

import pytest

from fsdpqdiag.render import markdown, upstream
from fsdpqdiag.report.model import Report
from fsdpqdiag.report.redact import PLACEHOLDER, command_line, redact_report, redact_text
from tests.support import ROOT
from tests.support.publishable import check_markdown, leaks, unquoted_commands

REPORTS = sorted(p for p in (ROOT / "reports").rglob("*") if p.suffix in (".json", ".md", ".txt", ".csv"))
UPSTREAM = (
    ROOT / "reports" / "upstream" / "bitsandbytes-cpu-weight-repack-ws2-cpu-2core-torch2.13-bnb0.50.2.md"
)
NATIVE = "/home/alice/.venv/lib/python3.12/site-packages/bitsandbytes/libbitsandbytes_cpu.so"


def test_a_published_command_drops_outputs_and_credentials_and_quotes_the_rest():
    argv = ["watch", "--json", "/tmp/a b$(id)/r.json", "--markdown=/home/u/r.md", "--", "python"]
    argv += [
        "/home/alice/my run/train.py",
        "--hf-token",
        "hf_abcdefghijkl",
        "--api-key=s3cret",
        "--json",
        "x",
    ]
    line = command_line(["HF_TOKEN=hf_abcdefghijkl", *argv])
    assert shlex.split(line) == [
        f"HF_TOKEN={PLACEHOLDER}",
        "watch",
        "--",
        "python",
        "train.py",
        "--hf-token",
        PLACEHOLDER,
        f"--api-key={PLACEHOLDER}",
        "--json",  # the user's own command's options are kept
        "x",
    ]
    assert "$(id)" not in line and "alice" not in line and "hf_" not in line
    assert not leaks(line) and not unquoted_commands("    fsdpqdiag " + line)


def test_text_keeps_package_relative_names_and_drops_the_rest():
    text = f'lib {NATIVE}; File "/work/x/fsdpqdiag/probes/a.py", line 3; out /tmp/o/r.json; 5/5 cpu/gloo'
    assert redact_text(text) == (
        'lib bitsandbytes/libbitsandbytes_cpu.so; File "fsdpqdiag/probes/a.py", line 3; '
        "out r.json; 5/5 cpu/gloo"
    )
    assert redact_text("see https://github.com/pytorch/pytorch/issues/1") == (
        "see https://github.com/pytorch/pytorch/issues/1"
    )


def test_the_checks_catch_what_redaction_removes():
    # Positive control for the committed-report test below: the checker flags raw text.
    assert leaks(f"native_library: {NATIVE}") and leaks("HF_TOKEN=hf_abcdefghijkl")
    assert unquoted_commands("    fsdpqdiag reproduce --json a b$(id)/r.json")


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_report_holds_nothing_local(path: Path):
    text = path.read_bytes().decode()
    assert not leaks(text), leaks(text)[:5]
    if path.suffix == ".md":
        check_markdown(text, str(path))
        assert len(text) <= markdown.GITHUB_COMMENT_LIMIT
    if path.suffix == ".json" and "schema" in json.loads(text):
        report = Report.load(path)  # still valid against the schema
        assert report.argv == redact_report(report.to_dict())["argv"]


def _upstream_report() -> Report:
    return Report.load(UPSTREAM.with_suffix(".json"))


def test_committed_upstream_report_is_what_the_renderer_writes():
    text = upstream.render(_upstream_report(), "bitsandbytes")
    assert text == UPSTREAM.read_text()
    for section in ("### System Info", "### Reproduction", "```python", "### Expected behavior"):
        assert section in text
    assert "AVX512-BF16" in text  # which CPUs take that path
    with pytest.raises(upstream.NothingToReport):
        upstream.render(_upstream_report(), "pytorch")


def test_upstream_view_folds_evidence_not_findings():
    report = _upstream_report()
    # Evidence large enough to need folding; every finding's heading must stay.
    (result,) = report.results
    result.evidence["padding"] = ["x" * 100] * 2000
    report.results = [copy.deepcopy(result) for _ in range(12)]
    for index, r in enumerate(report.results):
        r.world_size = index + 1
    text = upstream.render(report, "bitsandbytes")
    assert len(text) <= markdown.GITHUB_COMMENT_LIMIT
    assert "Folded to fit" in text
    for r in report.results:
        assert f"at world size {r.world_size} on cpu/gloo" in text
    check_markdown(text)
    check_markdown(markdown.render(report))


def test_a_report_records_its_command_line_without_outputs_or_credentials():
    report = Report(
        "reproduce", ["reproduce", "--json", "/home/u/r.json", "--hf-token", "hf_abcdefghijkl"], {}, []
    )
    assert report.argv == ["reproduce", "--hf-token", PLACEHOLDER]


def _script_verdict(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "reproducers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.verdict


def _nan_rank(differing: int, output_equal: bool) -> dict:
    swap = {"differing_elements": differing, "post_bit_patterns": {"0x7fff": differing} if differing else {}}
    return {
        "world_size": 2,
        "torch": "t",
        "bitsandbytes": "b",
        "elements": 10,
        "nan_elements": 3,
        "swap_target": swap,
        "max_abs_delta": 0.0 if output_equal else 0.25,
        "output_bit_equal": output_equal,
    }


def test_nan_script_verdict_line_and_status_on_each_path():
    # The REPRODUCED path happens on CUDA only: its line and status are checked here on data.
    verdict = _script_verdict("nan_canonicalization")
    status, line = verdict([_nan_rank(3, False), _nan_rank(0, True)], "cuda")
    assert status == 1 and line.startswith("REPRODUCED ") and "0x7fff" in line and "\n" not in line
    status, line = verdict([_nan_rank(0, True), _nan_rank(0, True)], "cpu")
    assert status == 0 and line.startswith("NOT REPRODUCED ")
    status, line = verdict([_nan_rank(3, True), _nan_rank(0, True)], "cpu")
    assert status == 2 and line.startswith("INCONCLUSIVE ")
