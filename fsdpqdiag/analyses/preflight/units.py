"""On each rank: per FSDP unit of the model under test, the dtype FSDP2 will all-gather in
(by value in the parameters' dtype when every input shares one, by bytes through uint8
when they differ)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsdpqdiag.analyses.preflight.names import (
    FLOAT_DTYPES,
)


def _all_gather_dtype(fsdp_params) -> tuple[str, list[str], str]:
    """The dtype FSDP2 all-gathers a param group in, its inputs' dtypes, and where that was read.

    FSDP2's own ``_get_all_gather_input_metadatas`` over each ``FSDPParam.all_gather_inputs``
    where this torch has them (no collective runs: they are the sharded inputs); else its
    rule applied to each parameter's ``param_dtype`` or sharded storage dtype.
    """
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_all_gather_input_metadatas

        inputs = [fsdp_param.all_gather_inputs for fsdp_param in fsdp_params]
        input_dtypes, _, dtype = _get_all_gather_input_metadatas(inputs)
        names = [str(d).removeprefix("torch.") for ds in input_dtypes for d in ds]
        return str(dtype).removeprefix("torch."), names, "fsdp2"
    except Exception:  # noqa: BLE001 - older/newer FSDP2 internals: fall back to the rule
        names = [
            str(p.param_dtype or p._sharded_param_data.dtype).removeprefix("torch.") for p in fsdp_params
        ]
        return (names[0] if len(set(names)) == 1 else "uint8"), names, "rule"


def _param_groups(state) -> list:
    """An FSDP state's parameter groups: a list in newer torch (2.13 here), one group or
    None in torch 2.11 (seen on the H200), which has no ``_fsdp_param_groups``."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def fsdp_units(units: list[tuple[str, Any]], quantized: set[tuple[int, str]]) -> list[dict[str, Any]]:
    """Per FSDP unit (after ``fully_shard``; the root last): parameter dtypes and how FSDP2
    all-gathers them."""
    # FSDP2 settles each parameter's param_dtype in the root's lazy init, the first step of
    # the first forward; it runs no collective, so it is run here as forward would run it.
    units[-1][1]._get_fsdp_state()._lazy_init()
    rows = []
    for unit_name, module in units:
        for group in _param_groups(module._get_fsdp_state()):
            params = group.fsdp_params
            if not params:
                continue
            dtype, input_dtypes, source = _all_gather_dtype(params)
            param_dtypes: dict[str, int] = {}
            for fsdp_param in params:
                name = str(fsdp_param.orig_dtype).removeprefix("torch.")
                param_dtypes[name] = param_dtypes.get(name, 0) + 1
            held = sum((id(p._module_info.module), p._module_info.param_name) in quantized for p in params)
            by_value = dtype != "uint8" or set(input_dtypes) == {"uint8"}
            rows.append(
                {
                    "unit": unit_name or "(root)",
                    "parameters": len(params),
                    "parameter_dtypes": param_dtypes,
                    "all_gather_input_dtypes": sorted(set(input_dtypes)),
                    "all_gather_dtype": dtype,
                    "all_gather_by": "value" if by_value else "bytes",
                    "quantized_parameters": held,
                    # Packed storage all-gathered by value in a float dtype meets float copies.
                    "packed_storage_exposed": bool(held and by_value and dtype in FLOAT_DTYPES),
                    "source": source,
                }
            )
    return rows


def _units_of_linear(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.core.config import LinearConfig
    from fsdpqdiag.probes.common import build_linear4bit, shard

    cfg = LinearConfig(**config)
    linear, _ = build_linear4bit(cfg, ctx.device)
    quantized = {(id(linear), "weight")}
    shard(linear, ctx, cfg)
    return {
        "subject": f"Linear4bit {cfg.in_features}x{cfg.out_features}, quant_storage {cfg.quant_storage}",
        "wrapping": "fully_shard on the layer",
        "mp_policy": {"param_dtype": cfg.param_dtype, "reduce_dtype": cfg.reduce_dtype},
        "units": fsdp_units([("", linear)], quantized),
    }


def _units_of_model(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag.probes.common import fsdp_api
    from fsdpqdiag.stack import models

    quant = models.QuantConfig(
        bits=config.get("bits", 4),
        quant_type=config.get("quant_type", "nf4"),
        double_quant=config.get("double_quant", True),
        quant_storage=config.get("quant_storage", "bfloat16"),
    )
    model = models.load_quantized(Path(config["model"]), quant, ctx.device)
    if config.get("lora"):
        model = models.apply_lora(model)
    quantized = {
        (id(module), name.rsplit(".", 1)[1]) for name, module, _, _ in models.quantized_parameters(model)
    }
    # Wrapped as forensics and the matrix's default cell wrap it: per decoder layer, then root.
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = models.decoder_layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh(), mp_policy=policy)
    fully_shard(model, mesh=ctx.mesh(), mp_policy=policy)
    units = [(names[id(layer)], layer) for layer in layers] + [("", model)]
    return {
        "subject": config.get("label") or Path(config["model"]).name,
        "wrapping": "fully_shard per decoder layer, then the root",
        "mp_policy": {"param_dtype": "bfloat16", "reduce_dtype": "float32"},
        "units": fsdp_units(units, quantized),
    }
