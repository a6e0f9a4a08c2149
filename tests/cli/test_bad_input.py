"""Every mistake a user can make: one line on stderr, exit 2, nothing written.

BAD_INPUTS is the table docs/troubleshooting.md lists; a test keeps the page's count equal to it.
"""

import json
import re
from pathlib import Path

import pytest

from fsdpqdiag.stack import faults
from tests.support import ROOT

# (command line, expected fragment of the one-line error[, environment]). "{tmp}" is a fresh
# directory, "{report}" a valid report, "{corrupt}" a truncated one, "{foreign}" one of
# schema /99, "{copy}" a copy of a valid report, "{binary}" binary garbage, "{verdict}" a
# report whose verdict the schema forbids, "{bert}" a BERT checkpoint's config, "{config_only}"
# a causal-LM config without weights, "{a_file}" a regular file.
TORCHRUN = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
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
    (["reproduce", "--timeout", "nan"], "--timeout must be > 0 and finite"),
    (["reproduce", "--timeout", "inf"], "--timeout must be > 0 and finite"),
    (["reproduce", "--in-features", "7", "--out-features", "7"], "bfloat16 storage"),
    (["reproduce", "--in-features", "6", "--out-features", "6"], "also packs it as float32"),
    (["reproduce", "--compute-dtype", "int8"], "--compute-dtype must be a float dtype"),
    (["reproduce", "--param-dtype", "uint8"], "--param-dtype must be a float dtype"),
    (["reproduce"], "outside 0..1", {**TORCHRUN, "RANK": "5"}),
    (["reproduce"], "half-set torchrun environment", {"RANK": "0", "WORLD_SIZE": "2"}),
    (["reproduce", "--json", "/dev/full"], "not a regular file"),
    (["reproduce", "--json", "{tmp}/r", "--markdown", "{tmp}/r"], "is the same file"),
    (["matrix", "--grid", "quant_type=nf4", "--grid", "quant_type=fp4"], "already given"),
    (["matrix", "--model", "{bert}"], "not a causal LM"),
    (["matrix", "--model", "{config_only}"], "no weights"),
    (["matrix"], "cannot build the preset in FSDPQDIAG_CACHE", {"FSDPQDIAG_CACHE": "{a_file}"}),
    (["report", "{copy}", "-o", "{copy}"], "is the input"),
    (["report", "{binary}"], "not UTF-8"),
    (["report", "{verdict}"], "does not match the fsdpqdiag.report/1 schema"),
    (["compare", "{report}", "{binary}"], "not UTF-8"),
    (["localize", "--in-features", "16", "--out-features", "16"], "the payload needs 254"),
    (["reproduce", "--weight-seed", str(1 << 64)], "--weight-seed must fit in 64 bits"),
    (["reproduce", "--json", "{tmp}/r.json"], "expected fork or spawn", {"FSDPQDIAG_RANK_START": "vfork"}),
]


@pytest.fixture
def inputs(tmp_path):
    report = next((ROOT / "reports").glob("reproduce-*.json"))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(report.read_text()[:200])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**json.loads(report.read_text()), "schema": "fsdpqdiag.report/99"}))
    copy = tmp_path / "copy.json"
    copy.write_text(report.read_text())
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(256)) * 4)
    verdict = tmp_path / "verdict.json"
    data = json.loads(report.read_text())
    data["results"][0]["verdict"] = "PROBABLY"
    verdict.write_text(json.dumps(data))
    models = {"bert": ("bert", "BertForMaskedLM"), "config_only": ("llama", "LlamaForCausalLM")}
    for name, (model_type, architecture) in models.items():
        (tmp_path / name).mkdir()
        config = {"model_type": model_type, "architectures": [architecture]}
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    work = tmp_path / "work"
    work.mkdir()
    paths = {"copy": copy, "binary": binary, "verdict": verdict, "a_file": a_file}
    paths.update({name: tmp_path / name for name in models})
    return {
        "tmp": str(work),
        "report": str(report),
        "corrupt": str(corrupt),
        "foreign": str(foreign),
        **{name: str(path) for name, path in paths.items()},
    }


def _with_env(row: tuple) -> tuple[list[str], str, dict[str, str]]:
    return (row[0], row[1], row[2] if len(row) > 2 else {})


@pytest.mark.parametrize(
    "argv, message, env",
    [_with_env(row) for row in BAD_INPUTS],
    ids=[" ".join([*(f"{key}=" for key in sorted(_with_env(row)[2])), *row[0]]) for row in BAD_INPUTS],
)
def test_bad_input(run_cli, inputs, argv, message, env):
    args = [part.format(**inputs) for part in argv]
    before = {name: Path(path).read_bytes() for name, path in inputs.items() if Path(path).is_file()}
    result = run_cli(*args, env={key: value.format(**inputs) for key, value in env.items()})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # nothing was written where the run was pointed, nor over any input
    assert list(Path(inputs["tmp"]).iterdir()) == []
    assert {name: Path(inputs[name]).read_bytes() for name in before} == before


