"""The standalone reproducers and the package's probes must not drift apart."""

import shlex

import pytest

from tests.support import ROOT, SMALL_FEATURES
from tests.support.scripts import EXIT_STATUS, line_arguments, run_script, standalone

FEATURES = SMALL_FEATURES


@pytest.mark.parametrize("ws", [1, 2])
def test_nan_canonicalization_reproducer_matches_probe(shared_probe, ws):
    result = shared_probe("nan-canonicalization", ws)
    script_ranks = standalone(result)
    assert len(script_ranks) == len(result.ranks) == ws
    for line, rank in zip(script_ranks, result.ranks):
        ev = rank["evidence"]
        assert line["elements"] == ev["elements"] and line["nan_elements"] == ev["nan_elements"]
        for section in ("swap_target", "local_tensor", "full_tensor"):
            for key in ("differing_bytes", "differing_elements", "post_bit_patterns"):
                assert line[section][key] == ev[section][key], (section, key)
        for key in ("max_abs_delta", "mean_abs_delta", "output_bit_equal"):
            assert line[key] == ev[key], key


def test_full_tensor_reproducer_matches_probe(shared_probe):
    result = shared_probe("full-tensor-crash", 2)
    script_ranks = standalone(result)
    for line, rank in zip(script_ranks, result.ranks):
        ev = rank["evidence"]
        assert line["full_tensor_bytes_equal"] == ev["full_tensor()"]["bytes_equal"]
        assert line["redistribute_bytes_equal"] == ev["redistribute([Replicate()])"]["bytes_equal"]


def _printed_lines(markdown: str) -> list[str]:
    """The standalone lines under a report's "To reproduce" (the tool's own command first)."""
    section = markdown.split("To reproduce:", 1)[1].split("\n\n", 2)[1]
    return [row.strip() for row in section.splitlines() if ".py" in row]


def test_each_line_a_report_prints_gives_the_tools_verdict(shared_cli):
    """What a maintainer runs: each standalone line under "To reproduce" of the shared
    uninjected run, as printed, prints the tool's verdict and exits with it. (The forced
    repack path, an injected condition a script can be given, is checked the same way in
    test_probe_cpu_weight_repack.py; the tool's own faults have no script option, and their
    lines say so.)"""
    from fsdpqdiag.render import reproducer
    from fsdpqdiag.report.model import Report
    from tests.support import reproduce_small

    run = shared_cli(*reproduce_small(2), timeout=600)
    report = Report.from_dict(run.report)
    lines = _printed_lines(run.markdown_path.read_text())
    if not lines:
        pytest.skip("nothing reproduced on this stack at ws=2 on CPU: the report prints no standalone line")
    for line in lines:
        command, _, note = line.partition("  # ")
        assert not note, f"the line does not rerun the tool's run: {line}"
        result = next(r for r in report.results if reproducer.command(r) == command)
        words = shlex.split(command)
        assert "--device" in words and "--backend" in words
        # The run a probe's test compares with its script is this very line: shared, not rerun.
        args, ws = line_arguments(result)
        assert ws == result.world_size and args == words[-len(args) :]
        run_script([*args, "--json"], ws, verdict=result.verdict)


