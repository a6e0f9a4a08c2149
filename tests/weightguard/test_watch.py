"""fsdpqdiag watch: an unchanged command, the guard in every process, one merged report.

The real QLoRA example under the real torchrun (CPU, gloo, WS=2): once with
--inject nan-canonicalize (must trip, naming exactly the weights that hold NaN-class
containers, from step 0), once more with --fix fsdp2-bytes added (must stay silent: the fix
is the only difference), and once without a fault with --params all (must stay silent while
AdamW updates the LoRA weights). The rest are cheap commands for exit codes and chaining.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsdpqdiag.report.model import Report
from tests.support import ROOT, session_cache

EXAMPLE = ROOT / "examples" / "train_fsdp2_qlora.py"


def _watch(args, tmp: Path, cache: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), FSDPQDIAG_CACHE=str(cache), COLUMNS="200", OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "fsdpqdiag", "watch", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp,
    )  # fmt: skip


def _torchrun(world_size: int, *script_args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
        str(EXAMPLE), *script_args,
    ]  # fmt: skip


def _own_warnings(stderr: str) -> list[str]:
    """Warnings of fsdpqdiag's own in the user's log. A deprecated collective's warning names
    torch's c10d_logger, not its caller; these scripts call no collective of their own."""
    return [
        line
        for line in stderr.splitlines()
        if "Warning:" in line and ("fsdpqdiag" in line or "`torch.distributed." in line)
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return session_cache(tmp_path_factory)


def _watch_example(tmp_path_factory, cache, name: str, watch_options: list[str], steps: int):
    """``watch`` of the QLoRA example under torchrun at WS=2: (its result, its folder)."""
    tmp = tmp_path_factory.mktemp(name)
    command = ["--json", "w.json", *watch_options, "--", *_torchrun(2, "--steps", str(steps))]
    return _watch(command, tmp, cache), tmp


@pytest.fixture(scope="module")
def injected(tmp_path_factory, cache):
    options = ["--markdown", "w.md", "--inject", "nan-canonicalize"]
    return _watch_example(tmp_path_factory, cache, "watch-injected", options, steps=2)


@pytest.fixture(scope="module")
def injected_fixed(tmp_path_factory, cache):
    options = ["--inject", "nan-canonicalize", "--fix", "fsdp2-bytes"]
    return _watch_example(tmp_path_factory, cache, "watch-injected-fixed", options, steps=2)


@pytest.fixture(scope="module")
def clean_all(tmp_path_factory, cache):
    return _watch_example(tmp_path_factory, cache, "watch-clean", ["--params", "all"], steps=3)


def _nan_class_weights(cache: Path) -> set[str]:
    """Ground truth, independent of the guard: the preset's quantized weights (as the example
    loads them) that hold NaN-class containers, which the fault rewrites."""
    os.environ["FSDPQDIAG_CACHE"] = str(cache)
    from fsdpqdiag.evidence.bytes import nan_census, plain
    from fsdpqdiag.stack import models

    model = models.load_quantized(models.preset_dir("tiny-llama"), models.QuantConfig(), "cpu")
    return {
        name.removesuffix(".weight")
        for name, _, param, _ in models.quantized_parameters(model)
        if nan_census(plain(param))["nan_elements"]
    }


@pytest.mark.slow
def test_watch_trips_naming_the_altered_modules_and_the_step(injected, cache):
    completed, tmp = injected
    assert completed.returncode == 1, completed.stderr[-3000:]
    report = Report.load(tmp / "w.json")
    (result,) = report.results
    assert result.verdict == "REPRODUCED" and result.injected == "nan-canonicalize"
    assert result.world_size == 2 and result.config["command_exit"] == 0
    altered = {m["module"].replace("base_model.model.", "").removesuffix(".base_layer")
               for m in result.evidence["modules"]}  # fmt: skip
    assert altered == _nan_class_weights(cache)
    assert {m["first_step"] for m in result.evidence["modules"]} == {0}
    assert result.evidence["attribution"]["component"] == "injected fault"
    assert result.evidence["attribution"]["controls_point_to"] == "torch.distributed.fsdp"
    markdown = (tmp / "w.md").read_text()
    assert "File against" in markdown and "layers.1.mlp.down_proj" in markdown
    assert "REPRODUCED" in completed.stdout
    assert not _own_warnings(completed.stderr)


@pytest.mark.slow
def test_watch_fix_keeps_the_injected_run_silent(injected, injected_fixed):
    """The run that trips above, with fsdp2-bytes applied in its ranks: every guarded weight
    reaches forward byte-true, and the report names the fix."""
    assert injected[0].returncode == 1
    completed, tmp = injected_fixed
    assert completed.returncode == 0, completed.stderr[-3000:]
    (result,) = Report.load(tmp / "w.json").results
    assert result.verdict == "NOT REPRODUCED" and result.injected == "nan-canonicalize"
    assert result.config["fix"] == "fsdp2-bytes"
    assert result.evidence["fix"] == {"name": "fsdp2-bytes", "errors": []}
    tripped = Report.load(injected[1] / "w.json").results[0].evidence
    assert result.evidence["guarded"] == tripped["guarded"] and result.evidence["processes"] == 2
    assert result.evidence["checks"] >= 2 * result.evidence["guarded"]
    assert "with fix fsdp2-bytes applied" in result.summary
    assert not _own_warnings(completed.stderr)


@pytest.mark.slow
def test_watch_is_silent_without_fault_and_with_optimizer_updates(clean_all):
    completed, tmp = clean_all
    assert completed.returncode == 0, completed.stderr[-3000:]
    (result,) = Report.load(tmp / "w.json").results
    assert result.verdict == "NOT REPRODUCED"
    evidence = result.evidence
    assert evidence["steps"] == 3 and evidence["processes"] == 2
    assert any("lora_A" in name for name in evidence["guarded_parameters"])
    assert evidence["checks"] >= 2 * 3 * evidence["guarded"]


def test_watch_exit_code_is_the_commands_and_says_the_guard_never_attached(tmp_path):
    """A command that fails keeps its own exit code: it is not a pass either."""
    completed = _watch(
        ["--json", "w.json", "--", sys.executable, "-c", "raise SystemExit(3)"], tmp_path, tmp_path
    )
    assert completed.returncode == 3, completed.stderr
    (result,) = Report.load(tmp_path / "w.json").results
    assert result.verdict == "SKIPPED" and result.config["command_exit"] == 3


def test_watch_nothing_checked_is_not_a_pass(tmp_path):
    """A command that never shards and exits 0: exit 3 and one line on stderr, even with -q."""
    completed = _watch(["-q", "--json", "w.json", "--", sys.executable, "-c", "print(1)"], tmp_path, tmp_path)
    assert completed.returncode == 3, completed.stderr
    (line,) = completed.stderr.strip().splitlines()
    assert "nothing checked" in line and "fully_shard" in line
    (result,) = Report.load(tmp_path / "w.json").results
    assert result.verdict == "SKIPPED" and result.config["command_exit"] == 0
    assert result.evidence["checks"] == 0


def test_watch_exit_code_of_a_command_killed_by_a_signal(tmp_path):
    completed = _watch(["-q", "--", "sh", "-c", "kill -TERM $$"], tmp_path, tmp_path)
    assert completed.returncode == 143


def test_watch_keeps_an_existing_sitecustomize(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    probe = (
        "import os, sys; "
        "print('ran', os.environ.get('USER_SITECUSTOMIZE_RAN'), 'fsdpqdiag.weightguard.auto' in sys.modules)"
    )
    env_path = f"{site}{os.pathsep}{ROOT}"
    completed = subprocess.run(
        [sys.executable, "-m", "fsdpqdiag", "watch", "-q", "--", sys.executable, "-c", probe],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=env_path, COLUMNS="200"),
    )  # fmt: skip
    assert completed.returncode == 3, completed.stderr  # it never shards: nothing checked
    assert "ran 1 True" in completed.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no command to watch"),
        (["--"], "no command to watch"),
        (["--inject", "bogus", "--", "true"], "unknown fault 'bogus'"),
        (["--json", "/nonexistent-dir/w.json", "--", "true"], "cannot write /nonexistent-dir/w.json"),
        (["--", "no-such-program-x"], "not found on PATH"),
        (["--params", "some", "--", "true"], "unknown --params"),
        (["--every", "0", "--", "true"], "--every must be at least 1"),
        (["--fix", "bogus", "--", "true"], "unknown fix 'bogus'"),
        (["--fix", "uint8-storage", "--", "true"], "cannot be applied to an unchanged run"),
    ],
)
def test_watch_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    completed = _watch(args, tmp_path, tmp_path, timeout=60)
    assert completed.returncode == 2
    assert message in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w.json").exists()


