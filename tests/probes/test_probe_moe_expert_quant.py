"""moe-expert-quant: parametrize-quantized fused MoE experts + LoRA under fully_shard.

Real Qwen3-MoE, real bitsandbytes parametrize quantization, real peft and real FSDP2 on
gloo at WS=1 and WS=2. Uninjected verdicts belong to the stack: the tests check that the
evidence is self-consistent, that the standalone script measures the same, and that the
swap-packed-nibbles fault is caught. Each launch runs once per module (ranks are slow).
"""

import dataclasses
import json

import jsonschema
import pytest
from typer.testing import CliRunner

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.probes.moe_expert_quant import probe as moe_expert_quant
from fsdpqdiag.report.model import json_schema
from tests.support import cpu_probe, reproduce_small
from tests.support.scripts import standalone

PROBE = "moe-expert-quant"
VIEWS = ("forward", "local", "unsharded")
SHARD_STAGES = ("fully_shard", "forward after fully_shard", "backward after fully_shard", "unshard")


def _probe(ws: int, inject: str | None = None, **config):
    return cpu_probe(PROBE, ws, inject, **config)


@pytest.fixture(scope="module")
def cli_ws1(shared_cli):
    """The WS=1 run of every probe as a user runs it (the one the suite shares): also the
    probe's WS=1 result for the checks below."""
    run = shared_cli(*reproduce_small(1), timeout=600)
    return run, run.json_path


def _of_probe(report: dict) -> dict:
    (result,) = [r for r in report["results"] if r["probe"] == PROBE]
    return result


@pytest.fixture(scope="module")
def results(cli_ws1, shared_probe):
    done, path = cli_ws1
    assert path.exists(), done.stderr[-3000:]
    return {1: _of_probe(json.loads(path.read_text())), 2: dataclasses.asdict(shared_probe(PROBE, 2))}


@pytest.fixture(scope="module")
def injected():
    return {ws: dataclasses.asdict(_probe(ws, inject="swap-packed-nibbles")) for ws in (1, 2)}


def test_reproduce_cli_end_to_end(cli_ws1):
    done, path = cli_ws1
    report = json.loads(path.read_text())
    jsonschema.validate(report, json_schema())
    result = _of_probe(report)
    assert result["world_size"] == 1 and result["backend"] == "gloo"
    if result["verdict"] in ("REPRODUCED", "CRASHED"):  # the run's status is its worst probe's
        assert done.returncode == 1, done.stderr
    assert PROBE in done.stdout and result["verdict"] in done.stdout
    ev = result["evidence"]
    # the table shows the expert storage views in the swap-target and _local_tensor columns
    forward = ev["expert_storage_forward"]
    assert f"{forward['differing_elements']} el / {forward['differing_bytes']} B" in done.stdout
    markdown = CliRunner().invoke(__import__("fsdpqdiag.cli", fromlist=["app"]).app, ["report", str(path)])
    assert markdown.exit_code == 0, markdown.output
    assert f"**{result['verdict']}** {PROBE}" in markdown.output
    assert f"loss {ev['loss']} vs baseline {ev['baseline_loss']}" in markdown.output
    assert "reproducers/moe_expert_quant.py" in markdown.output