def test_docs_counts_are_true():
    readme = (ROOT / "docs/troubleshooting.md").read_text()
    bad = re.search(r"covers (\d+) bad inputs", readme)
    fault_count = re.search(r"(\d+) injected faults", readme)
    assert bad and int(bad.group(1)) == len(BAD_INPUTS)
    assert fault_count and int(fault_count.group(1)) == len(faults.FAULTS)


def _table(readme: str, header: str) -> list[list[str]]:
    """The rows (cells, backticks dropped) of the Markdown table under ``header``."""
    lines = readme[readme.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("`", "") for cell in line.strip("|").split(" | ")])
    return rows


def test_docs_troubleshooting_table_is_this_table():
    # Not only the count: row by row, the page shows the command and the error each
    # BAD_INPUTS case checks, in the same order.
    rows = _table((ROOT / "docs/troubleshooting.md").read_text(), "| command | the error says |")
    assert len(rows) == len(BAD_INPUTS)
    for (command, says), row in zip(rows, BAD_INPUTS):
        argv, message = row[0], row[1]
        assert f"fsdpqdiag {argv[0]}" in command, (command, argv)
        assert message in says, (says, message)


def test_docs_fault_figures_are_true():
    # "the suite uses all N injected faults": each is in the positive-controls table and used by a test.
    readme = (ROOT / "docs/troubleshooting.md").read_text() + (ROOT / "docs/positive-controls.md").read_text()
    assert re.search(r"uses all\s+(\d+)\s+injected faults", readme).group(1) == str(len(faults.FAULTS))
    tests = "".join(path.read_text() for path in (ROOT / "tests").rglob("test_*.py"))
    fault_rows = " ".join(row[0] for row in _table(readme, "| fault | what it does |"))
    for fault in faults.FAULTS:
        assert fault in fault_rows, fault
        assert f'"{fault}"' in tests, f"no test injects {fault}"


def test_readme_exit_codes_are_the_documented_set():
    from fsdpqdiag.report.model import EXIT_CODES_HELP
    from tests.cli.test_fuzz import DOCUMENTED_EXIT_CODES

    rows = _table((ROOT / "README.md").read_text(), "| code | meaning |")
    assert {int(row[0]) for row in rows} == DOCUMENTED_EXIT_CODES
    assert all(str(code) in EXIT_CODES_HELP for code in DOCUMENTED_EXIT_CODES)


def test_full_disk_is_refused_before_work(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    from fsdpqdiag.report.model import check_writable

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(ValueError, match="is full"):
        check_writable(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def _library_templates() -> list[str]:
    """The template of every ``BadInput.about(...)`` in fsdpqdiag/api, read from the source."""
    import ast

    templates = []
    for path in (ROOT / "fsdpqdiag/api").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "about"
                and node.args
            ):
                first = node.args[0]
                if isinstance(first, ast.Call):  # "... {option=1} ...".replace("option", parameter)
                    first = first.func.value
                assert isinstance(first, ast.Constant), ast.dump(first)
                templates.append(first.value)
    return templates


def test_every_parameter_a_library_error_names_has_a_flag():
    import string

    from fsdpqdiag.cli.app import FLAGS
    from fsdpqdiag.errors import BadInput

    templates = _library_templates()
    assert len(templates) >= 15
    named = {
        field.partition("=")[0]
        for template in templates
        for _, field, _, _ in string.Formatter().parse(template)
        if field and not field.isdigit()
    }
    # "option" stands for each parameter a resumed sweep may repeat, listed below.
    assert named - {"option"} <= set(FLAGS), named - set(FLAGS)
    # The parameters _refuse_conflicts names, one per option a resumed sweep may repeat.
    resumable = ["cells/grid", "world_sizes", "device", "backend", "model", "preset", "lora", "inject"]
    assert set(resumable) <= set(FLAGS)
    assert BadInput.about("{out_dir=0}: {lora=1}", "d", False).parameters == ["out_dir", "lora"]


@pytest.mark.parametrize(
    "call, library, cli",
    [
        (
            lambda api: api.run_configs([0], "cpu", "auto", 10.0, None),
            "world_sizes must be >= 1, got 0",
            "--ws must be >= 1, got 0",
        ),
        (
            lambda api: api.run_configs([1], "cpu", "auto", 0.0, None),
            "timeout_s must be > 0 and finite",
            "--timeout must be > 0 and finite",
        ),
        (
            lambda api: api.run_configs([1], "cpu", "nccl", 10.0, None),
            "backend='nccl' needs device='cuda'",
            "--backend nccl needs --device cuda",
        ),
        (
            lambda api: api.check_inject("bitflip"),
            "unknown fault 'bitflip' for inject",
            "unknown fault 'bitflip' for --inject",
        ),
        (
            lambda api: api.matrix(resume="/a", out_dir="/b"),
            "resume='/a' continues the sweep in its own directory; drop out_dir='/b'",
            "--resume /a continues the sweep in its own directory; drop --out /b",
        ),
    ],
)
def test_library_errors_name_parameters_and_the_cli_names_flags(call, library, cli):
    from fsdpqdiag import api
    from fsdpqdiag.cli.app import FlagNames

    with pytest.raises(api.BadInput) as raised:
        call(api)
    assert str(raised.value).startswith(library), str(raised.value)
    assert raised.value.worded(FlagNames()).startswith(cli)
