"""Attribution records and the known-issue table, on synthetic findings (no ranks)."""

import pytest

from fsdpqdiag.evidence import attribution
from fsdpqdiag.tasks import PROBES


def _record(component, *, probe="nan-canonicalization", summary="", evidence=None, **run):
    return attribution.record(
        component,
        ["a control"],
        probe=probe,
        verdict=run.get("verdict", "REPRODUCED"),
        summary=summary,
        evidence=evidence or {},
        backend=run.get("backend", "nccl"),
        device=run.get("device", "cuda"),
        signal=run.get("signal"),
        injected=run.get("injected"),
    )


def test_components_are_reported_to_their_repositories():
    assert _record("torch.distributed.fsdp")["report_to"] == "pytorch/pytorch"
    assert _record("bitsandbytes")["report_to"] == "bitsandbytes-foundation/bitsandbytes"
    assert _record("undetermined")["report_to"] is None
    with pytest.raises(ValueError, match="unknown component"):
        _record("the weather")


def test_an_injected_fault_is_always_the_component():
    entry = _record("bitsandbytes", injected="drop-module-quant-state")
    assert entry["component"] == "injected fault" and entry["report_to"] is None
    assert entry["controls_point_to"] == "bitsandbytes" and entry["known_issues"] == []
    assert entry["decided_by"][-1] == "--inject drop-module-quant-state"


def test_known_issues_match_on_every_signature_field():
    # as the H200 wrote it: each conversion with the dtype it ran in
    foreach = {"fingerprint": {"matches": ["bf16->fp32->bf16", "torch._foreach_copy_ (bf16)"]}}
    found = _record("torch.distributed.fsdp", summary="…; post bits 0x7fff; …", evidence=foreach)
    assert any(k.startswith("pytorch/pytorch#159333") for k in found["known_issues"])
    assert any(k.startswith("bitsandbytes-foundation/bitsandbytes#1945") for k in found["known_issues"])
    # the same bits from another probe or without the fingerprint match neither
    assert (
        _record("torch.distributed.fsdp", probe="forensics", summary="post bits 0x7fff")["known_issues"] == []
    )
    refusal = {
        "fully_shard": {
            "error": "RuntimeError: only Tensors of floating point dtype can require gradients",
            "fsdp_frame": "torch/distributed/fsdp/_fully_shard/_fsdp_param.py:381 in _init_sharded_param",
        }
    }
    refused = _record("torch.distributed.fsdp", probe="non-float-params", evidence=refusal)["known_issues"]
    assert {k.split(" ")[0] for k in refused} == {"pytorch/pytorch#185239", "pytorch/pytorch#177844"}
    assert all("fixed in torch 2.12" in k for k in refused)
    crashed = "rank(s) 0, 1 died by SIGSEGV during full_tensor()"
    gloo_cuda = _record(
        "process-group backend", summary=crashed, backend="gloo", device="cuda", verdict="CRASHED"
    )
    assert any(k.startswith("pytorch/pytorch#152645") for k in gloo_cuda["known_issues"])
    # Mechanism A's finding whose evidence also records the later gloo crash is not that issue
    found_first = _record("torch.distributed.fsdp", summary=crashed, backend="gloo", device="cuda")
    assert not any(k.startswith("pytorch/pytorch#152645") for k in found_first["known_issues"])
    nccl = _record("process-group backend", summary=crashed, backend="nccl", device="cuda", verdict="CRASHED")
    assert not any(k.startswith("pytorch/pytorch#152645") for k in nccl["known_issues"])


def test_every_probe_says_how_it_blames_a_component():
    for name, probe in PROBES.items():
        assert probe.attribute is not None, name


def test_a_gather_crash_is_dtensors_only_where_the_ordinary_tensor_control_held():
    probe = PROBES["full-tensor-crash"]
    held = {
        "preflight_held": [
            "all_gather_into_tensor",
            "DTensor.full_tensor()",
            "DTensor.redistribute(Replicate)",
        ]
    }
    component, decided_by = probe.attribute({**held, "stage": "full_tensor()"})
    assert component == "torch.distributed.tensor" and "held on ordinary tensors" in decided_by[0]
    assert probe.attribute({"stage": "full_tensor()"})[0] == "undetermined"
    assert probe.attribute({"preflight_held": ["all_gather_into_tensor"]})[0] == "undetermined"