def test_watch_raise_stops_a_plain_process_and_exits_1(tmp_path):
    """No torchrun: the sitecustomize arms the guard and the fault in a plain python process;
    action raise stops the command in its first forward, and watch answers 1."""
    script = ROOT / "tests" / "support" / "watch_tiny_train.py"
    completed = _watch(
        ["--json", "w.json", "--action", "raise", "--inject", "nan-canonicalize", "--",
         sys.executable, str(script), "3"],
        tmp_path, tmp_path, timeout=180,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "GuardTripped" in completed.stderr
    assert not _own_warnings(completed.stderr)
    nan_weights = set(completed.stdout.split("nan-weights ", 1)[1].split()[0].split(","))
    (result,) = Report.load(tmp_path / "w.json").results
    assert result.verdict == "REPRODUCED" and result.config["command_exit"] == 1
    assert result.world_size == 1
    # raise stops at the first altered weight forward reaches: one module, step 0
    (module,) = result.evidence["modules"]
    assert module["module"] in nan_weights and module["first_step"] == 0


def test_watch_reports_a_fix_that_does_not_help(tmp_path):
    """axolotl-int8 guards integer parameters against a cast; bf16 packed storage (what this
    script builds, and what the fault rewrites) is untouched by it: the run still trips, and
    the report says so, with the fix, the modules and exit 1."""
    script = ROOT / "tests" / "support" / "watch_tiny_train.py"
    completed = _watch(
        ["-q", "--json", "w.json", "--inject", "nan-canonicalize", "--fix", "axolotl-int8", "--",
         sys.executable, str(script), "2"],
        tmp_path, tmp_path, timeout=180,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr[-3000:]
    nan_weights = set(completed.stdout.split("nan-weights ", 1)[1].split()[0].split(","))
    (result,) = Report.load(tmp_path / "w.json").results
    assert result.verdict == "REPRODUCED" and result.config["fix"] == "axolotl-int8"
    assert result.evidence["fix"]["errors"] == []
    assert {m["module"] for m in result.evidence["modules"]} == nan_weights
    assert "with fix axolotl-int8 applied" in result.summary and "does not help" in result.summary


def test_a_guard_that_cannot_attach_leaves_the_run_alone(tmp_path, monkeypatch):
    """A guard that fails to set up (here: params the CLI would refuse) must not break the
    training: the command completes, its exit code stands, the report says ERROR and why."""
    from fsdpqdiag.weightguard import watch

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FSDPQDIAG_CACHE", str(tmp_path))
    outcome = watch.run(
        [sys.executable, str(ROOT / "tests" / "support" / "watch_tiny_train.py"), "1"], params="everything"
    )
    # Nothing was checked: not a pass, though the command succeeded.
    assert outcome.command_exit == 0 and outcome.exit_code == 3 and not outcome.checked
    (result,) = outcome.report.results
    assert result.verdict == "ERROR"
    assert "could not attach" in result.summary and "params must be one of" in result.summary


def test_the_report_describes_the_stack_rank_0_of_the_job_ran_on():
    """The command may run on another interpreter than watch: rank 0's record carries its stack."""
    from fsdpqdiag.weightguard.job import stack_of

    states = [{"rank": 1, "stack": {"python": "b"}}, {"rank": 0, "stack": {"python": "a"}}, {"rank": 2}]
    assert stack_of(states) == {"python": "a"}
    assert stack_of([{"rank": 0}])["python"] == sys.version.split()[0], "none recorded: watch's own"
