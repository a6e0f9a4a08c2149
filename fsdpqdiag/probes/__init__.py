"""The probe registry: adding a probe is one module and one line here."""

from __future__ import annotations

from fsdpqdiag.probes import (
    cpu_weight_repack,
    full_tensor_crash,
    int8_params,
    localize_task,
    moe_expert_quant,
    nan_canonicalization,
    non_float_params,
    quant_state_loss,
    storage_dtype_mismatch,
)
from fsdpqdiag.probes.base import Probe

PROBES: dict[str, Probe] = {
    probe.name: probe
    for probe in (
        nan_canonicalization.PROBE,
        full_tensor_crash.PROBE,
        non_float_params.PROBE,
        quant_state_loss.PROBE,
        storage_dtype_mismatch.PROBE,
        int8_params.PROBE,
        moe_expert_quant.PROBE,
        cpu_weight_repack.PROBE,
    )
}


def tasks() -> dict[str, Probe]:
    """Rank tasks of other commands (not part of `reproduce`); imported lazily because
    their modules import this registry's base in turn."""
    from fsdpqdiag import forensics, matrix, preflight
    from fsdpqdiag.fixes import verify
    from fsdpqdiag.probes import batch

    return {
        probe.name: probe
        for probe in (
            localize_task.PROBE,
            verify.PROBE,
            matrix._probe(),
            forensics.PROBE,
            batch.PROBE,
            preflight.PROBE,
        )
    }


def get_probe(name: str) -> Probe:
    if name in PROBES:
        return PROBES[name]
    if name in tasks():
        return tasks()[name]
    raise ValueError(f"unknown probe {name!r} (known: {', '.join(PROBES)})")
