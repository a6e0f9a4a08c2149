"""Byte-level forensics: pure, vectorized tensor functions used by every probe.

Packed 4-bit weights stored in a float dtype (``quant_storage=bfloat16``) are not numbers:
each 16-bit container holds four NF4 indices. About 0.1 % of those containers happen to
spell an IEEE NaN, and any code path that treats them as floats may rewrite them (quiet
the sNaN, clear the payload, drop the sign). These helpers compare containers bit for bit
and describe what changed, on whatever device the tensors live on, without Python loops
over elements.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MAX_SAMPLES = 16
# Enough positions to compare two hosts element by element for any realistic corruption
# (#1945 saw ~1000 per 1M-element weight); beyond this only the positions' hash is kept.
MAX_POSITIONS = 8192

CLASS_NAMES = ("finite", "inf", "qNaN", "sNaN")


@dataclass(frozen=True)
class FloatLayout:
    bits: int
    exponent_mask: int
    mantissa_mask: int
    quiet_bit: int


FLOAT_LAYOUTS: dict[torch.dtype, FloatLayout] = {
    torch.bfloat16: FloatLayout(16, 0x7F80, 0x007F, 0x0040),
    torch.float16: FloatLayout(16, 0x7C00, 0x03FF, 0x0200),
    torch.float32: FloatLayout(32, 0x7F800000, 0x007FFFFF, 0x00400000),
}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached plain ``torch.Tensor`` over the same storage.

    Params4bit and other subclasses intercept ops through ``__torch_function__``; byte
    forensics must see the storage itself, not what a subclass makes of it.
    """
    tensor = tensor.detach()
    local = getattr(tensor, "_local_tensor", None)
    if local is not None:
        tensor = local.detach()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)
    return tensor


def element_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Flat integer view of each element's bits (signed container, same width)."""
    tensor = plain(tensor).contiguous().reshape(-1)
    return tensor.view(_INT_VIEW[tensor.element_size()])


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return plain(tensor).contiguous().reshape(-1).view(torch.uint8)


def classify(tensor: torch.Tensor) -> torch.Tensor:
    """Class code per element: 0 finite, 1 inf, 2 qNaN, 3 sNaN (integers are all 0)."""
    tensor = plain(tensor)
    return classify_bits(element_bits(tensor), FLOAT_LAYOUTS.get(tensor.dtype))


def classify_bits(bits: torch.Tensor, layout: FloatLayout | None) -> torch.Tensor:
    """``classify`` on raw element bits, so a diff classifies only the elements that differ."""
    if layout is None:
        return torch.zeros(bits.shape, dtype=torch.int8, device=bits.device)
    exponent_all_ones = (bits & layout.exponent_mask) == layout.exponent_mask
    mantissa_zero = (bits & layout.mantissa_mask) == 0
    quiet = (bits & layout.quiet_bit) != 0
    special = torch.where(mantissa_zero, 1, torch.where(quiet, 2, 3))
    return torch.where(exponent_all_ones, special, 0).to(torch.int8)


def _class_counts(codes: torch.Tensor, *, skip_finite: bool) -> dict[str, int]:
    counts = torch.bincount(codes.to(torch.int64), minlength=len(CLASS_NAMES)).tolist()
    return {
        name: int(count) for name, count in zip(CLASS_NAMES, counts) if not (skip_finite and name == "finite")
    }


def hex_bits(value: int, width_bits: int) -> str:
    mask = (1 << width_bits) - 1
    return f"0x{value & mask:0{width_bits // 4}x}"


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(raw_bytes(tensor).cpu().numpy().tobytes()).hexdigest()


def nan_census(tensor: torch.Tensor) -> dict:
    """How many elements of packed storage read as NaN or inf when taken as floats."""
    codes = classify(tensor)
    classes = _class_counts(codes, skip_finite=True)
    return {
        "elements": int(codes.numel()),
        "dtype": str(plain(tensor).dtype).removeprefix("torch."),
        "nan_elements": classes["qNaN"] + classes["sNaN"],
        "original_classes": classes,
        "sha256": sha256(tensor),
    }


