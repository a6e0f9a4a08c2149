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

Imports triton at module level: ``verify`` imports it where Triton is installed and takes
torch's path where it is not.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fsdpqdiag.evidence.bytes import _MIX
from fsdpqdiag.weightguard.digest import _ROW_SALT, MASK32

# Weights per launch: a unit with more is digested in several launches of at most this many.
SLOTS = 8
# Words per program: 16 KiB of a weight.
BLOCK = 4096
# A unit's layout row (int64): words, log2 of the row width (``digest.row_width`` is always a
# power of two: shifts, not 64-bit divisions, per word), first program of each slot; then, after
# ``3 * SLOTS``, each slot's index in the guard's expected/mismatch vectors (-1: unused) and
# the launch's program count; padded to 16 bytes, as every unit's row starts aligned alike.
LAYOUT = 4 * SLOTS + 2
# A unit's counters (int32): each slot's running total, then the finished-programs counter;
# padded to 16 bytes.
COUNTERS = SLOTS + 4

# ``mix64``'s constants (signed 64-bit) and the row salt: the factors ``digest`` defines.
MIX0 = tl.constexpr(_MIX[0])
MIX1 = tl.constexpr(_MIX[1])
MIX2 = tl.constexpr(_MIX[2])
ROW_SALT = tl.constexpr(_ROW_SALT)
LOW32 = tl.constexpr(MASK32)


@triton.jit
def _odd31(x):
    """``digest._odd31``: bits 16..46 of ``mix64(x)``, made odd (arithmetic shifts, as torch's)."""
    z = (x + MIX0) * MIX1
    z = (z ^ (z >> 32)) * MIX2
    z = z ^ (z >> 29)
    return ((z >> 16) & 0x7FFFFFFF) | 1


# Addresses change at every unshard, and each unit has its own layout and counters: one
# compiled kernel whatever their alignment, which ``Launcher``'s direct launches rely on.
@triton.jit(
    do_not_specialize=["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"],
    do_not_specialize_on_alignment=["layout", "counters", "expected", "mismatches"],
)
def _unit_digest_kernel(
    a0, a1, a2, a3, a4, a5, a6, a7, layout, counters, expected, mismatches, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    slots = tl.arange(0, 8)
    firsts = tl.load(layout + 2 * 8 + slots)
    slot = tl.sum((firsts <= pid).to(tl.int32), axis=0) - 1
    words = tl.load(layout + slot)
    shift = tl.load(layout + 8 + slot)  # a row is 2**shift words
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
    values = tl.load(base + offsets, mask=inside, other=0).to(tl.uint32, bitcast=True)
    # uint32 products and sums wrap modulo 2**32, as the digest is defined; outside the weight
    # the word is 0 and adds nothing.
    columns = _odd31(offsets & ((1 << shift) - 1)).to(tl.uint32)
    rows = _odd31((offsets >> shift) + ROW_SALT).to(tl.uint32)
    partial = tl.sum(values * columns * rows, axis=0)
    tl.atomic_add(counters + slot, partial.to(tl.int32, bitcast=True))
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
    shifts = [width.bit_length() - 1 for width in widths]
    if any(1 << shift != width for shift, width in zip(shifts, widths)):
        raise ValueError(f"row widths must be powers of two, got {widths}")
    row = [*words, *[0] * unused, *shifts, *[0] * unused, *firsts, *[programs] * unused]
    return [*row, *positions, *[-1] * unused, programs, 0], programs


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: None, or a chain of hooks with none in it, is not."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Launcher:
    """Launches the kernel on the current stream: through Triton's JIT the first time (which
    compiles it), then straight through the compiled kernel's launcher. The JIT's per-call
    argument binding, specialization and cache lookup cost more host time than everything else
    the guard does per unit; with one compiled variant (no specialization on the arguments)
    they decide nothing after the first call. Back to the JIT for good if the compiled kernel's
    interface is not the one expected, and whenever a launch hook (a profiler) is set."""

    def __init__(self):
        self.direct = True
        self.device_index = None
        self.direct_launches = 0
        # Resolved once, as the JIT resolves them at every call: Triton's launch hooks (None: an
        # older Triton, which has no direct path here), and after the first launch the compiled
        # kernel's launcher, function, metadata and the current-stream getter.
        self.runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
        self.run = self.function = self.metadata = self.stream_of = None

    def __call__(self, addresses: list[int], programs: int, layout, counters, expected, mismatches) -> None:
        """Digest the weights at ``addresses`` (raw, 4-byte aligned, contiguous)."""
        padded = addresses + [addresses[0]] * (SLOTS - len(addresses))
        run, runtime = self.run, self.runtime
        if run is not None and not (_hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)):
            try:
                run(
                    programs, 1, 1, self.stream_of(self.device_index), self.function, self.metadata,
                    None, None, None, *padded, layout, counters, expected, mismatches, BLOCK,
                )  # fmt: skip
                self.direct_launches += 1
                return
            except (TypeError, AttributeError, ValueError):  # another Triton's interface
                self.run, self.direct = None, False
        kernel = _unit_digest_kernel[(programs,)](
            *padded, layout, counters, expected, mismatches, BLOCK=BLOCK
        )
        if self.direct and run is None and runtime is not None:
            try:
                self.run, self.function = kernel.run, kernel.function
                self.metadata = kernel.packed_metadata
                self.stream_of = triton.runtime.driver.active.get_current_stream
            except AttributeError:  # another Triton's compiled kernel: the JIT, always
                self.run, self.direct = None, False
                return
            self.device_index = layout.device.index
