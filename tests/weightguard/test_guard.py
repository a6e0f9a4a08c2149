"""fsdpqdiag.guard on real FSDP2 (gloo) with real bitsandbytes Linear4bit layers.

One torchrun launch per world size runs every scenario of tests/support/guard_scenarios.py (silent,
fault from step 1, params="all" under AdamW, a write behind the optimizer, action="raise",
close()); the tests below read what each rank saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fsdpqdiag.report.model import Report
from fsdpqdiag.weightguard.digest import digest, host
from tests.support import ROOT, session_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[1, 2], ids=["ws1", "ws2"])
def scenarios(request, tmp_path_factory):
    world_size = request.param
    out = tmp_path_factory.mktemp(f"guard-ws{world_size}")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        FSDPQDIAG_CACHE=str(session_cache(tmp_path_factory)),
        OMP_NUM_THREADS="1",
    )
    completed = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(world_size),
            str(ROOT / "tests" / "support" / "guard_scenarios.py"),
            str(out / "rank-RANK.json"), str(out / "report.json"),
        ],
        capture_output=True, text=True, timeout=300, env=env, cwd=out,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world_size)]
    return {"world_size": world_size, "ranks": ranks, "report": out / "report.json"}


def _modules(seen: dict) -> set[str]:
    return {f["module"] for f in seen["findings"]}


def test_silent_without_fault(scenarios):
    for seen in scenarios["ranks"]:
        assert seen["silent"]["findings"] == []
        assert seen["silent"]["checks"] == 2 * len(seen["silent"]["guarded"])  # every forward checked
        assert seen["silent"]["guarded"] == ["0.frozen.weight", "1.frozen.weight", "2.frozen.weight"]


def test_trips_on_exactly_the_altered_weights_from_the_first_faulty_step(scenarios):
    for seen in scenarios["ranks"]:
        expected = set(seen["nan_weights"])
        assert expected  # the positive control needs NaN-class containers to alter
        assert _modules(seen["fault"]) == expected
        assert {f["first_step"] for f in seen["fault"]["findings"]} == {1}
        for finding in seen["fault"]["findings"]:
            assert finding["shard_byte_true"]
            assert set(finding["post_bit_patterns"]) == {"0x7fff"}
            assert finding["slices_differing"] == list(range(scenarios["world_size"]))


def test_ranks_agree_and_rank0_writes_a_valid_merged_report(scenarios):
    by_rank = [sorted(_modules(seen["fault"])) for seen in scenarios["ranks"]]
    assert all(names == by_rank[0] for names in by_rank)
    report = Report.load(scenarios["report"])  # validated against the schema
    (result,) = report.results
    assert result.verdict == "REPRODUCED"
    assert result.world_size == scenarios["world_size"]
    assert result.evidence["first_step"] == 1
    modules = result.evidence["modules"]
    assert {m["module"] for m in modules} == set(scenarios["ranks"][0]["nan_weights"])
    assert all(m["ranks"] == list(range(scenarios["world_size"])) for m in modules)
    # Each rank localized its own slice: together they cover every altered element once.
    assert sum(m["differing_elements"] for m in modules) == sum(
        f["differing_elements"] for seen in scenarios["ranks"] for f in seen["fault"]["findings"]
    )
    assert result.evidence["attribution"]["component"] == "torch.distributed.fsdp"


def test_every_n_verifies_only_those_steps(scenarios):
    for seen in scenarios["ranks"]:
        assert seen["every2"]["checks"] == 2 * 3  # the forwards of steps 0 and 2, three weights
        assert {f["first_step"] for f in seen["every2"]["findings"]} == {2}
        assert _modules(seen["every2"]) == set(seen["nan_weights"])


def test_params_all_accepts_optimizer_updates_and_catches_a_write_behind_it(scenarios):
    for seen in scenarios["ranks"]:
        assert seen["all"]["findings"] == []
        assert "0.adapter.weight" in seen["all"]["guarded"] and seen["all"]["steps"] == 3
        (finding,) = seen["all_written"]["findings"]
        assert finding["module"] == "1.adapter" and finding["first_step"] == 2
        assert finding["shard_byte_true"] is False


def test_action_raise_stops_the_step(scenarios):
    for seen in scenarios["ranks"]:
        assert seen["raised"] and "reached forward altered at step 0" in seen["raised"]


def test_close_removes_every_hook(scenarios):
    hooks = scenarios["ranks"][0]["hooks"]
    assert hooks["during"]["module_pre_hooks"] > hooks["before"]["module_pre_hooks"]
    assert hooks["during"]["optimizer_hooks"] == hooks["before"]["optimizer_hooks"] + 1
    assert hooks["after"] == hooks["before"]


def test_transformers_callback_attaches_and_closes(scenarios):
    for seen in scenarios["ranks"]:
        assert _modules(seen["callback"]) == set(seen["nan_weights"])
        assert {f["first_step"] for f in seen["callback"]["findings"]} == {0}
        assert seen["callback_injected"] == "nan-canonicalize"
        assert seen["callback_closed"]


def test_transformers_callback_with_a_fix_stays_silent_under_the_fault_and_undoes_it(scenarios):
    """The same fault as the callback test above; with fsdp2-bytes applied by the callback the
    packed bytes travel as integers, which the fault (like the real culprit) leaves alone."""
    for seen in scenarios["ranks"]:
        fixed = seen["callback_fixed"]
        assert fixed["fix"] == {"name": "fsdp2-bytes", "error": None}
        assert fixed["guarded"] and fixed["checks"] == 2 * len(fixed["guarded"])
        assert fixed["findings"] == []
        assert seen["fix_undone"]


def test_digest_is_position_aware_exact_on_bits_and_splits_over_shards():
    from fsdpqdiag.evidence.bytes import all_nan_patterns

    payload = all_nan_patterns(torch.bfloat16)
    whole = host(digest(payload))
    # a NaN payload rewritten into another NaN (DebugMode's NaN-to-0 hash cannot see it)
    quieted = payload.clone()
    quieted.view(torch.int16)[5] = 0x7FFF
    assert host(digest(quieted)) != whole
    # two elements swapped: the same multiset of bits at other positions
    swapped = payload.clone()
    swapped[[3, 9]] = payload[[9, 3]]
    assert host(digest(swapped)) != whole
    # the sum of the shards' digests at their offsets is the whole tensor's
    parts = torch.tensor_split(payload, 3)
    offsets = [0, parts[0].numel(), parts[0].numel() + parts[1].numel()]
    assert sum(host(digest(p, o)) for p, o in zip(parts, offsets)) % (1 << 64) == whole
    # 8-byte elements and 1-byte ones too
    wide = torch.arange(10, dtype=torch.float64)
    assert host(digest(wide[:4])) + host(digest(wide[4:], 4)) & ((1 << 64) - 1) == host(digest(wide))
    small = torch.arange(7, dtype=torch.uint8)
    assert host(digest(small)) != host(digest(small.flip(0)))
