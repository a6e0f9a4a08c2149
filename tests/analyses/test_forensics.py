"""`fsdpqdiag forensics` on tiny-llama, CPU/gloo: per-module evidence and attribution.

The uninjected runs are the command line's (shared with other modules); the others ask the
library in the worker's session (``tests.support.worker_session``), whose zygotes have imported
torch, bitsandbytes and transformers already, and read the exit code the command would give."""

import json

import jsonschema
import pytest

from fsdpqdiag.report.model import json_schema
from tests.support import forensics_default, worker_session


def _forensics(**options) -> tuple[int, dict, dict]:
    """(the exit code ``fsdpqdiag forensics`` gives for it, the report as JSON, its result)."""
    from fsdpqdiag import api

    report = api.forensics(device="cpu", session=worker_session(), **options)
    data = json.loads(report.to_json())  # what --json writes
    jsonschema.validate(data, json_schema())
    return report.exit_code(), data, data["results"][0]


def _shared(shared_cli, ws):
    result = shared_cli(*forensics_default(ws))
    jsonschema.validate(result.report, json_schema())
    return result, result.report["results"][0]


@pytest.mark.parametrize("ws", [1, 2])
def test_uninjected_forensics_is_self_consistent(shared_cli, ws):
    result, r = _shared(shared_cli, ws)
    ev = r["evidence"]
    assert len(ev["modules"]) == ev["totals"]["quantized_modules"] == 14
    for row in ev["modules"]:
        swap = row["swap_target"]
        assert row["kind"] == "params4bit"
        assert (swap["differing_elements"] == 0) == swap["bytes_equal"]
        assert swap["differing_elements"] <= row["nan_elements"]
        assert row["local_tensor"]["bytes_equal"] and row["full_tensor"]["bytes_equal"] in (True, False)
    assert (r["verdict"] == "NOT REPRODUCED") == (
        ev["totals"]["altered_modules"] == 0 and ev["loss_bit_equal"]
    )
    assert ev["ranks_agree"]


@pytest.mark.parametrize("ws", [1, 2])
def test_injected_change_is_attributed_to_the_modules_it_went_through(ws):
    code, _, r = _forensics(world_sizes=[ws], inject="nan-canonicalize")
    ev = r["evidence"]
    assert r["verdict"] == "REPRODUCED" and code == 1
    for row in ev["modules"]:
        swap = row["swap_target"]
        # every weight goes through FSDP2's unshard: exactly its NaN-class containers change
        assert swap["differing_elements"] == row["nan_elements"], row["module"]
        if row["nan_elements"]:
            assert set(swap["post_bit_patterns"]) == {"0x7fff"} and row["max_abs_delta"] > 0
        assert row["local_tensor"]["bytes_equal"]
    assert not ev["loss_bit_equal"]
    assert ev["totals"]["differing_elements"] == ev["totals"]["nan_elements"]
    # The fault rewrites every float unshard, plain parameters too: the same-launch control
    # alters the same elements, and the attribution says the control decided it (torch).
    control = ev["controls"]["plain_parameters_same_bits"]
    altered = [row["module"] for row in ev["modules"] if not row["swap_target"]["bytes_equal"]]
    assert control["outcome"] == "altered" and control["weights"] == len(altered)
    assert sorted(control["altered_weights"]) == sorted(altered)
    assert control["differing_elements"] == ev["totals"]["differing_elements"]
    assert set(control["post_bit_patterns"]) == {"0x7fff"}
    attribution = ev["attribution"]
    assert attribution["controls_point_to"] == "torch.distributed.fsdp"
    assert attribution["decided_by"][0].startswith("control: the same bits")


def test_attribution_follows_the_control():
    # A byte-true control clears FSDP2's unshard; the same altered weights are then bitsandbytes'.
    from fsdpqdiag.analyses import forensics

    row = {"module": "m", "swap_target": {"bytes_equal": False}, "local_tensor": {"bytes_equal": True}}
    evidence = {"modules": [row], "fingerprint": {"matches": ["torch._foreach_copy_ (bf16)"]}}
    control = {"weights": 1, "altered_weights": [], "differing_elements": 0}
    kept = {**evidence, "controls": {"plain_parameters_same_bits": {**control, "outcome": "byte-true"}}}
    assert forensics.attribute(kept)[0] == "bitsandbytes"
    changed = {**control, "outcome": "altered", "altered_weights": ["m"], "differing_elements": 3}
    altered = {**evidence, "controls": {"plain_parameters_same_bits": changed}}
    component, decided_by = forensics.attribute(altered)
    assert component == "torch.distributed.fsdp" and "altered 3 elements in 1 weights" in decided_by[0]
    assert forensics.attribute(evidence)[0] == "undetermined"  # no control ran


@pytest.mark.parametrize("repack", ["on", "off"])
def test_forensics_holds_on_both_bitsandbytes_cpu_paths(shared_cli, monkeypatch, repack):
    # On a CPU with AVX512-BF16, bitsandbytes rewrites Linear4bit weights in place at the
    # first inference forward; the switch takes either path on any CPU. This CPU's own path
    # is the uninjected run's: only the other one needs a run of its own.
    from fsdpqdiag.stack import bnb_cpu_path

    unforced = bnb_cpu_path.override() is None
    if unforced and bnb_cpu_path.describe()["inference_repacks_weight"] is (repack == "on"):
        result, r = _shared(shared_cli, 2)
        report = result.report
    else:
        monkeypatch.setenv(bnb_cpu_path.ENV, repack)
        _, report, r = _forensics(world_sizes=[2])
    assert report["env"]["bitsandbytes"]["cpu_path"]["inference_repacks_weight"] is (repack == "on")
    assert r["verdict"] in ("NOT REPRODUCED", "REPRODUCED", "INCONCLUSIVE"), r["summary"]
    ev = r["evidence"]
    assert ev["bnb_cpu_repacked_modules"] == (14 if repack == "on" else 0)
    assert len(ev["modules"]) == ev["totals"]["quantized_modules"] == 14
    for row in ev["modules"]:
        assert (row["swap_target"]["differing_elements"] == 0) == row["swap_target"]["bytes_equal"]
        assert row["local_tensor"]["bytes_equal"]
    assert ev["ranks_agree"]


def test_a_death_in_full_tensor_keeps_the_forward_evidence():
    # Mechanism B under gloo on CUDA kills every rank in full_tensor(); the per-module
    # evidence of the forward (Mechanism A) was complete by then and must be the verdict.
    _, _, r = _forensics(world_sizes=[2], inject="segfault")
    ev = r["evidence"]
    assert ev["full_tensor"]["status"] == "crashed" and ev["full_tensor"]["signal"] == "SIGSEGV"
    assert r["verdict"] == ("NOT REPRODUCED" if ev["totals"]["altered_modules"] == 0 else "REPRODUCED")
    assert len(ev["modules"]) == ev["totals"]["quantized_modules"] == 14
    assert all("full_tensor" not in row for row in ev["modules"])
    assert "full_tensor() did not complete: rank(s) 0, 1 SIGSEGV" in r["summary"]


def test_model_paths_are_checked(run_cli, tmp_path):
    missing = run_cli("forensics", "--device", "cpu", "--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "README").write_text("not a model")
    not_model = run_cli("forensics", "--device", "cpu", "--model", str(tmp_path))
    assert not_model.returncode == 2 and "not a Hugging Face model directory" in not_model.stderr
    bad_bits = run_cli("forensics", "--device", "cpu", "--bits", "3")
    assert bad_bits.returncode == 2 and "--bits must be 4 or 8" in bad_bits.stderr
