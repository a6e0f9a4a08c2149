"""`localize` and NaN fingerprints on CPU: conversions actually run, positive control named."""

import json

import torch

from fsdpqdiag.analyses import fingerprint
from fsdpqdiag.evidence import bytes as fb
from fsdpqdiag.stack.faults import canonicalize_nans_
from tests.support import LOCALIZE_WS1, worker_session


def test_fingerprint_matches_the_conversion_that_was_run():
    payload = torch.cat([fb.all_nan_patterns(), torch.randn(64).to(torch.bfloat16)])
    for name in ("bf16->fp32->bf16", "bf16->fp16->bf16"):
        converted = fingerprint.CANDIDATES[name](payload)
        result = fingerprint.classify(fb.diff(payload, converted))
        assert name in result["matches"], (name, result)
        assert result["only_nan_class_changed"]


def test_fingerprint_of_untouched_bytes_is_none_and_controls_are_reported():
    payload = fb.all_nan_patterns()
    assert fingerprint.classify(fb.diff(payload, payload.clone())) is None
    altered = payload.clone()
    canonicalize_nans_(altered)
    result = fingerprint.classify(fb.diff(payload, altered))
    assert result["kind"] == "single canonical pattern" and result["patterns"] == ["0x7fff"]
    # every candidate was executed here and its effect recorded, matching or not
    assert set(result["candidates"]) == set(fingerprint.CANDIDATES)
    assert result["candidates"]["Tensor.copy_ (bf16)"]["nan_patterns_changed"] == 0
    for name in result["matches"]:
        assert fingerprint.signatures("cpu")[name][0xFFC1] == 0x7FFF


def test_call_sites_are_read_from_the_installed_torch():
    from fsdpqdiag.analyses.localize import call_sites

    sites = call_sites("_foreach_copy_(")
    assert sites and all(s["file"].startswith("torch/distributed/fsdp/_fully_shard/") for s in sites)
    assert any(s["function"] for s in sites)


def _localize(**options) -> dict:
    """``fsdpqdiag localize --device cpu --in-features 128 --out-features 128 ...``'s result, asked
    of the library in the worker's session."""
    from fsdpqdiag import api
    from fsdpqdiag.core.config import LinearConfig

    linear = LinearConfig(in_features=128, out_features=128)
    report = api.localize(linear=linear, device="cpu", session=worker_session(), **options)
    assert report.exit_code() in (0, 1)
    return json.loads(report.to_json())["results"][0]


def test_localize_without_fault_is_consistent(shared_cli):
    run = shared_cli(*LOCALIZE_WS1)
    assert run.returncode in (0, 1), run.stderr
    result = run.report["results"][0]
    ev = result["evidence"]
    assert ev["payload"]["nan_patterns"] == 254
    ran = [row for row in ev["ops"] + ev["pipeline"] if row["status"] == "ran"]
    assert ran and all("bytes_equal" in row for row in ran)
    altered = [row for row in ran if not row["bytes_equal"]]
    assert (result["verdict"] == "REPRODUCED") == bool(altered)
    if ev["first_altering_stage"] is None:
        assert all(row["bytes_equal"] for row in ev["pipeline"] if row["status"] == "ran")


def test_localize_names_the_injected_stage_at_ws2():
    result = _localize(world_sizes=[2], inject="nan-canonicalize")
    ev = result["evidence"]
    assert result["verdict"] == "REPRODUCED" and result["injected"] == "nan-canonicalize"
    stage = ev["first_altering_stage"]
    assert stage["stage"] == "init_unsharded_param (unsharded parameter)"
    assert stage["post_bit_patterns"] == {"0x7fff": stage["differing_elements"]}
    by_stage = {row["stage"]: row for row in ev["pipeline"]}
    assert by_stage["all-gather output (collective)"]["bytes_equal"]
    assert by_stage["copy-out into the unsharded buffer"]["bytes_equal"]
    assert not by_stage["parameter swap (weight forward receives)"]["bytes_equal"]


def test_call_sites_read_each_function_as_the_parser_delimits_it():
    import ast
    import inspect
    from pathlib import Path

    from fsdpqdiag.analyses import localize
    from fsdpqdiag.analyses.localize import _segment, _source_lines

    # Line endings the parser splits on (not \f or \v), and columns counted in UTF-8 bytes.
    source = (
        'def f(x):\r\n    y = "é\f"; return x  # torch._foreach_copy_\r'
        "def g():\n    pass\n\ndef h(): return 1"
    )
    fsdp = "torch.distributed.fsdp._fully_shard"
    modules = [__import__(f"{fsdp}.{m}", fromlist=["_"]) for m in localize.FSDP_MODULES[:3]]
    for text in [source] + [Path(inspect.getsourcefile(m)).read_text() for m in modules]:
        lines = _source_lines(text)
        assert lines == ast._splitlines_no_ff(text)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert _segment(lines, node) == ast.get_source_segment(text, node), node.name
    assert localize.call_sites("world_size == 1")  # FSDP2's own shortcut is still found
