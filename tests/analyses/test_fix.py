"""`fsdpqdiag fix`: workarounds verified bit for bit; the injected canonicalizing copy
breaks the unfixed run and leaves the byte-true fixes exact; undo restores everything.

The uninjected runs are the command line's (shared); the injected ones ask the library in the
worker's session (``tests.support.worker_session``) and read the exit code the command gives."""

import json

import jsonschema
import pytest

from fsdpqdiag import fixes
from fsdpqdiag.report.model import json_schema
from tests.support import fix_all, worker_session


def _rows(report):
    return {r["config"]["workaround"]: r for r in report["results"]}


@pytest.mark.parametrize("ws", [1, 2])
def test_injected_fault_breaks_unfixed_and_fixes_stay_exact(ws):
    from fsdpqdiag import api

    # fsdpqdiag fix --ws WS --device cpu --inject nan-canonicalize --steps 2
    fixed = api.fix(
        world_sizes=[ws], device="cpu", inject="nan-canonicalize", steps=2, session=worker_session()
    )
    report = json.loads(fixed.to_json())  # what --json writes
    jsonschema.validate(report, json_schema())
    rows = _rows(report)
    assert set(rows) == {"none", *fixes.FIXES}
    unfixed = rows["none"]
    assert unfixed["verdict"] == "NOT VERIFIED"
    assert unfixed["evidence"]["first_divergence"]["step"] == 0
    for name in fixes.FIXES:
        assert rows[name]["verdict"] == _exact_verdict(rows[name]), (name, rows[name]["summary"])
        assert rows[name]["evidence"]["restored_after_undo"] is True
        assert all(rows[name]["evidence"]["loss_bits_equal"])
    lost = any(rows[name]["verdict"] == "STATE LOST" for name in fixes.FIXES)
    assert fixed.exit_code() == (1 if lost else 0)


def _exact_verdict(row):
    """A bit-exact row is VERIFIED unless its checkpoint loses the int8 row scales."""
    return "STATE LOST" if row["evidence"]["int8_scb_saved"] is False else "VERIFIED"


@pytest.mark.parametrize("ws", [1, 2])
def test_fixes_verified_without_injection(shared_cli, ws):
    result = shared_cli(*fix_all(ws))
    rows = _rows(result.report)
    assert set(rows) == {"none", *fixes.FIXES}
    for name in fixes.FIXES:
        assert rows[name]["verdict"] == _exact_verdict(rows[name]), rows[name]["summary"]
    # the unfixed row is the stack's own answer; its evidence must agree with its verdict
    unfixed = rows["none"]
    exact = unfixed["evidence"]["first_divergence"] is None
    assert (unfixed["verdict"] in ("NO FIX NEEDED", "STATE LOST")) == exact
    assert (unfixed["verdict"] == "STATE LOST") == (exact and unfixed["evidence"]["int8_scb_saved"] is False)
    # and its ending says so: what to apply, or that nothing is needed (-q run: drawn here)
    ending = _ending(result.report)
    assert ("this stack needs no fix" in ending) == (unfixed["verdict"] == "NO FIX NEEDED")
    for name in fixes.FIXES:
        applies = f"fsdpqdiag.fixes.apply('{name}')" in ending
        assert applies == (rows[name]["verdict"] == "VERIFIED"), ending


def _ending(report: dict) -> str:
    from rich.console import Console

    from fsdpqdiag.render.conclusion import conclusion_view
    from fsdpqdiag.report.conclusion import conclude
    from fsdpqdiag.report.model import Report

    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(conclusion_view(conclude(Report.from_dict(report))))
    return " ".join(console.export_text().split())


