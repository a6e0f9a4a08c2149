"""int8-params: ``Linear8bitLt(has_fp16_weights=False)`` + LoRA through FSDP2, end to end.

An 8-bit layer keeps its weight as ``Int8Params``: int8 row-quantized values plus a
Python attribute ``SCB`` (one fp32 scale per output row) that ``forward`` and
``_save_to_state_dict`` read from the weight. FSDP2 builds its own parameters from the
data (torch 2.13: ``nn.Parameter(DTensor)`` sharded, ``nn.Parameter(Tensor)`` unsharded);
whether the subclass and its ``SCB`` survive that is what axolotl's ``fsdp2_qlora``
patches are about. The probe walks one real peft LoRA model (``get_peft_model`` on a tiny wrapper of
one ``Linear8bitLt``) through every stage a training job does, and records per stage what
happened, with the exact exception and the frame it came from where a stage fails:

``fully_shard`` (accepted? local shard's int8 bytes; SCB on the sharded weight),
``unshard`` (the all-gathered weight's dtype, bytes, SCB), ``forward`` (the weight forward
receives; output vs a non-FSDP baseline), ``backward`` (LoRA gradients vs the baseline's),
``state_dict`` (keys, DTensor weights, SCB / weight_format, int8 bytes gathered back),
``save`` (the state dict gathered to full tensors and ``torch.save``d, as
``save_pretrained`` would) and ``load`` (into a fresh non-FSDP model quantized from other
seeds, whose forward must then equal the baseline's).

The baseline is the same model built again from the same seeds, never sharded, with its
LoRA weights rounded to the policy's ``param_dtype``: FSDP2 computes in that dtype, so a
byte-true stack gives bit-equal outputs and gradients.
"""

from __future__ import annotations

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation, default_key_numbers
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.probes.int8_params.setup import STAGES
from fsdpqdiag.probes.int8_params.stages import run
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED


def _stage_key(evidence: dict) -> tuple:
    stages = evidence.get("stages", {})
    return tuple(
        (
            name,
            stages.get(name, {}).get("status"),
            stages.get(name, {}).get("ok"),
            stages.get(name, {}).get("error"),
        )
        for name in STAGES
    )


def _describe_failure(entry: dict, brief: bool = False) -> str:
    if entry.get("status") == "raised":
        where = f" at {entry['where']}" if entry.get("where") else ""
        return f"{entry['error']}{where}"
    if entry.get("status") == "not run":
        return f"not run ({entry.get('reason')})"
    findings = entry.get("findings", [])
    return (findings[0] if brief else "; ".join(findings)) if findings else "altered"


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    failed = failure_verdict(outcomes, keep_evidence=True)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    evidence["ranks_agree"] = ranks_agree(outcomes, _stage_key)
    failing: dict[str, tuple[int, dict]] = {}
    for name in STAGES:
        for outcome in outcomes:
            entry = outcome.evidence.get("stages", {}).get(name)
            if entry is not None and not entry.get("ok"):
                failing[name] = (outcome.rank, entry)
                break
    evidence["failing_stages"] = list(failing)
    evidence["first_failing_stage"] = next(iter(failing), None)
    if not failing:
        return Verdict(
            NOT_REPRODUCED,
            "every stage (fully_shard, unshard, forward, backward, state_dict, save, load) kept the int8 "
            "bytes and SCB; outputs and LoRA gradients bit-equal to the non-FSDP baseline",
            evidence,
        )
    # The first failing stage in full; each later one by its error or first finding.
    (first, (rank, entry)), *later = failing.items()
    summary = f"first failing stage {first} (rank {rank}): {_describe_failure(entry)}"
    if later:
        summary += "; then " + "; ".join(
            f"{name}: {_describe_failure(entry, brief=True)}" for name, (_, entry) in later
        )
    return Verdict(REPRODUCED, summary, evidence)


def attribute(evidence: dict) -> tuple[str, list[str]]:
    from fsdpqdiag.evidence import attribution

    control = (evidence.get("controls") or {}).get("plain_integer_parameters")
    first = evidence.get("first_failing_stage")
    if control is None or first is None:
        return attribution.UNDETERMINED, [f"the run ended in {evidence.get('stage') or 'setup'}"]
    said = f"control: plain frozen int8/uint8 parameters through the same fully_shard: {control['outcome']}"
    if control["outcome"] != "kept":
        # FSDP2 fails plain integer parameters the same way: not Int8Params' doing.
        return attribution.TORCH_FSDP, [said, f"first failing stage: {first}"]
    return attribution.BITSANDBYTES, [
        said,
        f"first failing stage: {first}: Int8Params keeps SCB/CB on the Parameter object, which "
        "FSDP2 replaces, and defines no fsdp_pre_all_gather to carry them",
    ]


PROBE = Probe(
    name="int8-params",
    description="Linear8bitLt + LoRA under fully_shard: int8 bytes and SCB through shard, forward, "
    "backward, state_dict, save and load?",
    run=run,
    verdict=verdict,
    needs=Needs(packages=("bitsandbytes", "peft")),
    standalone="reproducers/int8_params.py",
    attribute=attribute,
    # Its backward reduce-scatters the LoRA gradients.
    preconditions=("all_gather_into_tensor", "reduce_scatter_tensor"),
    controls=("cast-mismatched-storage",),
    # It reads as its stages, each ok, altered, raised or not run: the default key numbers.
    presentation=Presentation(default_key_numbers),
)
