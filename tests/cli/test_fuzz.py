"""Generated inputs against the CLI's contract (hypothesis).

Every command, its options, output paths, report files and torchrun variables.

The contract: the exit code is one the README documents; no traceback; a refusal (exit 2)
is at most one line on stderr and creates or modifies no file. It runs in-process
(typer's CliRunner), so torch is imported once. Commands that launch ranks always get at
least one refused input, placed last so that a repeated option cannot override it, and the
launcher is replaced by a tripwire: an example that would start a rank fails the test
instead of costing a launch. `report`, `compare` and `env` start no rank and run whole.

Examples hypothesis found are kept below as ``@example`` regression cases.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fsdpqdiag.stack.faults import FAULTS
from fsdpqdiag.tasks import PROBES
from tests.support import ROOT

# 4: compare's verdicts identical, numbers differ.
DOCUMENTED_EXIT_CODES = {0, 1, 2, 3, 4, 74, 129, 130, 141, 143}
REPORT = next((ROOT / "reports").glob("reproduce-ws1-cpu-*.json"))
WITH_POSITIONS = next((ROOT / "reports").glob("reproduce-ws1-h100-*-nan-canonicalize.json"))
# No example database: the cases worth keeping are the @examples below, and a run must not
# leave a .hypothesis directory in the checkout.
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Paths by name; each names an entry of the sandbox ``_zoo`` builds (or a device node).
OUTPUT_PATHS = ["new.json", "existing.md", "link.json", "dangling", "dir/../new2.md", "sub/new.md"]
REFUSED_OUTPUTS = [
    "fifo",
    "dir",
    "ro.md",
    "/dev/full",
    "/dev/null",
    "missing/x.json",
    "link-to-fifo",
    "/sys/x.json",
    "/proc/x.json",
    "n" * 250 + ".json",
]
REPORT_FILES = [
    "report.json",
    "positions.json",
    "truncated.json",
    "binary.json",
    "foreign.json",
    "verdict.json",
    "empty.json",
    "list.json",
    "absent.json",
    "dir",
    "fifo-never-read",
    # Hostile files: each is refused in one line naming the limit or the problem.
    "deep.json",
    "nan.json",
    "duplicate-keys.json",
    "bom.json",
    "latin1.json",
    "long-string.json",
]
TORCHRUN = {"LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
REFUSED_ENVIRONMENTS = [
    {"RANK": "0", "WORLD_SIZE": "2"},
    {"RANK": "5", "WORLD_SIZE": "2", **TORCHRUN},
    {"RANK": "0", "WORLD_SIZE": "two", **TORCHRUN},
    {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
]


def _zoo(root: Path) -> None:
    (root / "report.json").write_bytes(REPORT.read_bytes())
    (root / "positions.json").write_bytes(WITH_POSITIONS.read_bytes())
    (root / "truncated.json").write_bytes(REPORT.read_bytes()[:300])
    (root / "binary.json").write_bytes(bytes(range(256)) * 3)
    text = REPORT.read_text()
    (root / "foreign.json").write_text(text.replace('"fsdpqdiag.report/1"', '"fsdpqdiag.report/99"', 1))
    (root / "verdict.json").write_text(text.replace('"verdict": "NOT REPRODUCED"', '"verdict": "MAYBE"', 1))
    (root / "empty.json").write_text("")
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "deep.json").write_text("[" * 300_000 + "]" * 300_000)
    (root / "nan.json").write_text(text.replace('"world_size": 1', '"world_size": NaN', 1))
    (root / "duplicate-keys.json").write_text(text.replace("{", '{"schema": "x", ', 1))
    (root / "bom.json").write_bytes(b"\xef\xbb\xbf" + REPORT.read_bytes())
    latin1 = text.replace("NOT REPRODUCED", "NICHT REPRODUZIERT \u00e4", 1)
    (root / "latin1.json").write_bytes(latin1.encode("latin-1"))
    (root / "long-string.json").write_text('{"schema": "' + "x" * (2 << 20) + '"}')
    (root / "existing.md").write_text("keep me\n")
    (root / "ro.md").write_text("read-only\n")
    (root / "ro.md").chmod(0o444)
    (root / "dir").mkdir()
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo")
    os.mkfifo(root / "fifo-never-read")
    (root / "link.json").symlink_to("report.json")
    (root / "dangling").symlink_to("dangling-target.md")
    (root / "link-to-fifo").symlink_to("fifo")


def _path(token: str, root: Path) -> str:
    return token if token.startswith("/") or token == "-" else str(root / token)


def _snapshot(root: Path) -> dict[str, tuple]:
    entries = {}
    for entry in sorted(root.rglob("*")):
        status = entry.lstat()
        content = entry.read_bytes() if stat.S_ISREG(status.st_mode) else None
        entries[str(entry.relative_to(root))] = (status.st_mode, content)
    return entries


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run one generated command line in a fresh sandbox; check the contract; return it."""
    from fsdpqdiag.cli import app
    from fsdpqdiag.launcher import launch
    from fsdpqdiag.rank import runtime as rank

    def tripwire(*args, **kwargs):
        raise AssertionError("a generated input that should be refused would have started a rank")

    monkeypatch.setattr(launch, "launch", tripwire)
    monkeypatch.setattr(rank, "run_in_job", tripwire)
    runner = CliRunner()
    counter = iter(range(10**6))

    def run(tokens: list[str], env: dict[str, str] | None = None, outputs: tuple[str, ...] = ()):
        root = tmp_path / f"example{next(counter)}"
        root.mkdir()
        _zoo(root)
        args = [part.format(d=root) for part in tokens]
        before = _snapshot(root)
        saved = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        try:
            result = runner.invoke(app, args, catch_exceptions=True)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        stderr = result.stderr
        described = f"{args} env={env}: exit {result.exit_code}\nstderr: {stderr[:2000]}"
        described += f"\nstdout: {result.stdout[-800:]}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"{described}\nraised {result.exception!r}") from result.exception
        assert result.exit_code in DOCUMENTED_EXIT_CODES, described
        assert "Traceback" not in stderr and "Traceback" not in result.stdout, described
        after = _snapshot(root)
        if result.exit_code == 2:
            assert len(stderr.strip().splitlines()) <= 1, described
            assert after == before, described
        else:
            allowed = {os.path.realpath(o.format(d=root)) for o in outputs}
            changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
            assert {os.path.realpath(root / name) for name in changed} <= allowed, described
        shutil.rmtree(root, ignore_errors=True)
        return result

    return run


