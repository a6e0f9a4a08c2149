"""One Triton kernel per FSDP unit per unshard: the word digest of up to ``SLOTS`` weights at once.

The guard's cost on a GPU is not the bytes (a pass over every packed weight of a 1.1B model is
about 0.1 ms of an H200's bandwidth) but the launches and the Python per weight: four kernels and
a few views each. This kernel takes the raw addresses of a unit's unsharded weights and, in one
launch, computes each one's word digest (``digest.word_digest``, the same number bit for bit),
compares it with the expected one and counts a mismatch into a per-weight counter on the device.
Nothing comes back to the host inside the step: the counters are copied once per optimizer step.

The multipliers are computed from each word's index (``mix64`` of its column and of its row,
made odd), not read from a table, so nothing grows with the model. Each program digests
``BLOCK`` words of one weight and adds its partial sum (modulo 2**32) into the weight's total
with an atomic add; the last program of the launch (a counter every program increments) reads
the totals, compares them, resets them and the counter to zero for the next launch. Integer
sums modulo 2**32 do not depend on the order of the atomics: the result is deterministic.

Imports triton at module level: import it only where ``available()`` says so.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Weights per launch: a unit with more is digested in several launches of at most this many.
SLOTS = 8
# Words per program: 16 KiB of a weight.
BLOCK = 4096
# A unit's layout row (int64): words, row width, first program of each slot; then, after
# ``3 * SLOTS``, each slot's index in the guard's expected/mismatch vectors (-1: unused) and
# the launch's program count.
LAYOUT = 4 * SLOTS + 1
# A unit's counters (int32): each slot's running total, then the finished-programs counter.
COUNTERS = SLOTS + 1

# ``fsdpqdiag.evidence.bytes.mix64``'s constants as signed 64-bit integers, and the row salt.
MIX0 = tl.constexpr(-7046029254386353131)
MIX1 = tl.constexpr(-4658895280553007687)
MIX2 = tl.constexpr(-7723592293110705685)
ROW_SALT = tl.constexpr(1 << 40)
LOW32 = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _odd31(x):
    """``digest._odd31``: bits 16..46 of ``mix64(x)``, made odd (arithmetic shifts, as torch's)."""
    z = (x + MIX0) * MIX1
    z = (z ^ (z >> 32)) * MIX2
    z = z ^ (z >> 29)
    return ((z >> 16) & 0x7FFFFFFF) | 1


# Addresses change at every unshard: one compiled kernel whatever their alignment.
@triton.jit(do_not_specialize=["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"])
def _unit_digest_kernel(
    a0, a1, a2, a3, a4, a5, a6, a7, layout, counters, expected, mismatches, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    slots = tl.arange(0, 8)
    firsts = tl.load(layout + 2 * 8 + slots)
    slot = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    words = tl.load(layout + slot)
    width = tl.load(layout + 8 + slot)
    first = tl.load(layout + 2 * 8 + slot)
    address = tl.where(slot == 1, a1, a0)
    address = tl.where(slot == 2, a2, address)
    address = tl.where(slot == 3, a3, address)
    address = tl.where(slot == 4, a4, address)
    address = tl.where(slot == 5, a5, address)
    address = tl.where(slot == 6, a6, address)
    address = tl.where(slot == 7, a7, address)
    base = address.to(tl.pointer_type(tl.int32))
    offsets = (pid - first).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = offsets < words
    values = tl.load(base + offsets, mask=inside, other=0).to(tl.int64)
    # |word| < 2**31 and both factors < 2**31: every product below fits an int64 before the mask.
    product = (values * _odd31(offsets % width)) & LOW32
    product = (product * _odd31(offsets // width + ROW_SALT)) & LOW32
    partial = tl.sum(tl.where(inside, product, 0), axis=0) & LOW32
    tl.atomic_add(counters + slot, partial.to(tl.int32))
    finished = tl.atomic_add(counters + 8, 1)
    if finished == tl.load(layout + 4 * 8) - 1:  # the last program: every partial is in
        for index in tl.static_range(8):
            total = tl.atomic_xchg(counters + index, 0)
            position = tl.load(layout + 3 * 8 + index)
            if position >= 0:
                differs = (total.to(tl.int64) & LOW32) != tl.load(expected + position)
                tl.atomic_add(mismatches + position, differs.to(tl.int32))
        tl.atomic_xchg(counters + 8, 0)


def layout_row(words: list[int], widths: list[int], positions: list[int]) -> tuple[list[int], int]:
    """A unit's layout row (see ``LAYOUT``) and its program count, for ``len(words) <= SLOTS``."""
    firsts, programs = [], 0
    for count in words:
        firsts.append(programs)
        programs += -(-count // BLOCK)
    unused = SLOTS - len(words)
    row = [*words, *[0] * unused, *widths, *[1] * unused, *firsts, *[programs] * unused]
    return [*row, *positions, *[-1] * unused, programs], programs


def launch(addresses: list[int], programs: int, layout, counters, expected, mismatches) -> None:
    """Digest the weights at ``addresses`` (raw, 4-byte aligned, contiguous) on the current stream."""
    padded = addresses + [addresses[0]] * (SLOTS - len(addresses))
    _unit_digest_kernel[(programs,)](*padded, layout, counters, expected, mismatches, BLOCK=BLOCK)
