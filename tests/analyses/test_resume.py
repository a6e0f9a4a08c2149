"""A sweep's record (cells.jsonl) survives a kill, and --resume runs exactly its plan.

A header with the sweep's plan, one line per finished cell; a kill at any moment loses at
most the cell in flight, a torn line is cut (never appended to), bad records are set aside
and redone, and --resume runs exactly the recorded plan."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from fsdpqdiag.analyses import matrix as mx
from tests.support import ROOT

CELLS = mx.DEFAULT_CELLS[:3]
PLAN = mx.SweepPlan(
    cells=[asdict(c) for c in CELLS],
    world_sizes=[1, 2],
    device="cpu",
    backend="gloo",
    model=None,
    preset="tiny-llama",
    lora=True,
    inject=None,
)


def _row(index: int, padding: int = 0) -> dict:
    return {
        "status": "ok",
        "loss_fsdp2": 7.0 + index,
        "loss_baseline": 7.0,
        "differing_elements": index,
        "loss_bit_equal": index == 0,
        "padding": "x" * padding,
    }


def _records(count: int) -> list[tuple[mx.Cell, int]]:
    return [(CELLS[i % 3], PLAN.world_sizes[i // 3]) for i in range(count)]


def _started(tmp_path):
    mx.start_record(tmp_path, PLAN)
    return tmp_path / mx.RECORD_NAME


def test_header_records_the_plan_and_is_read_back(tmp_path):
    _started(tmp_path)
    for index, (cell, world_size) in enumerate(_records(4)):
        mx.append_line(tmp_path, cell, _row(index), world_size)
    recovered = mx.recover(tmp_path)
    assert recovered.plan == PLAN and not recovered.needs_repair()
    assert sorted(recovered.done) == sorted((c.name, ws) for c, ws in _records(4))


def test_a_torn_last_line_is_cut_not_appended_to(tmp_path):
    record = _started(tmp_path)
    mx.append_line(tmp_path, CELLS[0], _row(0), 1)
    complete = record.read_bytes()
    with open(record, "ab") as handle:  # a kill in the middle of the next append
        handle.write(b'{"cell": {"name": "B", "wrap": "la')
    recovered = mx.recover(tmp_path)
    assert record.read_bytes() != complete, "recover() only reads"
    assert list(recovered.done) == [("A", 1)] and recovered.torn_tail
    mx.repair(tmp_path, recovered)
    assert record.read_bytes() == complete
    mx.append_line(tmp_path, CELLS[1], _row(1), 1)
    assert sorted(mx.recover(tmp_path).done) == [("A", 1), ("B", 1)]
    # the torn fragment is kept, not lost
    kept = [json.loads(line) for line in (tmp_path / mx.REJECTED_NAME).read_text().splitlines()]
    assert kept == [{"line": None, "reason": "torn last line", "text": '{"cell": {"name": "B", "wrap": "la'}]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"cell": "notadict", "world_size": 1, "row": {}}, "not one of this sweep's cells"),
        ({"cell": asdict(CELLS[0]), "world_size": "1", "row": _row(0)}, "world size '1'"),
        ({"cell": asdict(CELLS[0]), "world_size": True, "row": _row(0)}, "world size True"),
        ({"cell": asdict(CELLS[0]), "world_size": 1, "row": {"status": "fine"}}, "no status"),
        ({"cell": asdict(CELLS[0]), "world_size": 1, "row": {**_row(0), "loss_fsdp2": "7"}}, "numeric"),
        ({"cell": asdict(CELLS[0]), "world_size": 4, "row": _row(0)}, "world size 4"),
        ({"cell": {**asdict(CELLS[0]), "name": "Z"}, "world_size": 1, "row": _row(0)}, "not one of"),
        (["not", "a", "record"], "not a cell record"),
    ],
)
def test_bad_records_are_set_aside_and_redone(tmp_path, bad, reason):
    record = _started(tmp_path)
    mx.append_line(tmp_path, CELLS[1], _row(1), 1)
    with open(record, "a") as handle:
        handle.write(json.dumps(bad) + "\n")
    mx.append_line(tmp_path, CELLS[2], _row(2), 1)
    recovered = mx.recover(tmp_path)
    assert sorted(recovered.done) == [("B", 1), ("C", 1)]
    assert [r["line"] for r in recovered.rejected] == [3] and reason in recovered.rejected[0]["reason"]
    mx.repair(tmp_path, recovered)
    assert not mx.recover(tmp_path).needs_repair()
    assert json.loads(json.loads((tmp_path / mx.REJECTED_NAME).read_text())["text"]) == bad


def test_a_second_record_of_a_cell_is_rejected(tmp_path):
    _started(tmp_path)
    mx.append_line(tmp_path, CELLS[0], _row(0), 1)
    mx.append_line(tmp_path, CELLS[0], _row(5), 1)
    recovered = mx.recover(tmp_path)
    assert recovered.done[("A", 1)]["row"]["loss_fsdp2"] == 7.0
    assert "second record" in recovered.rejected[0]["reason"]


@pytest.mark.parametrize(
    "content", [b"", b'{"cell": {"name": "A"}}\n', b"garbage\n", b'{"fsdpqdiag_sweep": 1, "cells": 3}\n']
)
def test_a_record_without_a_sound_header_cannot_be_resumed(tmp_path, content):
    (tmp_path / mx.RECORD_NAME).write_bytes(content)
    with pytest.raises(mx.SweepRecordError):
        mx.recover(tmp_path)


def test_every_prefix_of_the_record_loses_at_most_the_cell_in_flight(tmp_path):
    # Appends only ever extend the file, so a kill at any moment leaves a prefix of the
    # bytes a full run writes. Cut it at random points (and at every line boundary).
    full = tmp_path / "full"
    full.mkdir()
    _started(full)
    ends = []
    for index, (cell, world_size) in enumerate(_records(6)):
        mx.append_line(full, cell, _row(index, padding=index * 50), world_size)
        ends.append((full / mx.RECORD_NAME).stat().st_size)
    data = (full / mx.RECORD_NAME).read_bytes()
    header_end = data.index(b"\n") + 1
    chooser = random.Random(14)
    cuts = {header_end, len(data), *ends, *(e - 1 for e in ends), *(e + 1 for e in ends[:-1])}
    cuts |= {chooser.randrange(header_end, len(data) + 1) for _ in range(60)}
    for cut in sorted(cuts):
        sweep = tmp_path / f"cut{cut}"
        sweep.mkdir()
        (sweep / mx.RECORD_NAME).write_bytes(data[:cut])
        recovered = mx.recover(sweep)
        finished = sum(1 for end in ends if end <= cut)
        assert len(recovered.done) == finished, cut
        assert not recovered.rejected
        mx.repair(sweep, recovered)
        # resuming appends the remaining cells after a clean line boundary
        for index, (cell, world_size) in enumerate(_records(6)[finished:], start=finished):
            mx.append_line(sweep, cell, _row(index, padding=index * 50), world_size)
        assert (sweep / mx.RECORD_NAME).read_bytes() == data, cut


WRITER = """
import json
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.analyses.test_resume import _records, _row
from fsdpqdiag.analyses import matrix as mx
out = Path(sys.argv[1])
done = {{tuple(key) for key in json.loads(sys.argv[2])}}
print("ready", flush=True)
for index, (cell, world_size) in enumerate(_records(6)):
    if (cell.name, world_size) in done:
        continue
    mx.append_line(out, cell, _row(index, padding=1 << 22), world_size)
    print(cell.name, world_size, flush=True)