def test_markdown_leads_an_attributed_finding_with_where_to_file_it():
    import json
    from pathlib import Path

    from fsdpqdiag.render.markdown import render
    from fsdpqdiag.report.model import Report

    source = (
        Path(__file__).resolve().parents[2] / "reports/reproduce-ws2-h200x2-torch2.11-bnb0.50.2-none.json"
    )
    data = json.loads(source.read_text())
    found = next(r for r in data["results"] if r["verdict"] == "REPRODUCED")
    found["evidence"]["attribution"] = _record(
        "torch.distributed.fsdp",
        summary=found["summary"],
        evidence={"fingerprint": {"matches": ["torch._foreach_copy_"]}},
    )
    text = render(Report.from_dict(data))
    line = next(line for line in text.splitlines() if line.startswith(f"- **REPRODUCED** {found['probe']}"))
    assert "File against: pytorch/pytorch (torch.distributed.fsdp); pytorch/pytorch#159333" in line
    assert "  Decided by: a control" in text
    plain = next(r for r in data["results"] if r is not found)
    assert f"- **{plain['verdict']}** {plain['probe']} (ws=2): {plain['summary']}" in render(
        Report.from_dict(data)
    )


def test_a_matrix_cell_blames_fsdp2_only_on_a_pure_nan_signature():
    from fsdpqdiag.analyses.matrix import cell_attribution

    pure = {
        "status": "ok",
        "differing_elements": 307,
        "differing_nan_class": 307,
        "post_bit_patterns": {"0x7fff": 307},
    }
    component, decided_by = cell_attribution(pure)
    assert (
        component == "torch.distributed.fsdp" and "307 of 307" in decided_by[0] and "0x7fff" in decided_by[0]
    )
    mixed = {**pure, "differing_nan_class": 300}
    assert cell_attribution(mixed)[0] == "undetermined"
    assert cell_attribution({"status": "error"})[0] == "undetermined"


def _result(probe, verdict, ws, evidence):
    from fsdpqdiag.report.model import ProbeResult

    return ProbeResult(probe, verdict, ws, "cuda", "gloo", {}, None, "", evidence)


@pytest.mark.parametrize(
    "follows, cited",
    [("library", "kept every code"), ("stack", "altered too"), (None, None)],
)
def test_an_altered_nan_canonicalization_cites_the_torchao_reference_of_its_world_size(follows, cited):
    verdict = "REPRODUCED" if follows else "NOT REPRODUCED"
    results = [
        _result("nan-canonicalization", "REPRODUCED", 2, {"attribution": _record("torch.distributed.fsdp")}),
        _result("nan-canonicalization", "REPRODUCED", 1, {"attribution": _record("torch.distributed.fsdp")}),
        _result("torchao-nf4-reference", verdict, 2, {"follows": follows}),
        _result("torchao-nf4-reference", "UNSUPPORTED", 1, {}),
    ]
    attribution.cite_reference(results)
    attribution.cite_reference(results)  # once only, however often it is applied
    ws2, ws1 = (r.evidence["attribution"]["decided_by"] for r in results[:2])
    assert ws1 == ["a control"], "an UNSUPPORTED reference says nothing"
    if cited is None:
        assert ws2 == ["a control"]
    else:
        assert ws2[0] == "a control" and len(ws2) == 2
        assert cited in ws2[1] and "torchao-nf4-reference" in ws2[1]


def test_the_cited_reference_comes_before_the_injected_fault():
    injected = _record("torch.distributed.fsdp", injected="nan-canonicalize")
    results = [
        _result("nan-canonicalization", "REPRODUCED", 2, {"attribution": injected}),
        _result("torchao-nf4-reference", "REPRODUCED", 2, {"follows": "library"}),
    ]
    attribution.cite_reference(results)
    first, cited, last = injected["decided_by"]
    assert first == "a control" and "torchao-nf4-reference" in cited and last == "--inject nan-canonicalize"
