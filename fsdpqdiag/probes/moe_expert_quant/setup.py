"""moe-expert-quant (see its module): its knobs, bitsandbytes' parametrize API, the stage
runner that turns a stage the stack refuses into evidence, and the byte and gradient
comparisons the stages record. torch is imported inside the functions."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.probes.raised import RaisedStage

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


LORA_TARGETS = ("q_proj", "v_proj")


# Knobs beyond LinearConfig (whose in/out_features this fixed-geometry model ignores); the
# defaults are what `fsdpqdiag reproduce` runs.
KNOBS: dict[str, Any] = {"expert_bits": 4, "lora": True, "seq_len": 16}


STORAGE_VIEWS = ("forward", "local", "unsharded")


def split_config(config: dict[str, Any]) -> tuple[LinearConfig, dict[str, Any]]:
    fields = {f.name for f in dataclasses.fields(LinearConfig)}
    unknown = sorted(set(config) - fields - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown moe-expert-quant config keys {unknown} (knobs: {', '.join(KNOBS)})")
    linear = LinearConfig(**{k: v for k, v in config.items() if k in fields})
    return linear, {**KNOBS, **{k: v for k, v in config.items() if k in KNOBS}}


def parametrize_quantizer(bits: int):
    """bitsandbytes' parametrize function for ``bits``-bit experts, or why there is none."""
    import bitsandbytes

    try:
        from bitsandbytes.nn import parametrize
    except ImportError as exc:
        return None, f"bitsandbytes {bitsandbytes.__version__} has no bitsandbytes.nn.parametrize ({exc})"
    name = f"replace_parameter_{bits}bit"
    function = getattr(parametrize, name, None)
    if function is None:
        offered = sorted(n for n in dir(parametrize) if n.startswith("replace_parameter"))
        return None, (
            f"bitsandbytes {bitsandbytes.__version__} has no {bits}-bit parametrize API "
            f"(no bitsandbytes.nn.parametrize.{name}; it offers {', '.join(offered) or 'nothing'})"
        )
    return function, None


class Stages:
    """Runs each stage under a checkpoint; a stage that raises is recorded, not re-raised.

    ``at(...)`` names what a stage is working on (the layer being sharded, the parameter
    being quantized) so that a failure says where it arose even when the traceback does
    not pass through a module of the model.
    """

    def __init__(self, ctx, evidence: dict[str, Any]):
        self.ctx = ctx
        self.evidence = evidence
        self.module_names: dict[int, str] = {}
        self.current: dict[str, str] = {}
        evidence.setdefault("stages", {})
        evidence.setdefault("failures", [])

    def name_modules(self, model) -> None:
        self.module_names = {id(module): name or "(root)" for name, module in model.named_modules()}

    def at(self, **where: str) -> None:
        self.current = where

    def ok(self, *names: str) -> bool:
        return all(self.evidence["stages"].get(name) == "ok" for name in names)

    def skip(self, name: str, reason: str) -> None:
        self.evidence["stages"][name] = f"skipped: {reason}"

    @contextlib.contextmanager
    def run(self, name: str):
        self.ctx.checkpoint(name, self.evidence)
        self.current = {}
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - what the stack under test raises is evidence
            self.evidence["stages"][name] = "failed"
            self.evidence["failures"].append(
                {**RaisedStage.of(exc, name, self.module_names).to_dict(), "while": dict(self.current)}
            )
        else:
            self.evidence["stages"][name] = "ok"


def compact(comparison: dict[str, Any]) -> dict[str, Any]:
    """A byte diff without its position list (its hash stays): four per rank add up."""
    return {k: v for k, v in comparison.items() if k not in ("positions", "positions_truncated")}


def aggregate(experts: dict[str, dict], view: str) -> dict[str, Any] | None:
    """One view (forward / local / unsharded) summed over every expert tensor."""
    diffs = [entry[view] for entry in experts.values() if view in entry]
    if not diffs:
        return None
    changed_form = [d["reason"] for d in diffs if not d.get("comparable", True)]
    return {
        "tensors": len(diffs),
        "comparable": not changed_form,
        "changed_form": changed_form[0] if changed_form else None,
        "bytes_equal": all(d.get("bytes_equal") for d in diffs),
        "elements": sum(d.get("elements", 0) for d in diffs),
        "differing_elements": sum(d.get("differing_elements", 0) for d in diffs),
        "differing_bytes": sum(d.get("differing_bytes", 0) for d in diffs),
    }


def grad_comparison(model, baseline: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Each LoRA gradient after FSDP2's backward (this rank's shard) against the same rows
    of the baseline gradient: present, finite, bit-equal?"""
    import torch

    from fsdpqdiag.evidence.bytes import plain
    from fsdpqdiag.probes.common import local_shard_of

    missing, differing, nonfinite, bit_equal, max_delta = [], [], 0, 0, 0.0
    for name, param in model.named_parameters():
        if name not in baseline:
            continue
        if param.grad is None:
            missing.append(name)
            continue
        local = plain(param.grad)
        expected = local_shard_of(baseline[name], rank, world_size).to(local.device)
        nonfinite += int((~torch.isfinite(local)).sum())
        if local.dtype == expected.dtype and torch.equal(local, expected):
            bit_equal += 1
            continue
        differing.append(name)
        if local.shape == expected.shape:
            delta = (local.float() - expected.float()).abs()
            finite = delta[torch.isfinite(delta)]
            if finite.numel():
                max_delta = max(max_delta, float(finite.max()))
    return {
        "trainable": len(baseline),
        "with_grad": len(baseline) - len(missing),
        "missing": missing,
        "nonfinite_elements": nonfinite,
        "bit_equal": bit_equal,
        "differing": differing,
        "max_abs_delta": max_delta,
    }
