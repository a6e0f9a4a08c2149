"""Verify a workaround bit for bit against training without FSDP, on every rank.

The ``fix`` command's rank task (``fix-verify``). Outside ``fsdpqdiag/fixes/`` so that
registering it does not import every workaround, and torch with them (the registry stays
cheap to import: ``--help``, the renderers); the workarounds are imported in ``run``.

The same fixed-seed model is built twice: once trained K steps without FSDP (the
baseline), once with ``fully_shard`` and the workaround. Forward output, loss, every LoRA
gradient and every LoRA parameter after each optimizer step are compared as bits. Both
ranks of a WS=2 run see the same batch, so FSDP2's gradient average equals each rank's
gradient exactly, and any difference is the workaround's (or the bug's).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsdpqdiag.core.config import LinearConfig, torch_dtype
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict
from fsdpqdiag.report.model import NO_FIX_NEEDED, NOT_VERIFIED, STATE_LOST, VERIFIED

if TYPE_CHECKING:
    import torch

TARGETS = ("linear", "tiny-llama")


@dataclass(frozen=True)
class FixConfig:
    workaround: str = "none"
    target: str = "linear"
    steps: int = 3
    lr: float = 1e-2
    linear: dict = dataclasses.field(default_factory=lambda: dataclasses.asdict(LinearConfig(256, 256)))


def _build(cfg: FixConfig, overrides: dict, device: torch.device):
    """Model, loss function and fixed input, from seeds alone (so twice gives the same)."""
    import torch
    from peft import LoraConfig, get_peft_model

    class _LinearWithLoRA(torch.nn.Module):
        """A single Linear4bit as PEFT sees it in a model (its module is named ``proj``)."""

        def __init__(self, linear):
            super().__init__()
            self.proj = linear

        def forward(self, x):
            return self.proj(x)

    if cfg.target == "linear":
        from fsdpqdiag.probes.common import build_linear4bit

        linear_cfg = LinearConfig(**{**cfg.linear, **overrides})
        linear, x = build_linear4bit(linear_cfg, device)
        torch.manual_seed(7)
        model = get_peft_model(
            _LinearWithLoRA(linear),
            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False),
        )
        return _as_policy_dtype(model), (lambda m: m(x).float().pow(2).mean()), [model]
    from fsdpqdiag.stack import models

    quant = models.QuantConfig(**{k: v for k, v in overrides.items() if k in ("quant_storage",)})
    model = models.load_quantized(models.preset_dir(cfg.target), quant, device)
    model = models.apply_lora(model)
    for module in model.modules():  # non-zero B: LoRA gradients flow into every layer at once
        if hasattr(module, "lora_B"):
            for weight in module.lora_B.values():
                values = torch.randn(weight.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.02
                weight.weight.data.copy_(values)  # drawn on the CPU: the same on every device
    ids = models.fixed_input(model.config.vocab_size, batch=2, seq_len=16).to(device)
    units = [*models.decoder_layers(model), model]
    return _as_policy_dtype(model), (lambda m: m(input_ids=ids, labels=ids).loss), units


def _as_policy_dtype(model):
    """LoRA weights in bf16, the policy's param_dtype, so FSDP2's cast is a no-op and any
    difference from the baseline is about the packed weights, not about precision."""
    import torch

    with torch.no_grad():
        for param in _trainable(model).values():
            param.data = param.data.to(torch.bfloat16)
    return model


def _patch_points() -> tuple:
    """The functions workarounds may replace, by identity."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    return (
        bnb.nn.Linear4bit.forward,
        bnb.nn.Linear8bitLt._save_to_state_dict,
        FSDPParam._init_extensions,
        FSDPParam.init_unsharded_param,
        FSDPParam.init_dtype_attrs,
    )


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().float().cpu()


