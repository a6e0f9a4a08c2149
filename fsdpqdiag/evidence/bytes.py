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
# (#1945 saw ~1000 per 1M-element weight); beyond this only the positions' digest is kept.
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


_MASK64 = (1 << 64) - 1
_DIGEST_NAME = "mix64-sum"


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's constants. The shifts are torch's arithmetic ones: a logical shift would
# cost one more kernel each, and this is a fingerprint, not a cryptographic hash.
_MIX = tuple(_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def mix64(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer mixer on int64 values, wrapping modulo 2**64."""
    z = (x.to(torch.int64) + _MIX[0]) * _MIX[1]
    z = (z ^ (z >> 32)) * _MIX[2]
    return z ^ (z >> 29)


def positions_digest(positions: torch.Tensor) -> str:
    """A 64-bit digest of a set of element positions, computed where the positions live.

    The sum of ``mix64`` of each position, modulo 2**64: the same on every device and in
    every reduction order, so ranks, hosts and the standalone scripts can compare whole
    position sets without copying millions of indices to the host to hash them there.
    """
    return _digest_text(int(mix64(positions.reshape(-1)).sum()))


def _digest_text(total: int) -> str:
    return f"{_DIGEST_NAME}:{total & _MASK64:016x}"


def differing_positions(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Ascending indices where two flat integer tensors differ.

    The one full pass compares 8-byte words, so it reads both inputs once and writes a
    flag per word. The search then narrows in three steps that each look only at what
    the last one found: groups of eight words (the flags read as one int64), the words
    in those groups, the elements in those words.
    """
    ratio = 8 // before.element_size()
    span = 8 * ratio
    aligned = before.numel() - before.numel() % span
    try:
        words_before = before[:aligned].view(torch.int64)
        words_after = after[:aligned].view(torch.int64)
    except RuntimeError:  # storage offset not word-aligned: compare element by element
        return torch.nonzero(before != after).reshape(-1)
    word_flags = words_before != words_after
    groups = torch.nonzero(word_flags.view(torch.int64)).reshape(-1)
    rows, lanes = torch.nonzero(word_flags.view(-1, 8)[groups], as_tuple=True)
    words = groups[rows] * 8 + lanes
    elements_before = before[:aligned].view(-1, ratio)[words]
    elements_after = after[:aligned].view(-1, ratio)[words]
    rows, lanes = torch.nonzero(elements_before != elements_after, as_tuple=True)
    found = words[rows] * ratio + lanes
    if aligned == before.numel():
        return found
    tail = torch.nonzero(before[aligned:] != after[aligned:]).reshape(-1) + aligned
    return torch.cat([found, tail])


_CLASS_TABLES: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def _class_codes(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``classify_bits``; for 16-bit floats through a table of all 65536 containers (fewer kernels)."""
    layout = FLOAT_LAYOUTS.get(dtype)
    if layout is None or layout.bits != 16:
        return classify_bits(bits, layout)
    key = (dtype, str(bits.device))
    if key not in _CLASS_TABLES:
        every = torch.arange(1 << 16, dtype=torch.int32, device=bits.device).to(torch.int16)
        _CLASS_TABLES[key] = classify_bits(every, layout)
    return _CLASS_TABLES[key][bits.to(torch.int32) & 0xFFFF]


def _incomparable(original: torch.Tensor, observed: torch.Tensor) -> dict:
    return {
        "comparable": False,
        "reason": (
            f"original {str(original.dtype).removeprefix('torch.')}{list(original.shape)} vs "
            f"observed {str(observed.dtype).removeprefix('torch.')}{list(observed.shape)}"
        ),
        "bytes_equal": False,
    }


def _unchanged(elements: int, differing_elements: int) -> dict:
    """The evidence of a comparison before its differing elements are described."""
    return {
        "comparable": True,
        "bytes_equal": differing_elements == 0,
        "elements": elements,
        "differing_bytes": 0,
        "differing_elements": differing_elements,
        "original_classes": {},
        "post_bit_patterns": {},
        "samples": [],
        "positions": [],
        "positions_truncated": False,
        "positions_digest": _digest_text(0),
    }


def _to_host(parts: list[torch.Tensor]) -> list[list]:
    """``parts`` as host lists, in one copy: on a GPU each separate .tolist() is a
    synchronisation, and with every extra kernel launch it costs more than the comparison
    of a tensor of a few MiB."""
    host = torch.cat(parts).tolist()
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + part.numel())
    return [host[bounds[i] : bounds[i + 1]] for i in range(len(parts))]


def diff(original: torch.Tensor, observed: torch.Tensor, *, max_samples: int = MAX_SAMPLES) -> dict:
    """Compare two tensors container by container.

    Returns the evidence contract of a byte comparison: ``differing_bytes``,
    ``differing_elements``, ``original_classes`` (class of each differing element before),
    ``post_bit_patterns`` (histogram of the differing elements' new bits), ``samples``, the
    first ``MAX_POSITIONS`` differing positions and a digest of all of them. A change of
    dtype or shape is itself a finding and is reported as ``comparable: false`` with both
    descriptions.
    """
    original = plain(original)
    observed = plain(observed).to(original.device)
    if original.dtype != observed.dtype or original.numel() != observed.numel():
        return _incomparable(original, observed)
    width_bits = original.element_size() * 8
    before = element_bits(original)
    after = element_bits(observed)
    # One full pass finds the differing elements; everything else looks at those only.
    positions = differing_positions(before, after)
    differing_elements = int(positions.numel())
    evidence = _unchanged(int(before.numel()), differing_elements)
    if not differing_elements:
        return evidence
    before_bits, after_bits = before[positions], after[positions]
    codes = _class_codes(before_bits, original.dtype)
    patterns, pattern_counts = torch.unique(after_bits, return_counts=True)
    class_ids = torch.arange(len(CLASS_NAMES), dtype=codes.dtype, device=codes.device)
    # Everything small goes to the host in one copy (see _to_host).
    parts = [
        ((before_bits ^ after_bits).view(torch.uint8) != 0).sum().reshape(1),
        mix64(positions).sum().reshape(1),
        (codes.unsqueeze(1) == class_ids).sum(0),
        patterns,
        pattern_counts,
        positions[:max_samples],
        before_bits[:max_samples],
        after_bits[:max_samples],
        codes[:max_samples],
        positions[max_samples:MAX_POSITIONS],
    ]
    (
        (differing_bytes,),
        (digest,),
        class_tallies,
        pattern_values,
        pattern_tallies,
        sample_positions,
        sample_before,
        sample_after,
        sample_codes,
        further_positions,
    ) = _to_host(parts)
    evidence.update(
        differing_bytes=differing_bytes,
        original_classes=dict(zip(CLASS_NAMES, class_tallies)),
        post_bit_patterns={
            hex_bits(p, width_bits): c
            for p, c in sorted(zip(pattern_values, pattern_tallies), key=lambda pc: -pc[1])
        },
        samples=[
            {
                "index": index,
                "original_bits": hex_bits(b, width_bits),
                "original_class": CLASS_NAMES[c],
                "post_bits": hex_bits(a, width_bits),
            }
            for index, b, c, a in zip(sample_positions, sample_before, sample_codes, sample_after)
        ],
        positions=(sample_positions + further_positions)[:MAX_POSITIONS],
        positions_truncated=differing_elements > MAX_POSITIONS,
        positions_digest=_digest_text(digest),
    )
    return evidence


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
    # Bits differ whenever the dtype does: FSDP2's param_dtype (with cast_forward_inputs)
    # decides the output dtype, so an fp16 policy over a bf16 layer gives fp16 outputs of
    # equal value. Value equality says whether the output moved at all.
    value_equal = bit_equal or (
        reference.shape == observed.shape and nonfinite == 0 and not bool((delta != 0).any())
    )
    return {
        "output_bit_equal": bit_equal,
        "output_value_equal": value_equal,
        "reference_dtype": str(reference.dtype).removeprefix("torch."),
        "observed_dtype": str(observed.dtype).removeprefix("torch."),
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