def _option(name: str, values: list[str]):
    return st.sampled_from(values).map(lambda value: [name, value])


def _flag(*names: str):
    return st.sampled_from(names).map(lambda name: [name])


def _outputs(*options: str):
    return st.sampled_from(options).flatmap(
        lambda option: st.sampled_from(OUTPUT_PATHS).map(lambda p: [option, "{d}/" + p])
    )


COMMON_VALID = [
    _option("--ws", ["1", "2"]),
    _option("--device", ["cpu", "auto"]),
    _option("--backend", ["auto", "gloo"]),
    _option("--timeout", ["30", "0.5", "1e3"]),
    _option("--inject", list(FAULTS)),
    _outputs("--json", "--markdown"),
    _flag("-q", "--quiet"),
]
COMMON_REFUSED = [
    _option("--ws", ["0", "-2", "abc", "1.5"]),
    _option("--device", ["tpu", "cuda", ""]),
    _option("--backend", ["mpi", "nccl", "GLOO"]),
    _option("--timeout", ["nan", "inf", "-inf", "0", "-1", "abc", ""]),
    _option("--inject", ["bitflip", "", "[/x]"]),
    st.sampled_from(REFUSED_OUTPUTS).flatmap(
        lambda p: st.sampled_from(["--json", "--markdown"]).map(lambda o: [o, _path(p, Path("{d}"))])
    ),
    st.just(["--json", "{d}/same.json", "--markdown", "{d}/same.json"]),
    st.just(["--json", "-", "--markdown", "-"]),
    _flag("--nope", "--ws"),
]
COMMANDS = {
    "reproduce": (
        [
            _option("--probe", list(PROBES)),
            _option("--in-features", ["128", "256"]),
            _option("--out-features", ["128", "64"]),
            _option("--quant-type", ["nf4", "fp4"]),
            _option("--quant-storage", ["bf16", "fp16", "fp32", "uint8"]),
            _option("--compute-dtype", ["bf16", "fp16", "fp32"]),
            _option("--param-dtype", ["bf16", "fp16", "none"]),
            _option("--reduce-dtype", ["fp32", "none"]),
            _option("--batch", ["1", "3"]),
            _option("--weight-seed", ["0", "-1", str((1 << 64) - 1)]),
            _flag("--bias", "--no-bias", "--double-quant", "--no-double-quant"),
        ],
        [
            _option("--probe", ["no-such-probe", "[/x]", ""]),
            _option("--quant-storage", ["bf17", "int4", ""]),
            _option("--quant-type", ["nf5", "NF4"]),
            _option("--compute-dtype", ["int8", "uint8"]),
            _option("--param-dtype", ["int8"]),
            _option("--in-features", ["0", "-1", "x"]),
            _option("--batch", ["0"]),
            _option("--weight-seed", [str(1 << 64), str(-(1 << 63) - 1)]),
            _option("--input-seed", [str(1 << 70)]),
            st.just(["--in-features", "7", "--out-features", "7"]),
            st.just(["--in-features", "6", "--out-features", "6"]),
        ],
    ),
    "localize": (
        [_option("--in-features", ["128", "256"]), _option("--out-features", ["128", "256"])],
        [
            _option("--in-features", ["0", "-3"]),
            st.just(["--in-features", "5", "--out-features", "5"]),
            st.just(["--in-features", "16", "--out-features", "16"]),
        ],
    ),
    "fix": (
        [
            _option("--workaround", ["all", "cached-ref", "fsdp2-bytes"]),
            _option("--target", ["linear"]),
            _option("--steps", ["1", "2"]),
        ],
        [
            _option("--steps", ["0", "-1"]),
            _option("--workaround", ["duct-tape"]),
            _option("--target", ["gpt5", "[/x]"]),
        ],
    ),
    "matrix": (
        [
            _option("--cells", list("ABCDEFG")),
            _option("--grid", ["quant_type=nf4,fp4", "wrap=layer,root", "mp=none,bf16/bf16"]),
            _flag("--lora", "--no-lora", "--isolate-cells"),
            _option("--preset", ["tiny-llama"]),
            _option("--out", ["{d}/sweep-new"]),
            _outputs("--csv", "--plot"),
        ],
        [
            _option("--cells", ["Z", "a"]),
            _option("--grid", ["colour=red", "quant_type=", "=x", "quant_storage=bf17"]),
            st.just(["--grid", "wrap=layer", "--grid", "wrap=root"]),
            _option("--resume", ["{d}/dir", "{d}/absent"]),
            _option("--model", ["{d}/dir", "{d}/absent", "{d}/report.json"]),
            _option("--out", ["{d}/report.json"]),
            st.just(["--out", "{d}/sweep-x", "--json", "{d}/sweep-x/cells.jsonl"]),
        ],
    ),
    "forensics": (
        [
            _option("--bits", ["4", "8"]),
            _option("--quant-type", ["nf4", "fp4"]),
            _option("--quant-storage", ["bf16", "uint8"]),
            _flag("--lora", "--no-lora"),
        ],
        [
            _option("--bits", ["3", "16", "x"]),
            _option("--quant-type", ["nf5"]),
            _option("--quant-storage", ["bf17"]),
            _option("--model", ["{d}/dir", "{d}/absent"]),
        ],
    ),
}