"""


def test_kill_9_at_random_moments_loses_at_most_the_cell_in_flight(tmp_path):
    # A real writer, SIGKILLed at random moments while it appends 4 MiB records; after each
    # kill the record is recovered and repaired as --resume does, and the writer resumes.
    # Every cell it announced as written must be there; the sweep ends complete, each once.
    _started(tmp_path)
    chooser = random.Random(1945)
    announced: set[tuple[str, int]] = set()
    for _ in range(12):
        recovered = mx.recover(tmp_path)
        assert announced <= set(recovered.done), "an announced cell was lost"
        assert len(set(recovered.done) - announced) <= 1, "more than the cell in flight appeared"
        announced = set(recovered.done)
        mx.repair(tmp_path, recovered)
        if len(announced) == 6:
            break
        done = json.dumps(sorted(announced))
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER.format(root=str(ROOT)), str(tmp_path), done],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout.readline() == "ready\n"  # kill while it writes, not while Python starts
        time.sleep(chooser.uniform(0.0, 0.25))
        os.kill(writer.pid, signal.SIGKILL)
        out, _ = writer.communicate(timeout=30)
        announced |= {(name, int(ws)) for name, ws in (line.split() for line in out.splitlines())}
    else:
        recovered = mx.recover(tmp_path)
        mx.repair(tmp_path, recovered)
        announced = set(recovered.done)
    # finish whatever the kills left, as a last resume would
    for index, (cell, world_size) in enumerate(_records(6)):
        if (cell.name, world_size) not in announced:
            mx.append_line(tmp_path, cell, _row(index), world_size)
    final = mx.recover(tmp_path)
    assert not final.needs_repair() and sorted(final.done) == sorted((c.name, ws) for c, ws in _records(6))


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A one-layer Llama whose dimensions are multiples of 32 (bitsandbytes' AVX512-BF16
    CPU repack needs that; the tiny-llama preset's 688 is not), saved like a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def test_killed_sweep_resumes_exactly_its_recorded_plan(run_cli, tmp_path, small_llama):
    out = tmp_path / "sweep"
    record = out / mx.RECORD_NAME
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fsdpqdiag", "matrix", "--model", str(small_llama), "--ws", "1"]
        + ["--device", "cpu", "--cells", "A", "--cells", "C", "--cells", "E", "--out", str(out), "-q"]
        + ["--isolate-cells"],  # seconds between cells: the kill lands before the next one
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not record.exists() or record.read_bytes().count(b"\n") < 2):
        time.sleep(0.02)
    sweep.send_signal(signal.SIGKILL)
    sweep.communicate(timeout=60)
    at_kill = record.read_bytes()
    time.sleep(1.0)  # its rank dies with it (PR_SET_PDEATHSIG) and appends nothing more
    assert record.read_bytes() == at_kill
    finished = mx.recover(out)
    assert 1 <= len(finished.done) < 3
    if not finished.torn_tail:  # a kill inside the next append, made certain
        with open(record, "ab") as handle:
            handle.write(b'{"cell": {"name": "')
    killed = record.read_bytes()

    for conflicting, message in (
        (["--no-lora"], "recorded with --lora, this command asks for --no-lora"),
        (["--ws", "2"], "recorded with --ws 1"),
        (["--cells", "A"], "recorded with --cells/--grid A C E"),
        (["--out", str(tmp_path / "elsewhere")], "drop --out"),
    ):
        refused = run_cli("matrix", "--resume", str(out), *conflicting, "-q")
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert record.read_bytes() == killed and not (out / mx.REJECTED_NAME).exists()
    again = run_cli("matrix", "--out", str(out), "--model", str(small_llama), "--ws", "1", "-q")
    assert again.returncode == 2 and "already holds a sweep" in again.stderr

    # no option but --resume: the recorded model, cells, world size and LoRA are used
    resumed = run_cli("matrix", "--resume", str(out), "-q", json=True)
    assert resumed.returncode in (0, 1), resumed.stderr
    assert "torn last line" in " ".join(resumed.stderr.split())
    lines = record.read_bytes().split(b"\n")
    assert killed.startswith(b"\n".join(lines[: 1 + len(finished.done)]) + b"\n")
    names = [json.loads(line)["cell"]["name"] for line in lines[1:-1]]
    assert sorted(names) == ["A", "C", "E"] and lines[-1] == b""
    report = resumed.report
    assert report["world_sizes"] == [1] and report["analysis"]["resume"]["torn_line_truncated"]
    assert [(r["config"]["cell"]["name"], r["config"]["lora"]) for r in report["results"]] == [
        ("A", True),
        ("C", True),
        ("E", True),
    ]
    assert {r["config"]["model"] for r in report["results"]} == {str(small_llama.resolve())}


def test_recover_never_loses_a_valid_record_whatever_lines_surround_it(tmp_path):
    # Property: any lines (binary, JSON of any shape, records of other sweeps) mixed with
    # valid records never make recover() raise, every valid record is kept (the first of
    # duplicates), and after repair() the record is clean and ends on a line boundary.
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )
    noise = st.one_of(
        st.binary(max_size=40).filter(lambda b: b"\n" not in b),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            # a world size outside the plan: noise must never be a valid record by chance
            {
                "cell": json_values | st.just(asdict(CELLS[0])),
                "world_size": json_values.filter(lambda v: v not in PLAN.world_sizes),
                "row": json_values,
            }
        ).map(lambda v: json.dumps(v).encode()),
    )
    counter = iter(range(10**6))

    @settings(
        max_examples=80,
        deadline=None,
        database=None,  # no .hypothesis directory left in the checkout
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        st.lists(st.one_of(noise.map(lambda n: ("noise", n)), st.integers(0, 5).map(lambda i: ("cell", i)))),
        st.binary(max_size=30).filter(lambda b: b"\n" not in b),
    )
    def check(lines, tail):
        sweep = tmp_path / f"s{next(counter)}"
        sweep.mkdir()
        record = _started(sweep)
        expected: dict[tuple[str, int], float] = {}
        with open(record, "ab") as handle:
            for kind, value in lines:
                if kind == "noise":
                    handle.write(value + b"\n")
                    continue
                cell, world_size = _records(6)[value]
                row = _row(value)
                item = {"cell": asdict(cell), "world_size": world_size, "row": row}
                handle.write(json.dumps(item).encode() + b"\n")
                expected.setdefault((cell.name, world_size), row["loss_fsdp2"])
            handle.write(tail)
        recovered = mx.recover(sweep)
        kept = {key: item["row"]["loss_fsdp2"] for key, item in recovered.done.items()}
        assert {key: kept[key] for key in expected} == expected
        mx.repair(sweep, recovered)
        again = mx.recover(sweep)
        assert not again.needs_repair() and again.done == recovered.done
        assert record.read_bytes().endswith(b"\n")

    check()


def test_sigterm_during_a_sweep_keeps_finished_cells_and_writes_nothing_else(tmp_path, small_llama):
    out, launcher_tmp = tmp_path / "sweep", tmp_path / "tmp"
    launcher_tmp.mkdir()
    record = out / mx.RECORD_NAME
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fsdpqdiag", "matrix", "--model", str(small_llama), "--ws", "1", "--device"]
        + ["cpu", "--cells", "A", "--cells", "C", "--cells", "E", "--out", str(out), "-q"]
        # One launch per cell puts seconds between cells; in one launch C and E follow A
        # within 50 ms, before a signal can land between them.
        + ["--isolate-cells", "--json", str(tmp_path / "m.json")],
        env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(launcher_tmp)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not record.exists() or record.read_bytes().count(b"\n") < 2):
        time.sleep(0.02)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=60)
    if sweep.returncode in (0, 1):
        pytest.skip("the sweep finished before the signal arrived")
    assert sweep.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "m.json").exists()
    assert list(launcher_tmp.glob("fsdpqdiag-*")) == []
    time.sleep(1.0)
    kept = mx.recover(out)
    assert 1 <= len(kept.done) < 3 and not kept.rejected
