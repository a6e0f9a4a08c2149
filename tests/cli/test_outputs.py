"""Outputs write only regular files, never an input or another output.

They keep what they replace intact; every report read back is checked against the package's
own schema.

All of these are refused (or done) before any rank starts: `report`, `compare`, and the
output checks that every launching command runs first.
"""

import json
import os
import stat
from pathlib import Path

import pytest

from fsdpqdiag.report.model import atomic_write_bytes, atomic_write_text
from tests.support import ROOT

REPORT = next((ROOT / "reports").glob("reproduce-ws1-cpu-*.json"))


@pytest.fixture
def report_copy(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(REPORT.read_text())
    return path


def _refused(result, fragment: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry with its kind, mode, link target and content: 'nothing changed' checks."""
    entries = {}
    for entry in sorted(directory.iterdir()):
        status = entry.lstat()
        content = entry.read_bytes() if stat.S_ISREG(status.st_mode) else None
        link = os.readlink(entry) if entry.is_symlink() else None
        entries[entry.name] = (stat.S_IFMT(status.st_mode), stat.S_IMODE(status.st_mode), link, content)
    return entries


def test_device_node_is_refused_and_left_alone(run_cli, tmp_path):
    # /dev/full: an atomic rename over it would replace the device node (as root).
    before = os.stat("/dev/full")
    result = run_cli("reproduce", "--json", "/dev/full")
    _refused(result, "device node, not a regular file")
    after = os.stat("/dev/full")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_fifo_is_refused_and_stays_a_fifo(run_cli, tmp_path, report_copy):
    fifo = tmp_path / "reader"
    os.mkfifo(fifo)
    before = _snapshot(tmp_path)
    _refused(run_cli("report", str(report_copy), "-o", str(fifo), timeout=60), "FIFO, not a regular file")
    _refused(run_cli("reproduce", "--markdown", str(fifo), timeout=60), "FIFO, not a regular file")
    assert _snapshot(tmp_path) == before


def test_symlink_to_a_fifo_is_refused_by_its_target(run_cli, tmp_path):
    os.mkfifo(tmp_path / "reader")
    (tmp_path / "link.json").symlink_to("reader")
    before = _snapshot(tmp_path)
    _refused(run_cli("reproduce", "--json", str(tmp_path / "link.json")), "its link target")
    assert _snapshot(tmp_path) == before


def test_directory_is_refused(run_cli, tmp_path, report_copy):
    (tmp_path / "d").mkdir()
    before = _snapshot(tmp_path)
    _refused(run_cli("report", str(report_copy), "-o", str(tmp_path / "d")), "is a directory")
    assert _snapshot(tmp_path) == before


def test_symlink_is_written_through_to_its_target(run_cli, tmp_path, report_copy):
    (tmp_path / "target.md").write_text("old\n")
    (tmp_path / "target.md").chmod(0o640)
    link = tmp_path / "link.md"
    link.symlink_to("target.md")
    result = run_cli("report", str(report_copy), "-o", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == "target.md"
    assert (tmp_path / "target.md").read_text().startswith("#")
    assert stat.S_IMODE((tmp_path / "target.md").stat().st_mode) == 0o640
    # no temporary file left beside either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.md", "r.json", "target.md"]


def test_read_only_file_is_refused_even_for_root(run_cli, tmp_path, report_copy):
    kept = tmp_path / "kept.md"
    kept.write_text("mine\n")
    kept.chmod(0o444)
    before = _snapshot(tmp_path)
    _refused(run_cli("report", str(report_copy), "-o", str(kept)), "is read-only")
    assert _snapshot(tmp_path) == before


def test_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "r.md"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write_bytes(tmp_path / "fresh.png", b"\x89PNG")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "fresh.png").stat().st_mode) == 0o666 & ~umask


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="FIFO"):
        atomic_write_text(tmp_path / "fifo", "x")
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]


@pytest.mark.parametrize(
    "args",
    [
        ["reproduce", "--json", "{d}/x", "--markdown", "{d}/x"],
        ["reproduce", "--json", "{d}/x", "--markdown", "{d}/sub/../x"],
        ["matrix", "--json", "{d}/m", "--csv", "{d}/m"],
        ["matrix", "--out", "{d}/sweep", "--json", "{d}/sweep/cells.jsonl"],
        ["report", "{d}/r.json", "-o", "{d}/out.png", "--plot", "{d}/out.png"],
    ],
    ids=["json=markdown", "json=markdown-via-dotdot", "json=csv", "json=cells.jsonl", "output=plot"],
)
def test_two_outputs_or_an_output_and_a_sweep_record_on_one_file_are_refused(
    run_cli, tmp_path, report_copy, args
):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sweep").mkdir()
    before = _snapshot(tmp_path)
    result = run_cli(*[a.format(d=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert "same file" in result.stderr or "is the input" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_report_never_overwrites_its_input(run_cli, tmp_path, report_copy, how):
    output = report_copy
    if how == "symlink":
        output = tmp_path / "alias.json"
        output.symlink_to(report_copy)
    elif how == "hard link":
        output = tmp_path / "hard.json"
        os.link(report_copy, output)
    before = _snapshot(tmp_path)
    _refused(run_cli("report", str(report_copy), "-f", "json", "-o", str(output)), "is the input")
    assert _snapshot(tmp_path) == before


def test_binary_garbage_is_refused_not_a_traceback(run_cli, tmp_path, report_copy):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(bytes(range(256)) * 8)
    _refused(run_cli("report", str(garbage)), "not UTF-8")
    # compare says incomparable (2), never "different" (1)
    _refused(run_cli("compare", str(report_copy), str(garbage)), "not UTF-8")


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda d: d["results"][0].update(verdict="PROBABLY"), "results/0/verdict"),
        (lambda d: d.pop("env"), "the top level"),
        (lambda d: d["results"][0].update(world_size="two"), "results/0/world_size"),
    ],
    ids=["verdict", "missing-env", "world-size-type"],
)
def test_reports_the_schema_forbids_are_neither_rendered_nor_compared(
    run_cli, tmp_path, report_copy, edit, where
):
    data = json.loads(report_copy.read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = run_cli("report", str(bad))
    _refused(result, "does not match the fsdpqdiag.report/1 schema")
    assert where in result.stderr and result.stdout == ""
    _refused(run_cli("compare", str(report_copy), str(bad)), "does not match")


@pytest.mark.parametrize("command", ["matrix", "forensics"])
def test_outputs_never_land_on_the_model_directory(run_cli, tmp_path, command):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    before = _snapshot(model)
    result = run_cli(command, "--model", str(model), "--json", str(model / "config.json"))
    _refused(result, "is the input")
    assert _snapshot(model) == before