def _train(model, loss_fn, steps: int, lr: float) -> list[dict[str, Any]]:
    import torch

    optimizer = torch.optim.SGD(list(_trainable(model).values()), lr=lr)
    history = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = loss_fn(model)
        loss.backward()
        grads = {n: _full(p.grad) for n, p in _trainable(model).items() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        params = {n: _full(p) for n, p in _trainable(model).items()}
        history.append(
            {
                "loss": loss.detach().float().cpu(),
                "grads": grads,
                "params": params,
                "seconds": time.perf_counter() - started,
            }
        )
    return history


def _first_divergence(baseline, sharded) -> dict[str, Any] | None:
    import torch

    for step, (a, b) in enumerate(zip(baseline, sharded)):
        for kind in ("loss", "grads", "params"):
            left, right = (a[kind], b[kind]) if kind != "loss" else ({"loss": a[kind]}, {"loss": b[kind]})
            for name in sorted(left):
                x, y = left[name], right.get(name)
                if y is None or x.shape != y.shape or not torch.equal(x.view(-1), y.view(-1)):
                    delta = (x - y).abs().max().item() if y is not None and x.shape == y.shape else None
                    return {"step": step, "kind": kind, "tensor": name, "max_abs_delta": delta}
    return None


def _int8_state_dict_check(workaround, ctx, fully_shard) -> dict[str, Any]:
    """Does a Linear8bitLt's state dict keep its row scales (SCB) through fully_shard
    with this workaround? Compared bit for bit with the state dict before sharding."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(11)
    layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
    model = torch.nn.Sequential(layer).to(ctx.device)
    before = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    handle = workaround.prepare(model)
    try:
        fully_shard(model, mesh=ctx.mesh())
        handle.apply()
        after = {k: _full(v) for k, v in model.state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is this check's finding
        # torch 2.11 refuses the frozen int8 weight in fully_shard itself (on every rank,
        # before any collective): the row's training comparison stands, this check cannot.
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        return {"int8_scb_saved": None, "int8_keys_missing": None, "int8_check_error": message}
    finally:
        handle.undo()
    scb = next((k for k in before if k.endswith("SCB")), None)
    return {
        "int8_scb_saved": scb in after and torch.equal(before[scb].float(), after[scb]),
        "int8_keys_missing": sorted(set(before) - set(after)),
    }


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag import fixes
    from fsdpqdiag.probes.common import fsdp_api

    cfg = FixConfig(**config)
    workaround = fixes.get(cfg.workaround)
    evidence: dict[str, Any] = {"workaround": cfg.workaround, "target": cfg.target, "steps": cfg.steps}
    ctx.checkpoint("baseline without FSDP", evidence)
    model, loss_fn, _ = _build(cfg, workaround.build_overrides, ctx.device)
    baseline = _train(model, loss_fn, cfg.steps, cfg.lr)
    del model

    ctx.checkpoint("build and fully_shard", evidence)
    model, loss_fn, units = _build(cfg, workaround.build_overrides, ctx.device)
    patched_before = _patch_points()
    handle = workaround.prepare(model)
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, mesh=ctx.mesh(), mp_policy=policy)
    handle.apply()
    ctx.checkpoint("training with FSDP2", evidence)
    try:
        sharded = _train(model, loss_fn, cfg.steps, cfg.lr)
    finally:
        handle.undo()
    # undo() must leave bitsandbytes and FSDP2 exactly as they were
    evidence["restored_after_undo"] = _patch_points() == patched_before
    ctx.checkpoint("Linear8bitLt state dict through DTensor", evidence)
    evidence.update(_int8_state_dict_check(workaround, ctx, fully_shard))
    evidence["restored_after_undo"] &= _patch_points() == patched_before
    divergence = _first_divergence(baseline, sharded)
    evidence.update(
        {
            "verified": divergence is None,
            "first_divergence": divergence,
            "losses_baseline": [float(h["loss"]) for h in baseline],
            "losses_fsdp": [float(h["loss"]) for h in sharded],
            "loss_bits_equal": [bool(torch.equal(a["loss"], b["loss"])) for a, b in zip(baseline, sharded)],
            "lora_tensors_compared": len(baseline[0]["grads"]) if baseline else 0,
            "step_seconds_fsdp": [round(h["seconds"], 4) for h in sharded],
            "packed_storage": str(
                torch_dtype(workaround.build_overrides.get("quant_storage", "bfloat16"))
            ).removeprefix("torch."),
        }
    )
    return evidence


def verdict(outcomes):
    failed = failure_verdict(outcomes, keep_evidence=True)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    evidence["ranks_agree"] = len({str(o.evidence.get("losses_fsdp")) for o in outcomes}) == 1
    bad = [o for o in outcomes if not o.evidence["verified"]]
    unchecked = evidence.get("int8_check_error")
    unchecked = f"; Linear8bitLt state dict not checked: fully_shard raised {unchecked}" if unchecked else ""
    if not bad:
        exact = (
            f"{evidence['steps']} steps bit-identical to training without FSDP (loss, "
            f"{evidence['lora_tensors_compared']} LoRA gradients, parameters) on every rank"
        )
        if any(o.evidence.get("int8_scb_saved") is False for o in outcomes):
            # Bit-exact training with a checkpoint that cannot be loaded back is no fix.
            missing = ", ".join(evidence.get("int8_keys_missing") or []) or "SCB differs"
            return Verdict(
                STATE_LOST,
                f"{exact}, but a Linear8bitLt state dict loses its int8 row scales (SCB; missing: "
                f"{missing}): a checkpoint saved with it cannot be loaded back",
                evidence,
            )
        if evidence.get("workaround") == "none":
            return Verdict(NO_FIX_NEEDED, f"unfixed: {exact}; this stack needs no fix{unchecked}", evidence)
        return Verdict(VERIFIED, exact + unchecked, evidence)
    first = bad[0].evidence["first_divergence"]
    evidence["first_divergence"] = first
    return Verdict(
        NOT_VERIFIED,
        f"rank {bad[0].rank} diverges at step {first['step']} in {first['kind']} {first['tensor']} "
        f"(max |Δ| {first['max_abs_delta']}){unchecked}",
        evidence,
    )


def key_numbers(evidence: dict) -> str:
    """How a workaround's verification reads: where it first diverged from the baseline."""
    return f"first divergence: {evidence.get('first_divergence') or 'none'}"


PROBE = Probe(
    name="fix-verify",
    description="train K steps with and without FSDP2 + a workaround; compare every bit",
    run=run,
    verdict=verdict,
    needs=Needs(packages=("bitsandbytes", "peft")),
    # Training steps: all-gather in forward, reduce-scatter of the LoRA gradients in backward;
    # and the comparison itself reads every sharded gradient and parameter with full_tensor()
    # (on one H200 with gloo, that is where every workaround's ranks died, ordinary tensors too).
    preconditions=("all_gather_into_tensor", "reduce_scatter_tensor", "DTensor.full_tensor()"),
    presentation=Presentation(key_numbers, reads=frozenset({"first_divergence"})),
)
