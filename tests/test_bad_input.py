"""Every mistake a user can make: one line on stderr, exit 2, nothing written.

BAD_INPUTS is the table the README's troubleshooting section lists; a test keeps the
README's count equal to it.
"""

import json
import re

import pytest

from fsdpqdiag import faults

from .conftest import ROOT

# (command line, expected fragment of the one-line error). "{tmp}" is a fresh directory,
# "{report}" a valid report, "{corrupt}" a truncated one, "{foreign}" one of schema /99.
BAD_INPUTS = [
    (["reproduce", "--ws", "0"], "--ws must be >= 1"),
    (["reproduce", "--ws", "-2"], "--ws must be >= 1"),
    (["reproduce", "--device", "tpu"], "unknown device"),
    (["reproduce", "--backend", "mpi"], "unknown backend"),
    (["reproduce", "--inject", "bitflip"], "unknown fault"),
    (["reproduce", "--probe", "no-such-probe"], "unknown probe"),
    (["reproduce", "--quant-storage", "bf17"], "unknown dtype"),
    (["reproduce", "--quant-type", "nf5"], "unknown quant type"),
    (["reproduce", "--timeout", "0"], "--timeout must be > 0"),
    (["reproduce", "--json", "{tmp}/missing/r.json"], "cannot write"),
    (["localize", "--ws", "0"], "--ws must be >= 1"),
    (["fix", "--steps", "0"], "--steps must be >= 1"),
    (["fix", "--workaround", "duct-tape"], "unknown workaround"),
    (["fix", "--target", "gpt5"], "unknown fix target"),
    (["matrix", "--cells", "Z"], "unknown cell"),
    (["matrix", "--grid", "colour=red"], "bad --grid"),
    (["matrix", "--model", "{tmp}/no-model-here"], "does not exist"),
    (["matrix", "--model", "{tmp}"], "not a Hugging Face model directory"),
    (["matrix", "--resume", "{tmp}"], "no cells.jsonl"),
    (["report", "{corrupt}"], "is not valid JSON"),
    (["report", "{foreign}"], "unsupported report schema"),
    (["report", "{report}", "--format", "pdf"], "unknown format"),
    (["report", "{report}", "-o", "{tmp}/missing/r.md"], "cannot write"),
    (["compare", "{report}", "{foreign}"], "unsupported report schema"),
    (["compare", "{report}", "{tmp}/absent.json"], "cannot read"),
]


@pytest.fixture
def inputs(tmp_path):
    report = next((ROOT / "reports").glob("reproduce-*.json"))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(report.read_text()[:200])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**json.loads(report.read_text()), "schema": "fsdpqdiag.report/99"}))
    work = tmp_path / "work"
    work.mkdir()
    return {"tmp": str(work), "report": str(report), "corrupt": str(corrupt), "foreign": str(foreign)}


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input(run_cli, inputs, argv, message):
    args = [part.format(**inputs) for part in argv]
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # nothing was written where the run was pointed
    assert list(__import__("pathlib").Path(inputs["tmp"]).iterdir()) == []


def test_readme_counts_are_true():
    readme = (ROOT / "README.md").read_text()
    bad = re.search(r"covers (\d+) bad inputs", readme)
    fault_count = re.search(r"(\d+) injected faults", readme)
    assert bad and int(bad.group(1)) == len(BAD_INPUTS)
    assert fault_count and int(fault_count.group(1)) == len(faults.FAULTS)


def test_full_disk_is_refused_before_work(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from fsdpqdiag.report import check_writable

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(ValueError, match="is full"):
        check_writable(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []
