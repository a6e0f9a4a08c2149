"""What every probe must bring, checked without launching a rank.

A probe is one module with its presentation, one registry line, its standalone script and
its tests. The parts nothing else would enforce are checked here: its key numbers and
detail table, declared in its own module (so no renderer needs a branch for it), the faults
that must flip it (its positive controls) and its reproducer. And the renderers name no
probe and no command, and drawing a report imports no torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fsdpqdiag.core import presentation, registry
from fsdpqdiag.core.registry import all_tasks
from fsdpqdiag.probes.base import Probe
from fsdpqdiag.stack.faults import FAULTS
from fsdpqdiag.tasks import PROBES, presentation_of
from tests.support import ROOT

RENDERERS = sorted((ROOT / "fsdpqdiag" / "render").glob("*.py"))
REPORTS = sorted((ROOT / "reports").glob("*.json"))
# A rank task that never becomes a result of its own: its outcomes go to report.preflight.
INTERNAL_TASKS = {"preflight"}


def _probe_names_in_reports() -> set[str]:
    return {result["probe"] for path in REPORTS for result in json.loads(path.read_text())["results"]}


def _module_of(probe: Probe):
    """The module whose PROBE it is."""
    return next(m for m in list(sys.modules.values()) if getattr(m, "PROBE", None) is probe)


@pytest.mark.parametrize("name", sorted(set(all_tasks()) - INTERNAL_TASKS))
def test_probe_has_its_presentation_in_its_own_module(name):
    probe = all_tasks()[name]
    module = _module_of(probe)
    declared = probe.presentation
    assert declared is not Probe.__dataclass_fields__["presentation"].default, (
        f"{module.__name__} gives its PROBE no presentation"
    )
    assert callable(declared.key_numbers), f"{module.__name__}: no key_numbers"
    # Where the module words its key numbers, they are the ones its probe carries.
    assert getattr(module, "key_numbers", declared.key_numbers) is declared.key_numbers
    assert presentation_of(name) is declared  # what the renderers find is what the probe carries
    # A rank that died before measuring leaves sparse evidence: the result must still render.
    assert isinstance(probe.key_numbers({}), str)
    assert probe.detail({}) is None or isinstance(probe.detail({}), presentation.DetailTable)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_declares_positive_controls_that_exist(name):
    controls = PROBES[name].controls
    assert controls, f"{name} declares no positive-control fault (Probe.controls)"
    unknown = [fault for fault in controls if fault not in FAULTS]
    assert not unknown, f"{name}: {unknown} are not faults of fsdpqdiag/stack/faults.py"


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_declares_a_standalone_script_that_exists(name):
    standalone = PROBES[name].standalone
    assert standalone, f"{name} declares no standalone script (Probe.standalone)"
    path = ROOT / standalone
    assert path.parent == ROOT / "reproducers" and path.is_file(), f"{name}: no {standalone}"


def test_every_result_of_a_committed_report_has_a_presentation():
    """The rank tasks of other commands (matrix cells, fix-verify, ...) word their key
    numbers the same way; a name a report holds that no probe presents would render blank."""
    missing = [name for name in sorted(_probe_names_in_reports()) if registry.presentation(name) is None]
    assert not missing, f"no presentation for {missing}"


def test_the_guards_results_have_a_presentation_without_being_a_task():
    from fsdpqdiag.weightguard import watch  # written by watch, not launched

    assert watch.RESULT_KIND not in all_tasks()
    assert presentation_of(watch.RESULT_KIND) is watch.PRESENTATION
    with pytest.raises(ValueError, match="already have a presentation"):
        registry.present(watch.RESULT_KIND, presentation.Presentation())
    with pytest.raises(ValueError, match="already have a presentation"):
        registry.present("nan-canonicalization", presentation.Presentation())


def test_a_result_of_an_unknown_probe_renders_from_its_verdict_alone():
    # an older or foreign report's probe, or a name that only looks like a module path
    for name in ("no-such-probe", "", "..render", "os.path", "probe-batch"):
        assert registry.presentation(name) is None
        assert presentation_of(name).detail({"rows": [{}]}) is None
        assert not presentation_of(name).sections
    assert presentation_of("no-such-probe").key_numbers({"stages": {"load": {"ok": True}}}) == "load: ok"


def _command_names() -> set[str]:
    from fsdpqdiag.cli import app

    return {command.name or command.callback.__name__ for command in app.registered_commands}


@pytest.mark.parametrize("path", RENDERERS, ids=[p.name for p in RENDERERS])
def test_renderers_name_no_probe_and_no_command(path):
    text = path.read_text()
    named = [name for name in PROBES if name in text]
    assert not named, f"{path.name} names the probes {named}: that belongs to their presentation"
    # Rank tasks and commands are ordinary words too ("matrix", "fix", a report's "preflight"
    # field): a renderer may say them, but not compare a report's fields with them or map
    # them to a view.
    for name in sorted(set(all_tasks()) | _command_names()):
        quoted = rf"""["']{re.escape(name)}["']"""
        branch = re.search(rf"(==|!=)\s*{quoted}|{quoted}\s*(==|!=|:)|\bin\s*[(\[{{][^)\]}}]*{quoted}", text)
        assert not branch, f"{path.name} branches on the name: {branch.group(0)}"


def test_renderers_import_no_torch():
    script = (
        "import sys, io, pathlib\n"
        "from rich.console import Console\n"
        "from fsdpqdiag.cli.reports import report_tables\n"
        "from fsdpqdiag.render.markdown import render\n"
        "from fsdpqdiag.report.model import Report\n"
        "for path in sorted(pathlib.Path('reports').glob('*.json')):\n"
        "    report = Report.load(path)\n"
        "    render(report)\n"
        "    Console(file=io.StringIO(), width=80).print(report_tables(report))\n"
        "print(sorted(m for m in ('torch', 'bitsandbytes') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# Reports whose results draw detail tables of their own (storage-dtype-mismatch's, the guard's).
RENDERED = (
    ("report", "reports/reproduce-ws2-cpu-2core-torch2.14.1-bnb0.50.2.json"),
    ("report", "reports/watch-ws2-cpu-2core-torch2.14.1-bnb0.50.2-nan-canonicalize.json", "-f", "table"),
    (
        "compare",
        "reports/reproduce-ws2-cpu-2core-torch2.13-bnb0.50.2.json",
        "reports/reproduce-ws2-cpu-2core-torch2.14.1-bnb0.50.2.json",
    ),
)


@pytest.mark.parametrize("argv", RENDERED, ids=[" ".join(argv[:1] + argv[-1:]) for argv in RENDERED])
def test_drawing_a_report_from_the_command_line_imports_no_torch(argv):
    """The renderers find presentations through every task module (fsdpqdiag.tasks): none of
    them may pull in torch, bitsandbytes or transformers at import: reading a report must
    need none of them installed, and not wait seconds for them to load."""
    script = (
        "import runpy, sys\n"
        f"sys.argv, code = ['fsdpqdiag', *{list(argv)!r}], None\n"
        "try:\n"
        "    runpy.run_module('fsdpqdiag', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    code = done.code\n"
        "heavy = sorted(m for m in ('torch', 'bitsandbytes', 'transformers') if m in sys.modules)\n"
        "print(f'exit {code} heavy {heavy}', file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("heavy []"), done.stderr
    assert last.startswith(("exit 0", "exit 1")), done.stderr  # compare: 1 lists the differences


class _ReadRecorder(dict):
    """Evidence that records which of its keys a presentation reads ("*": all of them)."""

    def __init__(self, evidence: dict) -> None:
        super().__init__(evidence)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def __iter__(self):
        self.read.add("*")
        return super().__iter__()

    def keys(self):
        self.read.add("*")
        return super().keys()

    def items(self):
        self.read.add("*")
        return super().items()

    def values(self):
        self.read.add("*")
        return super().values()


def _committed_evidence(name: str) -> list[dict]:
    return [
        result["evidence"]
        for path in REPORTS
        for result in json.loads(path.read_text())["results"]
        if result["probe"] == name
    ]


def _presented() -> list[str]:
    """Every name with a presentation of its own: the rank tasks and the guard's results."""
    from fsdpqdiag.weightguard import watch

    return sorted((set(all_tasks()) - INTERNAL_TASKS) | {watch.RESULT_KIND})


def _check_reads(name: str, evidences: list[dict]) -> set[str]:
    """The keys the presentation of ``name`` read across ``evidences``, each checked to be
    declared in its ``reads``; returns the keys the evidences hold."""
    declared = presentation_of(name)
    written: set[str] = set()
    for evidence in evidences:
        recorded = _ReadRecorder(evidence)
        declared.key_numbers(recorded)
        declared.detail(recorded)
        undeclared = recorded.read - declared.reads
        assert not undeclared, f"{name}'s presentation reads {sorted(undeclared)} without declaring them"
        written |= set(evidence)
    return written


@pytest.mark.parametrize("name", _presented())
def test_a_presentation_reads_only_the_keys_it_declares_and_each_is_written(name):
    """Over every committed result of the probe: its key numbers and detail table read only
    the keys its presentation declares, and each declared key (and each view of the weight it
    keeps under a key of its own) is one some result of the probe holds: a renamed key fails
    here instead of rendering a blank cell."""
    declared = presentation_of(name)
    evidences = _committed_evidence(name)
    assert evidences, f"no committed report holds a result of {name}"
    written = _check_reads(name, evidences)
    assert set(declared.sections) <= set(presentation.WEIGHT_VIEWS), name
    never_written = (declared.reads | set(declared.sections.values())) - written
    assert not never_written, f"{name} declares {sorted(never_written)}, which no result of it holds"


@pytest.mark.parametrize("name", sorted(PROBES))
def test_what_a_probe_writes_today_is_what_its_presentation_reads(name, shared_cli):
    """The same contract over the shared world-size-1 run of this checkout's code: a key the
    probe stopped writing shows here although the committed reports still hold it."""
    from tests.support import reproduce_small

    run = shared_cli(*reproduce_small(1), timeout=600)
    assert run.json_path.exists(), run.stderr[-3000:]
    (result,) = [r for r in run.report["results"] if r["probe"] == name]
    written = _check_reads(name, [result["evidence"]])
    if result["verdict"] in ("UNSUPPORTED", "SKIPPED"):
        pytest.skip(f"{name} was not measured here ({result['verdict']}): {result['summary']}")
    declared = presentation_of(name)
    never_written = (declared.reads | set(declared.sections.values())) - written
    assert not never_written, f"{name} declares {sorted(never_written)}, which it no longer writes"


def test_the_reads_recorder_catches_an_undeclared_key():
    # Positive control: a presentation that reads a key it does not declare is caught.
    sneaky = presentation.Presentation(lambda evidence: str(evidence.get("undeclared")), reads=frozenset())
    recorded = _ReadRecorder({"undeclared": 1})
    sneaky.key_numbers(recorded)
    assert recorded.read - sneaky.reads == {"undeclared"}