def test_apply_then_undo_restores_bitsandbytes_and_fsdp2():
    import bitsandbytes as bnb
    import torch
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    def patch_points():
        return (
            bnb.nn.Linear4bit.forward,
            bnb.nn.Linear8bitLt._save_to_state_dict,
            FSDPParam._init_extensions,
            FSDPParam.init_dtype_attrs,
        )

    before = patch_points()
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_storage=torch.bfloat16).to("cpu"))
    for fix in fixes.FIXES.values():
        with fix.prepare(model).apply():
            pass
        assert patch_points() == before, fix.name
        assert not any(k.startswith("_fsdpqdiag") for k in vars(model[0])), fix.name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workaround", "duct-tape"], "unknown workaround"),
        # "all" beside a typo must refuse the typo, not run every workaround
        (["--workaround", "all", "--workaround", "duct-tape"], "unknown workaround"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--target", "gpt5"], "unknown fix target"),
    ],
)
def test_fix_bad_input(run_cli, args, message):
    result = run_cli("fix", *args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("ws", [1, 2])
def test_axolotl_int8_keeps_linear8bitlt_row_scales_through_dtensor(shared_cli, ws):
    # Its row of the uninjected run of every workaround: that run asks this of each row.
    rows = _rows(shared_cli(*fix_all(ws)).report)
    fixed = rows["axolotl-int8"]
    assert fixed["verdict"] == "VERIFIED", fixed["summary"]
    assert fixed["evidence"]["int8_scb_saved"] is True
    assert fixed["evidence"]["int8_keys_missing"] == []
    assert fixed["evidence"]["restored_after_undo"] is True
    # the unfixed row is the stack's answer: its evidence must only be self-consistent
    unfixed = rows["none"]["evidence"]
    assert unfixed["int8_scb_saved"] == (not any(k.endswith("SCB") for k in unfixed["int8_keys_missing"]))


def test_runs_after_an_unrestored_undo_run_again_each_in_a_launch_of_its_own(monkeypatch):
    # The workarounds of one world size share a launch; a workaround whose undo left a patch
    # behind would have changed the runs after it in that launch.
    from fsdpqdiag.api import commands
    from fsdpqdiag.launcher import batch
    from fsdpqdiag.report.model import ProbeResult

    def shared_launch_result(restored):
        return ProbeResult(
            "fix-verify", "VERIFIED", 1, "cpu", "gloo", {}, None, "", {"restored_after_undo": restored}
        )

    keys = ["none on linear", "leaky on linear", "after on linear", "last on linear"]
    items = [batch.Item(key, "fix-verify", {"workaround": key.split()[0]}) for key in keys]
    ran = {key: shared_launch_result(key != "leaky on linear") for key in keys}
    relaunched = []

    def own_launch(task, config, run, checked, session):
        relaunched.append(config["workaround"])
        return f"{config['workaround']} in its own launch"

    monkeypatch.setattr(commands, "run_unless_unsupported", own_launch)
    commands._rerun_after_an_unrestored_undo(items, ran, run=None, checked={}, session=None)
    assert relaunched == ["after", "last"]
    assert ran["after on linear"] == "after in its own launch"
    assert ran["leaky on linear"].evidence["restored_after_undo"] is False  # its own row stays
    assert ran["none on linear"].verdict == "VERIFIED"
    ran_clean = {key: shared_launch_result(True) for key in keys}
    relaunched.clear()
    commands._rerun_after_an_unrestored_undo(items, ran_clean, run=None, checked={}, session=None)
    assert relaunched == []


def test_a_refused_int8_state_dict_check_is_recorded_not_fatal_to_the_row():
    # torch 2.11 refuses the frozen int8 weight in fully_shard: the refusal is evidence, and
    # must not end the row as ERROR and lose its training comparison. A refusing fully_shard
    # stands in.
    import torch

    from fsdpqdiag.analyses import fix_verify

    class OneRank:
        device = torch.device("cpu")

        def mesh(self):
            return None

    def refusing_fully_shard(module, mesh=None):
        raise RuntimeError("only Tensors of floating point dtype can require gradients")

    before = fix_verify._patch_points()
    checked = fix_verify._int8_state_dict_check(fixes.get("axolotl-int8"), OneRank(), refusing_fully_shard)
    assert checked == {
        "int8_scb_saved": None,
        "int8_keys_missing": None,
        "int8_check_error": "RuntimeError: only Tensors of floating point dtype can require gradients",
    }
    assert fix_verify._patch_points() == before  # undone on the way out


def test_apply_is_undone_exactly_and_refuses_what_needs_the_script():
    """fixes.apply patches FSDP2 for the whole process; its handle (a context manager) puts
    every patched function back by identity. The rest are refused in one line."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    def patch_points():
        return (FSDPParam._init_extensions, FSDPParam.init_dtype_attrs, FSDPParam._init_sharded_param)

    before = patch_points()
    assert fixes.installable() == ["fsdp2-bytes", "axolotl-int8"]
    for name in fixes.installable():
        with fixes.apply(name):
            assert patch_points() != before
        assert patch_points() == before
    for name, message in [("bogus", "unknown fix"), ("cached-ref", "cannot be applied")]:
        with pytest.raises(ValueError, match=message):
            fixes.apply(name)