@st.composite
def refused_launch(draw):
    """A launching command with valid options and at least one refused input (option or
    environment), the refused options last."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    valid, refused = COMMANDS[command]
    tokens = [command]
    for option in draw(st.lists(st.one_of(*valid, *COMMON_VALID), max_size=6)):
        tokens += option
    env = draw(st.one_of(st.none(), st.sampled_from(REFUSED_ENVIRONMENTS)))
    poisons = draw(st.lists(st.one_of(*refused, *COMMON_REFUSED), min_size=0 if env else 1, max_size=2))
    for option in poisons:
        tokens += option
    return tokens, env


@SETTINGS
@given(refused_launch())
@example((["reproduce", "--ws", "abc"], None))  # click's usage block and error panel: 6 lines
@example((["matrix", "--cells", "[/x]"], None))  # rich markup in the message: a MarkupError traceback
@example((["reproduce", "--timeout", "nan"], None))  # ran ranks that failed in set-up
@example((["reproduce", "--json", "/dev/full"], None))  # replaced the device node (as root)
@example((["reproduce"], {"RANK": "5", "WORLD_SIZE": "2", **TORCHRUN}))  # a minute, then a traceback
@example((["fix", "--workaround", "all", "--workaround", "duct-tape"], None))  # ran "all"
@example((["matrix", "--grid", "quant_type=nf4,fp4", "--cells", "Z"], None))  # --cells dropped
def test_launching_commands_refuse_before_any_rank(cli, case):
    tokens, env = case
    result = cli(tokens, env)
    assert result.exit_code == 2, result.stderr


@st.composite
def report_command(draw):
    outputs: tuple[str, ...] = ()
    if draw(st.booleans()):
        tokens = ["report", "{d}/" + draw(st.sampled_from(REPORT_FILES))]
        if draw(st.booleans()):
            tokens += ["-f", draw(st.sampled_from(["md", "table", "json", "pdf", ""]))]
        for option in draw(st.lists(st.sampled_from(["-o", "--plot"]), max_size=2, unique=True)):
            target = draw(st.sampled_from([*OUTPUT_PATHS, *REFUSED_OUTPUTS, *REPORT_FILES[:2], "-"]))
            tokens += [option, _path(target, Path("{d}"))]
            outputs += (target,)
    else:
        tokens = ["compare", *("{d}/" + draw(st.sampled_from(REPORT_FILES)) for _ in range(2))]
        if draw(st.booleans()):
            tokens += ["--json", "-"]
        if draw(st.booleans()):
            tokens.append("--all")
    return tokens, outputs


@SETTINGS
@given(report_command())
@example((["report", "{d}/binary.json"], ()))  # UnicodeDecodeError traceback
@example((["compare", "{d}/report.json", "{d}/binary.json"], ()))  # exited 1, "different"
@example((["report", "{d}/verdict.json"], ()))  # rendered a verdict the schema forbids
@example((["report", "{d}/report.json", "-o", "{d}/report.json"], ("report.json",)))  # lost its input
@example((["report", "{d}/report.json", "-o", "{d}/fifo"], ("fifo",)))  # replaced a FIFO
def test_report_and_compare_keep_the_contract(cli, case):
    tokens, outputs = case
    cli(tokens, outputs=tuple(f"{{d}}/{o}" if not o.startswith("/") else o for o in outputs))


@pytest.mark.parametrize(
    "case",
    [
        (["report", "{d}/deep.json"], ()),  # a 54-line RecursionError traceback
        (["compare", "{d}/report.json", "{d}/deep.json"], ()),
        (["report", "{d}/report.json", "-o", "-"], ("-",)),  # created a file named "-"
        (["report", "{d}/report.json", "-o", "/sys/x.json"], ()),  # "the file system of /sys is full"
    ],
)
def test_hostile_files_and_targets_keep_the_contract(cli, case):
    tokens, outputs = case
    result = cli(tokens, outputs=tuple(f"{{d}}/{o}" if not o.startswith("/") else o for o in outputs))
    assert not (Path.cwd() / "-").exists()
    if "deep.json" in " ".join(tokens):
        assert result.exit_code == 2 and "nested deeper than the limit" in result.stderr


@settings(
    max_examples=4, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from([[], ["--json", "-"], ["--markdown", "-"], ["--json", "-", "-q"], ["--wide"]]))
def test_env_keeps_the_contract(cli, flags):
    assert cli(["env", *flags]).exit_code == 0


STREAM_STATES = ["closed", "full", "broken-pipe", "open"]


def _stream(state: str, stack):
    """The file (or None) a child gets as a stream in ``state``; a broken pipe's read end is
    closed before the child writes, so its first write to it fails with EPIPE."""
    import subprocess

    if state == "closed":
        return None
    if state == "full":
        return stack.enter_context(open("/dev/full", "wb"))  # noqa: SIM115
    if state == "broken-pipe":
        read_end, write_end = os.pipe()
        os.close(read_end)
        return stack.enter_context(os.fdopen(write_end, "wb"))
    return subprocess.PIPE


@settings(max_examples=6, deadline=None, database=None)
@given(
    st.sampled_from(STREAM_STATES[:3]),
    st.sampled_from(STREAM_STATES),
    st.sampled_from([["report", "{d}/report.json"], ["report", "{d}/report.json", "-f", "json"], ["--help"]]),
)
@example("closed", "open", ["report", "{d}/report.json"])  # exited 0 having written nothing
@example("full", "open", ["report", "{d}/report.json"])  # a traceback, exit 1
@example("broken-pipe", "open", ["report", "{d}/report.json", "-f", "json"])
def test_failing_standard_streams_keep_the_contract(tmp_path_factory, stdout_state, stderr_state, tokens):
    """Real descriptors, so a real process: a write error is one line and exit 74, a broken
    pipe is quiet and exit 141, a failing stderr loses its message but never the exit code."""
    import contextlib
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("streams")
    (root / "report.json").write_bytes(REPORT.read_bytes())
    args = [part.format(d=root) for part in tokens]
    with contextlib.ExitStack() as stack:
        child = subprocess.Popen(
            [sys.executable, "-m", "fsdpqdiag", *args],
            stdin=subprocess.DEVNULL,
            stdout=_stream(stdout_state, stack),
            stderr=_stream(stderr_state, stack),
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            close_fds=True,
            pass_fds=(),
            # A closed stream: the child starts with that descriptor closed (">&-").
            preexec_fn=_closer(stdout_state, stderr_state),
        )
        _, err = child.communicate(timeout=120)
    stderr_text = (err or b"").decode(errors="replace")
    described = f"{args} stdout={stdout_state} stderr={stderr_state}: exit {child.returncode}\n{stderr_text}"
    assert child.returncode == (141 if stdout_state == "broken-pipe" else 74), described
    assert "Traceback" not in stderr_text, described
    assert len(stderr_text.strip().splitlines()) <= 1, described
    if stderr_state == "open" and stdout_state != "broken-pipe":
        assert stderr_text.startswith("error: write error: "), described


def _closer(stdout_state: str, stderr_state: str):
    closing = [fd for fd, state in ((1, stdout_state), (2, stderr_state)) if state == "closed"]

    def close() -> None:
        for fd in closing:
            os.close(fd)

    return close
