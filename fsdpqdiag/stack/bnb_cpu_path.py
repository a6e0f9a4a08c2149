"""Which bitsandbytes kernel path a ``Linear4bit`` takes on the CPU, and a switch for it.

On a CPU with AVX512-BF16 (bitsandbytes' native ``has_avx512bf16_cpu()``),
``Linear4bit.forward`` in inference (module not training, input without grad) rewrites
``self.weight.data`` in place into a CPU-blocked layout (``_convert_weight_packed_for_cpu``,
which asserts out_features % 32 == 0), marks its ``QuantState`` ``packing_format_for_cpu``
and computes with another kernel; elsewhere it dequantizes. Each layer reads the choice once,
at construction, into its ``support_avx512bf16_for_cpu`` attribute. ``envvars.BNB_CPU_REPACK``
(``on``/``off``) overrides it on every layer this tool builds, so that both paths run on any
CPU: the tests take the repack path on machines without AVX512-BF16 this way. Forced on
where the CPU lacks AVX512-BF16, the repacked weight is computed by bitsandbytes' default
kernel, so outputs are only comparable with other runs on the same path.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from fsdpqdiag import envvars

ENV = envvars.BNB_CPU_REPACK
CHOICES = {"on": True, "off": False}


def override() -> bool | None:
    """The forced choice, or None where bitsandbytes decides (the variable unset or empty)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)} (or unset)")
    return CHOICES[value]


def cpu_has_avx512_bf16() -> bool | None:
    """bitsandbytes' own answer, or None where bitsandbytes does not import."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # noqa: BLE001 - a broken install is recorded elsewhere
        return None
    return bool(has_avx512bf16())


def describe() -> dict[str, Any]:
    """The CPU path for the report's env: what the CPU offers, what the layers will do."""
    native = cpu_has_avx512_bf16()
    forced = override()
    repack = native if forced is None else forced
    return {
        "avx512_bf16": native,
        "override": None if forced is None else os.environ[ENV].strip().lower(),
        "inference_repacks_weight": repack,
        "path": "cpu-avx512bf16-repack" if repack else "cpu-dequantize",
        "kernels_package": importlib.util.find_spec("kernels") is not None,
    }


def apply(module) -> int:
    """Set the overridden path on every ``Linear4bit`` in ``module``; how many were set."""
    forced = override()
    if forced is None:
        return 0
    count = 0
    for layer in module.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = forced
            count += 1
    return count


def repacked(module) -> list[str]:
    """Names of the layers whose weight bitsandbytes has rewritten into the CPU layout."""
    names = []
    for name, layer in module.named_modules():
        weight = getattr(layer, "weight", None)
        states = (getattr(layer, "quant_state", None), getattr(weight, "quant_state", None))
        if any(getattr(state, "packing_format_for_cpu", False) for state in states):
            names.append(name)
    return names