@pytest.mark.parametrize("ws", [1, 2])
def test_evidence_is_self_consistent(results, ws):
    result = results[ws]
    ev = result["evidence"]
    assert len(result["ranks"]) == ws and all(r["status"] == "ok" for r in result["ranks"])
    assert result["verdict"] in ("REPRODUCED", "NOT REPRODUCED", "INCONCLUSIVE")
    assert ev["quantization"]["api"] == "bitsandbytes.nn.parametrize.replace_parameter_4bit"
    if ev["eight_bit"]["status"] == "skipped":
        assert "no 8-bit parametrize API" in ev["eight_bit"]["reason"]
        assert "replace_parameter_8bit," not in ev["eight_bit"]["reason"].split("offers")[-1]
    assert ev["ranks_agree"] is True
    for rank in result["ranks"]:
        rev = rank["evidence"]
        failed = {f["stage"] for f in rev["failures"]}
        assert {s for s, status in rev["stages"].items() if status == "failed"} == failed
        assert len(rev["experts"]) == 4
        for key, expert in rev["experts"].items():
            # packed 4-bit: two codes per uint8 byte of the fused [experts, rows, cols] tensor
            experts, rows, cols = expert["fused_shape"]
            assert expert["storage_dtype"] == "uint8"
            assert expert["storage_shape"] == [experts * rows * cols // 2, 1]
            assert expert["sha256"] == ev["experts"][key]["sha256"], "same seed, same bytes on every rank"
            for view in VIEWS:
                if view in expert and expert[view]["comparable"]:
                    section = expert[view]
                    assert section["bytes_equal"] == (section["differing_elements"] == 0)
                    assert section["differing_bytes"] == section["differing_elements"]  # 1 B elements
            if "local" in expert and expert["local"]["comparable"]:
                storage = expert["storage_shape"][0]
                chunk = -(-storage // ws)
                assert expert["local"]["elements"] == max(0, min(chunk, storage - rank["rank"] * chunk))
        for view in VIEWS:
            total = rev[f"expert_storage_{view}"]
            if total is not None:
                sections = [e[view] for e in rev["experts"].values() if view in e]
                assert total["differing_elements"] == sum(s.get("differing_elements", 0) for s in sections)
                assert total["bytes_equal"] == all(s["bytes_equal"] for s in sections)
        if "loss" in rev:
            assert (
                rev["output_bit_equal"]
                == (rev["loss"] == rev["baseline_loss"])
                == (rev["max_abs_delta"] == 0)
            )
        if "lora_grads" in rev:
            grads = rev["lora_grads"]
            assert grads["trainable"] == rev["lora"]["trainable_params"] == rev["baseline_grads"]["trainable"]
            assert grads["with_grad"] + len(grads["missing"]) == grads["trainable"]
            assert grads["bit_equal"] + len(grads["differing"]) == grads["with_grad"]
            assert (grads["max_abs_delta"] == 0) or grads["differing"]
    # the verdict says what the evidence says
    clean = (
        not ev["failures_all_ranks"]
        and all(r["evidence"]["output_bit_equal"] for r in result["ranks"])
        and all(r["evidence"][f"expert_storage_{v}"]["bytes_equal"] for r in result["ranks"] for v in VIEWS)
        and all(not r["evidence"]["lora_grads"]["differing"] for r in result["ranks"])
    )
    assert (result["verdict"] == "NOT REPRODUCED") == clean, result["summary"]
    if clean:
        assert all(status == "ok" for status in ev["stages"].values())


@pytest.mark.parametrize("ws", [1, 2])
def test_standalone_reproducer_measures_the_same(results, ws):
    lines = standalone(results[ws])
    ranks = results[ws]["ranks"]
    assert len(lines) == len(ranks) == ws
    for line, rank in zip(lines, ranks):
        ev = rank["evidence"]
        assert line["rank"] == rank["rank"] and line["world_size"] == ws
        for stage, status in line["stages"].items():
            assert ev["stages"][stage] == status, stage
        assert [f["exception"] for f in line["failures"]] == [f["exception"] for f in ev["failures"]]
        for key in ("baseline_loss", "loss", "max_abs_delta"):
            assert line.get(key) == ev.get(key), key
        assert line.get("loss_bit_equal") == ev.get("output_bit_equal")
        for name, expert in line["experts"].items():
            for view, section in expert.items():
                probe_section = ev["experts"][name][view]
                assert section["bytes_equal"] == probe_section["bytes_equal"], (name, view)
                assert section.get("differing_bytes") == probe_section.get("differing_bytes"), (name, view)
        if "lora_grads" in line:
            for key in ("trainable", "with_grad", "nonfinite_elements", "bit_equal"):
                assert line["lora_grads"][key] == ev["lora_grads"][key], key


def _swapped(bits: str) -> str:
    value = int(bits, 16)
    return f"0x{((value << 4) | (value >> 4)) & 0xFF:02x}"


@pytest.mark.parametrize("ws", [1, 2])
def test_swap_packed_nibbles_fault_is_caught(injected, ws):
    result = injected[ws]
    assert result["verdict"] == "REPRODUCED", result["summary"]
    assert result["injected"] == "swap-packed-nibbles"
    for rank in result["ranks"]:
        ev = rank["evidence"]
        assert not ev["failures"]
        assert ev["output_bit_equal"] is False and ev["max_abs_delta"] > 0
        # the fault acts where FSDP2 builds the unsharded parameter: every shard is intact
        assert ev["expert_storage_local"]["bytes_equal"] is True
        for expert in ev["experts"].values():
            for view in ("forward", "unsharded"):
                section = expert[view]
                # bytes whose two codes agree survive a swap; every other byte differs
                assert 0 < section["differing_elements"] < section["elements"]
                assert section["samples"]
                assert all(s["post_bits"] == _swapped(s["original_bits"]) for s in section["samples"])
            assert expert["forward"]["positions_digest"] == expert["unsharded"]["positions_digest"]
        assert ev["lora_grads"]["differing"]


class _Ctx:
    def checkpoint(self, stage, evidence):
        self.stage = stage


def test_stage_failure_names_the_module_it_arose_in():
    import torch

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("refused by the stack\nsecond line")

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Broken())
    evidence = {}
    stages = moe_expert_quant.Stages(_Ctx(), evidence)
    stages.name_modules(model)
    with stages.run("forward after fully_shard"):
        stages.at(module="1", parameter="weight")
        model(torch.zeros(1, 2))
    with stages.run("unshard"):
        pass
    assert evidence["stages"] == {"forward after fully_shard": "failed", "unshard": "ok"}
    (failure,) = evidence["failures"]
    assert failure["exception"] == "RuntimeError: refused by the stack"
    assert failure["module"] == "1" and failure["module_type"] == "Broken"
    assert "in forward" in failure["frame"]
    assert failure["while"] == {"module": "1", "parameter": "weight"}


def _outcome(rank: int, **evidence) -> RankOutcome:
    base = {"failures": [], "stages": {}, "quantization": {"quant_type": "nf4", "bits": 4}, "experts": {}}
    return RankOutcome(rank, "ok", {**base, **evidence})


def test_verdict_separates_setup_failures_from_fsdp2_failures():
    failure = {"exception": "TypeError: x", "module": None, "frame": "f.py:1 in g", "while": {}}
    setup = moe_expert_quant.verdict([_outcome(0, failures=[{"stage": "quantize experts", **failure}])])
    assert setup.verdict == "INCONCLUSIVE" and "without FSDP2" in setup.summary
    sharding = moe_expert_quant.verdict([_outcome(0, failures=[{"stage": "fully_shard", **failure}])])
    assert (
        sharding.verdict == "REPRODUCED" and "fully_shard fails on rank 0: TypeError: x" in sharding.summary
    )
    missing = moe_expert_quant.verdict([_outcome(0, skipped="no parametrize API")])
    assert missing.verdict == "SKIPPED" and missing.summary == "no parametrize API"
