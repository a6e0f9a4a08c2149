"""CLI contract: fast help without torch, exit codes, one-line errors that write nothing."""

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fsdpqdiag.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "result = CliRunner().invoke(app, ['reproduce', '--help'])\n"
        "assert 'Exit codes' in result.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported by --help'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_typo_is_refused_before_torch_loads():
    # Every command checks its options before the stack: a typo costs a second, not the
    # seconds of importing torch (listing fix's workarounds must import none of them).
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fsdpqdiag.cli import app\n"
        "for argv in (\n"
        "    ['fix', '--device', 'cpu', '--workaround', 'duct-tape'],\n"
        "    ['fix', '--device', 'cpu', '--ws', '0'],\n"
        "    ['matrix', '--device', 'cpu', '--cells', 'Z'],\n"
        "    ['reproduce', '--device', 'cpu', '--probe', 'no-such-probe'],\n"
        "    ['forensics', '--device', 'cpu', '--preset', 'no-such-preset'],\n"
        "    ['localize', '--device', 'cpu', '--ws', '0'],\n"
        "    ['doctor', '--device', 'cpu', '--ws', '0'],\n"
        "):\n"
        "    result = CliRunner().invoke(app, argv)\n"
        "    assert result.exit_code == 2, (argv, result.output)\n"
        "    assert 'torch' not in sys.modules, f'{argv} imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_exit_codes_are_documented(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    for fragment in ("Exit codes", "0 nothing reproduced", "2 bad input", "3 a probe"):
        assert fragment in " ".join(result.stdout.split())


BAD_INPUTS = [
    (["--ws", "0"], "--ws must be >= 1"),
    (["--ws", "-3"], "--ws must be >= 1"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "tpu"], "unknown device"),
    (["--inject", "bitflip"], "unknown fault"),
    (["--probe", "no-such-probe"], "unknown probe"),
    (["--quant-storage", "bf17"], "unknown dtype"),
    (["--quant-type", "nf5"], "unknown quant type"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--in-features", "0"], "--in-features must be >= 1"),
    (["--backend", "mpi"], "unknown backend"),
    (["--backend", "nccl", "--device", "cpu"], "--backend nccl needs --device cuda"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(run_cli, tmp_path, args, message):
    if "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid input here")
    out = tmp_path / "never.json"
    result = run_cli("reproduce", *args, "--json", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ws_above_gpu_count_is_rejected(run_cli):
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        pytest.skip("needs a visible GPU to exceed; CPU ranks have no device limit")
    result = run_cli("reproduce", "--device", "cuda", "--ws", str(gpus + 1))
    assert result.returncode == 2 and "GPUs" in result.stderr


@pytest.mark.parametrize("target", ["missing-dir/r.json", "readonly/r.json", ".", "a-file/r.json"])
def test_unwritable_json_path_is_rejected_before_work(run_cli, tmp_path, target):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    (tmp_path / "a-file").write_text("not a directory")
    path = tmp_path / target
    try:
        if os.geteuid() == 0 and target.startswith("readonly"):
            pytest.skip("root can write into a read-only directory")
        result = run_cli("reproduce", "--json", str(path))
        assert result.returncode == 2 and "cannot write" in result.stderr
        assert not (readonly / "r.json").exists()
    finally:
        readonly.chmod(0o700)


def test_missing_bitsandbytes_is_a_clear_error(tmp_path):
    # A directory on the path that shadows bitsandbytes with a package that fails to import.
    shadow = tmp_path / "bitsandbytes"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('no native library')\n")
    done = subprocess.run(
        [sys.executable, "-m", "fsdpqdiag", "reproduce", "--ws", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"),
    )
    assert done.returncode == 2 and "bitsandbytes does not import" in done.stderr


def test_a_cpu_run_imports_neither_torch_nor_bitsandbytes_in_the_parent(tmp_path):
    # The ranks import them anyway, and the first one captures the stack for the report:
    # importing them in the parent too cost every command seconds.
    report = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fsdpqdiag", "reproduce", "--device", "cpu"]
        + ["--ws", "1", "--probe", "non-float-params", "-q", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode in (0, 1, 3), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "fsdpqdiag.api" in imported  # the lines are the parent's imports
    assert not imported & {"torch", "bitsandbytes", "transformers"}
    stack = json.loads(report.read_text())["env"]
    assert stack["torch"]["version"] and stack["bitsandbytes"]["version"]
    assert stack["bitsandbytes"].get("native_library") and "import_error" not in stack["bitsandbytes"]


SOUND_TORCH = {"version": "2.13.0", "distributed_available": True}


@pytest.mark.parametrize(
    "stack, message",
    [
        ({"torch": {**SOUND_TORCH, "distributed_available": False}}, "no distributed support"),
        ({"bitsandbytes": {"import_error": "ImportError: libcuda.so"}}, "does not import: ImportError"),
        ({"bitsandbytes": {"native_library_error": "cannot open libbitsandbytes"}}, "no usable native"),
        ({"torch": SOUND_TORCH, "bitsandbytes": {"version": "0.50.2"}}, None),
    ],
)
def test_a_stack_that_cannot_run_is_named_from_what_a_rank_captured(stack, message):
    from fsdpqdiag.rank import env

    problem = env.problem(stack)
    assert problem is None if message is None else message in problem