def _script_verdict(name: str):
    """The ``verdict`` of ``reproducers/NAME.py``, loaded as a file (the scripts are no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"reproducer_{name}", ROOT / "reproducers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.verdict


STACK = {"world_size": 2, "torch": "t", "bitsandbytes": "b", "peft": "p", "transformers": "x"}


def _verdicts(name: str, ranks: list[dict]) -> tuple[int, str]:
    status, line = _script_verdict(name)([{**STACK, "rank": i, **r} for i, r in enumerate(ranks)], "cuda")
    assert "\n" not in line and line.split(" ws=")[0] in EXIT_STATUS
    assert EXIT_STATUS[line.split(" ws=")[0]] == status
    return status, line


def test_script_verdicts_on_the_paths_this_cpu_does_not_take():
    """The REPRODUCED (and INCONCLUSIVE) branches a CPU run rarely reaches, on data shaped as
    each script measures it: a finding on one rank is the run's finding, as in the probes."""
    good = {"full_tensor_bytes_equal": True, "redistribute_bytes_equal": True}
    assert _verdicts("full_tensor_crash", [good, good])[0] == 0
    status, line = _verdicts("full_tensor_crash", [good, {**good, "redistribute_bytes_equal": False}])
    assert status == 1 and "redistribute([Replicate()])" in line and "rank 1" in line

    kept = {"unsharded_dtype": "torch.uint8", "bytes_equal": True}
    shard = {"fully_shard": {"status": "completed"}, "u8": kept, "i8": kept}
    assert _verdicts("non_float_params", [shard, shard])[0] == 0
    refused = {"fully_shard": {"status": "raised", "error": "RuntimeError: only float"}}
    assert _verdicts("non_float_params", [refused, refused])[0] == 1
    cast = {**shard, "i8": {"unsharded_dtype": "torch.bfloat16", "bytes_equal": False}}
    assert "['i8']" in _verdicts("non_float_params", [shard, cast])[1]

    def pair(matching, preserved):
        return {"combination": "a/b", "matching": matching, "preserved": preserved, "failure": None}

    assert _verdicts("storage_dtype_mismatch", [{"rows": [pair(True, False), pair(False, True)]}] * 2)[0] == 0
    assert (
        _verdicts("storage_dtype_mismatch", [{"rows": [pair(False, True)]}, {"rows": [pair(False, False)]}])[
            0
        ]
        == 1
    )

    stages = {"fully_shard": {"ok": True}, "save": {"ok": False, "scb_saved": False}}
    status, line = _verdicts("int8_params", [{"stages": {"fully_shard": {"ok": True}}}, {"stages": stages}])
    assert status == 1 and "save (rank 1)" in line and "scb_saved" in line

    recovered = {"needed": True, "restored": True}
    reshard = {"module_weight_is_fsdp_sharded_param": True, "memory_freed": True}
    clean = {
        "forward_weight": {"type": "Parameter", "has_quant_state": False},
        "forward": {"error": None},
        "recovery": recovered,
        "after_reshard": reshard,
        "after_update": {"stale": False},
    }
    assert _verdicts("quant_state_loss", [clean, clean])[0] == 0
    assert _verdicts("quant_state_loss", [clean, {**clean, "after_update": {"stale": True}}])[0] == 1
    raised = {**clean, "forward": {"error": "E: x"}, "after_reshard": {}, "after_update": {}}
    assert _verdicts("quant_state_loss", [raised, raised])[0] == 2

    grads = {"trainable": 4, "with_grad": 4, "nonfinite_elements": 0, "bit_equal": 4}
    moe = {"failures": [], "loss_bit_equal": True, "experts": {"e": {"forward": {"bytes_equal": True}}}}
    moe["lora_grads"] = grads
    assert _verdicts("moe_expert_quant", [moe, moe])[0] == 0
    assert _verdicts("moe_expert_quant", [moe, {**moe, "lora_grads": {**grads, "bit_equal": 3}}])[0] == 1
    setup = {**moe, "failures": [{"stage": "quantize experts", "exception": "E: x"}]}
    assert _verdicts("moe_expert_quant", [setup, setup])[0] == 2


def test_a_line_for_a_run_with_an_injected_fault_says_the_script_has_none():
    """The scripts run the stack as it is: beside a line whose result ran under a fault of the
    tool's, the report names the fault rather than promise the same verdict."""
    from fsdpqdiag.render import markdown, reproducer
    from fsdpqdiag.report.model import Report

    report = Report.load(ROOT / "reports/reproduce-ws2-h200x2-torch2.11-bnb0.50.2-segfault.json")
    (result,) = [r for r in report.results if r.probe == "nan-canonicalization"]
    assert result.injected == "segfault" and "inject=segfault" in reproducer.arguments(result)[1]
    assert f"{reproducer.command(result)}  # the script has no option for" in markdown.render(report)
