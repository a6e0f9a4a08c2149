"""NaN fingerprints: which conversion turned packed containers into the bits we observed?

Every way of pushing a bf16 NaN through float arithmetic leaves a signature — CUDA's
float->bfloat16 gives 0x7FFF for every NaN, CPU's keeps more of the sign and payload, a
half-precision detour differs again. The signatures are not taken from a table: each
candidate conversion is *performed* on the device under test, on every bf16 NaN bit
pattern, and the observed (original bits -> post bits) pairs are matched against what
each candidate actually did.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fsdpqdiag.evidence.bytes import all_nan_patterns, hex_bits


def _via(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(dtype).to(torch.bfloat16)


def _foreach_copy(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    torch._foreach_copy_([out], [x])
    return out


def _copy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).copy_(x)


CANDIDATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bf16->fp32->bf16": _via(torch.float32),
    "bf16->fp16->bf16": _via(torch.float16),
    "bf16->fp64->bf16": _via(torch.float64),
    "torch._foreach_copy_ (bf16)": _foreach_copy,
    "Tensor.copy_ (bf16)": _copy,
}


def signatures(device: str | torch.device = "cpu") -> dict[str, dict[int, int]]:
    """For each candidate, run on ``device``: NaN input bits -> output bits (16-bit, unsigned)."""
    payload = all_nan_patterns(torch.bfloat16, device)
    before = (payload.view(torch.int16).to(torch.int32) & 0xFFFF).cpu().tolist()
    found = {}
    for name, convert in CANDIDATES.items():
        after = (convert(payload).view(torch.int16).to(torch.int32) & 0xFFFF).cpu().tolist()
        found[name] = dict(zip(before, after))
    return found


def classify(comparison: dict, device: str | torch.device = "cpu") -> dict | None:
    """Fingerprint one ``bytes.diff`` result, or None when nothing differs.

    A candidate matches when it maps every sampled original NaN to the post bits seen and
    produces every post pattern of the histogram; candidates that leave NaNs untouched
    cannot match a change and are reported only as controls.
    """
    patterns = comparison.get("post_bit_patterns") or {}
    if not comparison.get("differing_elements"):
        return None
    observed = {
        int(s["original_bits"], 16): int(s["post_bits"], 16)
        for s in comparison.get("samples", [])
        if s.get("original_class") in ("qNaN", "sNaN")
    }
    classes = comparison.get("original_classes") or {}
    non_nan_changed = classes.get("finite", 0) + classes.get("inf", 0) > 0
    post = {int(p, 16) for p in patterns}
    matches, controls = [], {}
    for name, signature in signatures(device).items():
        changes = sum(1 for k, v in signature.items() if k != v)
        controls[name] = {
            "nan_patterns_changed": changes,
            "outputs": sorted({hex_bits(v, 16) for v in signature.values()})[:8],
        }
        if changes == 0 or non_nan_changed:
            continue
        produced = set(signature.values())
        if all(signature.get(k) == v for k, v in observed.items()) and post <= produced:
            matches.append(name)
    return {
        "kind": "single canonical pattern" if len(patterns) == 1 else "several patterns",
        "patterns": list(patterns),
        "only_nan_class_changed": not non_nan_changed,
        "matches": matches,
        "device": str(device),
        "candidates": controls,
    }