def diff(original: torch.Tensor, observed: torch.Tensor, *, max_samples: int = MAX_SAMPLES) -> dict:
    """Compare two tensors container by container.

    Returns the evidence contract of a byte comparison: ``differing_bytes``,
    ``differing_elements``, ``original_classes`` (class of each differing element before),
    ``post_bit_patterns`` (histogram of the differing elements' new bits), ``samples`` and
    the differing positions. A change of dtype or shape is itself a finding and is reported
    as ``comparable: false`` with both descriptions.
    """
    original = plain(original)
    observed = plain(observed).to(original.device)
    if original.dtype != observed.dtype or original.numel() != observed.numel():
        return {
            "comparable": False,
            "reason": (
                f"original {str(original.dtype).removeprefix('torch.')}{list(original.shape)} vs "
                f"observed {str(observed.dtype).removeprefix('torch.')}{list(observed.shape)}"
            ),
            "bytes_equal": False,
        }
    width_bits = original.element_size() * 8
    before = element_bits(original)
    after = element_bits(observed)
    # One full pass finds the differing elements; everything else looks at those only.
    positions = torch.nonzero(before != after).reshape(-1)
    differing_elements = int(positions.numel())
    changed_bits = before[positions] ^ after[positions]
    differing_bytes = int((changed_bits.view(torch.uint8) != 0).sum())
    codes = classify_bits(before[positions], FLOAT_LAYOUTS.get(original.dtype))
    patterns, pattern_counts = torch.unique(after[positions], return_counts=True)
    post_bit_patterns = {
        hex_bits(int(p), width_bits): int(c)
        for p, c in sorted(zip(patterns.tolist(), pattern_counts.tolist()), key=lambda pc: -pc[1])
    }
    sample_positions = positions[:max_samples].tolist()
    sample_before = before[positions[:max_samples]].tolist()
    sample_after = after[positions[:max_samples]].tolist()
    sample_codes = codes[:max_samples].tolist()
    samples = [
        {
            "index": int(index),
            "original_bits": hex_bits(b, width_bits),
            "original_class": CLASS_NAMES[c],
            "post_bits": hex_bits(a, width_bits),
        }
        for index, b, c, a in zip(sample_positions, sample_before, sample_codes, sample_after)
    ]
    position_list = positions.to(torch.int64).cpu()
    return {
        "comparable": True,
        "bytes_equal": differing_elements == 0,
        "elements": int(before.numel()),
        "differing_bytes": differing_bytes,
        "differing_elements": differing_elements,
        "original_classes": _class_counts(codes, skip_finite=False) if differing_elements else {},
        "post_bit_patterns": post_bit_patterns,
        "samples": samples,
        "positions": position_list[:MAX_POSITIONS].tolist(),
        "positions_truncated": differing_elements > MAX_POSITIONS,
        "positions_sha256": hashlib.sha256(position_list.numpy().tobytes()).hexdigest(),
    }


def output_delta(reference: torch.Tensor, observed: torch.Tensor) -> dict:
    """How far a module's output moved: max/mean |delta| in fp32 and exact bit equality."""
    reference = plain(reference)
    observed = plain(observed).to(reference.device)
    bit_equal = reference.dtype == observed.dtype and bool(
        torch.equal(raw_bytes(reference), raw_bytes(observed))
    )
    delta = (observed.float() - reference.float()).abs()
    nonfinite = int((~torch.isfinite(delta)).sum())
    finite = delta[torch.isfinite(delta)]
    return {
        "output_bit_equal": bit_equal,
        "max_abs_delta": float(finite.max()) if finite.numel() else None,
        "mean_abs_delta": float(finite.mean()) if finite.numel() else None,
        "nonfinite_delta_elements": nonfinite,
        "reference_sum": float(reference.float().sum()),
        "observed_sum": float(observed.float().sum()),
    }


def all_nan_patterns(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """Every NaN bit pattern of a 16-bit float dtype (both signs), as a tensor of that dtype.

    Used as the payload of positive controls: a byte-true path must return it unchanged.
    """
    layout = FLOAT_LAYOUTS[dtype]
    if layout.bits != 16:
        raise ValueError("all_nan_patterns enumerates 16-bit float dtypes only")
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32, device=device).to(torch.int16)
    nan = ((every & layout.exponent_mask) == layout.exponent_mask) & ((every & layout.mantissa_mask) != 0)
    return every[nan].view(dtype)
