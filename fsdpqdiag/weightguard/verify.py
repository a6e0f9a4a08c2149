"""The guard's hot path: one check per FSDP unit per unshard, no host sync inside a step.

A forward pre-hook on each FSDP unit runs after FSDP2's own (``fully_shard`` prepends its
pre-forward hook, which unshards the unit), so every guarded weight of the unit is then the
tensor its module's forward receives. What a check costs is launches and Python per weight, not
bytes, so each device gets the path with the fewest of them:

- a GPU with Triton: one kernel per unit (``fused``) digests every weight of the unit from its
  raw address, compares and counts a mismatch per weight on the device;
- a GPU without Triton, or a weight the kernel cannot take (not contiguous, not whole 4-byte
  words): the word digest in torch ops, compared and counted on the device the same way;
- a CPU: the word digest in numpy (a multiply and a row sum that wrap modulo 2**32, with no
  per-call allocation), compared at once.

On a GPU the mismatch counts are copied to the host without waiting, once per optimizer step,
and read once the copy has landed. Only a weight whose digest differs costs more: localization,
at once on a CPU, at its next unshard on a GPU (the bytes of the unshard that differed are gone).

``legacy``: the old per-weight path, a hook on every guarded module and the per-element digest
with its table of one multiplier per element of the largest weight; kept to measure against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fsdpqdiag.weightguard.digest import (
    CHUNK,
    MASK32,
    column_factors,
    digest,
    digest_words,
    factor_bytes,
    host_factors,
    host_rows_digest,
    host_words,
    multipliers,
    received_words,
    row_factors,
    rows_digest,
    signed,
    word_digest,
    word_dtype,
)
from fsdpqdiag.weightguard.params import GuardedParam

# Copies of the GPU's mismatch counts that may be in flight at once, one per optimizer step.
RING = 4


@dataclass
class UnitCheck:
    """The guarded weights one hook verifies: an FSDP unit's (a module's, ``legacy``), where each
    sits in the guard's expected and mismatch vectors, and (``fused``) its kernel launches'
    layouts and counters, one per ``fused.SLOTS`` weights."""

    module: Any
    entries: list[GuardedParam]
    positions: list[int] = field(default_factory=list)
    launches: list[tuple[list[int], int, Any, Any]] = field(default_factory=list)
    # The entries no launch takes (not whole 4-byte words): torch's path at every check.
    unlaunched: list[int] = field(default_factory=list)


def units(entries: list[GuardedParam], legacy: bool) -> list[UnitCheck]:
    grouped: dict[int, UnitCheck] = {}
    for position, entry in enumerate(entries):
        owner = entry.module if legacy else entry.unit
        unit = grouped.setdefault(id(owner), UnitCheck(owner, []))
        unit.entries.append(entry)
        unit.positions.append(position)
    return list(grouped.values())


def expected(entry: GuardedParam, legacy: bool) -> int:
    """What ``observe``'s value must be, as the device computes it (masked, signed)."""
    return signed(entry.expected_legacy) if legacy else entry.expected


def mask(legacy: bool) -> int:
    """What of the device's int64 digest counts: the low 32 bits of the word digest; all 64 of
    the per-element one (-1: every bit set, as an int64 takes it)."""
    return -1 if legacy else MASK32


def _word_count(entry: GuardedParam, legacy: bool) -> int:
    if legacy:
        return entry.numel * (2 if entry.torch_dtype.itemsize == 8 else 1)
    return entry.numel * entry.torch_dtype.itemsize // 4


def _whole_rows(entry: GuardedParam) -> bool:
    return (entry.numel * entry.torch_dtype.itemsize) % (4 * entry.width) == 0


class Checks:
    """What every verification needs, prepared once (``prepare``), and on a GPU the device's
    expected digests, its mismatch counts and their copies to the host in flight."""

    def __init__(self, entries: list[GuardedParam], legacy: bool):
        import torch

        self.entries, self.legacy, self.mask = entries, legacy, mask(legacy)
        self.units = units(entries, legacy)
        device = entries[0].fsdp_param.sharded_param.device if entries else torch.device("cpu")
        self.on_gpu = device.type == "cuda"
        self.kernel = _fused_module() if self.on_gpu and not legacy else None
        self.launch = self.kernel.Launcher() if self.kernel else None
        # Which hot path the hooks take: named in the benchmark's output.
        self.path = (
            "per-weight" if legacy else "triton" if self.kernel else "torch" if self.on_gpu else "numpy"
        )
        self.expected = self.mismatches = None
        # GPU: the copies of the mismatch counts still in flight (step, ring slot), the ring of
        # pinned buffers and events they land in, and the counts last landed. The device's
        # counts only grow: a weight whose count grew between two copies differed in between.
        self.in_flight: list[tuple[int, int]] = []
        self.dirty = False
        state_bytes = 0
        if self.on_gpu:
            values = [expected(entry, legacy) for entry in entries]
            self.expected = torch.tensor(values, dtype=torch.int64, device=device)
            self.mismatches = torch.zeros(len(entries), dtype=torch.int32, device=device)
            # Pinned: a copy to pageable host memory would wait for the GPU.
            self.landing = [
                torch.zeros(len(entries), dtype=torch.int32, pin_memory=True) for _ in range(RING)
            ]
            self.landed_events = [torch.cuda.Event() for _ in range(RING)]
            self.landed = [0] * len(entries)
            self.free = list(range(RING))
            state_bytes = 12 * len(entries) + 4 * RING * len(entries)
        if self.kernel is not None:
            state_bytes += self._lay_out_launches(device)
        self.resident_bytes = state_bytes + _prepare_digests(entries, legacy, self.on_gpu)

    def _lay_out_launches(self, device) -> int:
        """Each unit's kernel launches: weights of whole 4-byte words, ``SLOTS`` at a time."""
        import torch

        fused = self.kernel
        launches = []
        for unit in self.units:
            fits = [i for i, e in enumerate(unit.entries) if (e.numel * e.torch_dtype.itemsize) % 4 == 0]
            unit.unlaunched = [i for i in range(len(unit.entries)) if i not in fits]
            for begin in range(0, len(fits), fused.SLOTS):
                chosen = fits[begin : begin + fused.SLOTS]
                members = [unit.entries[i] for i in chosen]
                row, programs = fused.layout_row(
                    [_word_count(e, False) for e in members],
                    [e.width for e in members],
                    [unit.positions[i] for i in chosen],
                )
                launches.append((unit, chosen, programs, row))
        if not launches:
            return 0
        layouts = torch.tensor([row for *_, row in launches], dtype=torch.int64, device=device)
        counters = torch.zeros(len(launches), fused.COUNTERS, dtype=torch.int32, device=device)
        for index, (unit, chosen, programs, _) in enumerate(launches):
            unit.launches.append((chosen, programs, layouts[index], counters[index]))
        return layouts.numel() * 8 + counters.numel() * 4

    def refresh(self) -> None:
        """After the trainable weights' set-up digests changed: the device's expected ones too."""
        if self.expected is not None:
            import torch

            values = [expected(entry, self.legacy) for entry in self.entries]
            self.expected.copy_(torch.tensor(values, dtype=torch.int64))

    def run(self, unit: UnitCheck, tensors: list) -> list[GuardedParam]:
        """Check what ``unit``'s forward receives (``tensors``: one per entry of the unit, in
        order, None where nothing is to be checked); returns the entries whose digest differs
        now (a CPU's), none on a GPU (counted there)."""
        entries = unit.entries
        if not self.on_gpu:
            if self.legacy:
                return [
                    e for e, t in zip(entries, tensors)
                    if t is not None and int(observe(e, t, True)) != expected(e, True)
                ]  # fmt: skip
            return [e for e, t in zip(entries, tensors) if t is not None and observe_host(e, t) != e.expected]
        self.dirty = True
        if unit.launches:
            rest = self._launch(unit, tensors)
        else:
            rest = [(i, t) for i, t in enumerate(tensors) if t is not None]
        if rest:
            self._count_on_device(unit, rest)
        return []

    def _launch(self, unit: UnitCheck, tensors: list) -> list:
        """The fused kernel over each launch whose weights all came, contiguous and aligned;
        returns ``(index, tensor)`` of those left to torch's path (none, commonly)."""
        skipped = []
        for chosen, programs, layout, counters in unit.launches:
            addresses = []
            for i in chosen:
                tensor = tensors[i]
                if tensor is None or not tensor.is_contiguous():
                    break
                address = tensor.data_ptr()
                if address & 3:
                    break
                addresses.append(address)
            else:
                try:
                    self.launch(addresses, programs, layout, counters, self.expected, self.mismatches)
                except Exception as exc:  # noqa: BLE001 - a Triton that cannot compile here: torch's path
                    self._without_kernel(exc)
                    return [(i, t) for i, t in enumerate(tensors) if t is not None]
                continue
            skipped += chosen
        left = unit.unlaunched + skipped if skipped else unit.unlaunched
        return [(i, tensors[i]) for i in left if tensors[i] is not None] if left else []

    def _without_kernel(self, exc: Exception) -> None:
        self.kernel = self.launch = None
        self.path = f"torch (the fused kernel failed: {type(exc).__name__}: {exc})"[:300]
        for unit in self.units:
            unit.launches, unit.unlaunched = [], []

    def _count_on_device(self, unit: UnitCheck, rest) -> None:
        """The torch path: each weight's digest compared with its expected one on the device."""
        import torch

        for index, tensor in rest:
            position = unit.positions[index]
            value = observe(unit.entries[index], tensor, self.legacy)
            if self.mask != -1:
                value = value.bitwise_and(self.mask)
            differs = torch.ne(value, self.expected[position : position + 1])
            self.mismatches[position : position + 1].add_(differs)

    def differs(self, tensors: list) -> list[GuardedParam]:
        """The entries whose ``tensors`` (one each, in order) the hooks would find altered, at
        once: on a GPU this waits for the device."""
        position = {id(entry): index for index, entry in enumerate(self.entries)}
        found = []
        for unit in self.units:
            found += self.run(unit, [tensors[position[id(e)]] for e in unit.entries])
        return found + [entry for entry, _ in self.collect(0, block=True)]

    def collect(self, step: int, block: bool) -> list[tuple[GuardedParam, int]]:
        """GPU: copy the mismatch counts of ``step``'s checks to the host without waiting, and
        return the entries (and steps) whose counts grew in the copies that have landed (all of
        them: ``block``). Per step: one copy and one event record, no allocation, no sync while
        a ring slot is free (the GPU is then ``RING`` optimizer steps behind the host)."""
        if self.mismatches is None:
            return []
        found = []
        if self.dirty:
            if not self.free:  # every slot in flight: wait for the oldest
                found += self._land(*self.in_flight.pop(0), block=True)
            slot = self.free.pop()
            self.landing[slot].copy_(self.mismatches, non_blocking=True)
            self.landed_events[slot].record()
            self.in_flight.append((step, slot))
            self.dirty = False
        while self.in_flight:
            checked_step, slot = self.in_flight[0]
            if not (block or self.landed_events[slot].query()):
                break
            self.in_flight.pop(0)
            found += self._land(checked_step, slot, block)
        return found

    def _land(self, step: int, slot: int, block: bool) -> list[tuple[GuardedParam, int]]:
        """Read a landed copy: the entries whose count grew since the last one read."""
        if block:
            self.landed_events[slot].synchronize()
        self.free.append(slot)
        counts = self.landing[slot].tolist()
        if counts == self.landed:
            return []
        grew = [(e, step) for e, now, before in zip(self.entries, counts, self.landed) if now != before]
        self.landed = counts
        return grew


def single(reference, name: str = "weight") -> Checks:
    """The hot path over one tensor outside any model, expecting ``reference``'s bytes: what the
    guard's hook would conclude on this device, for benchmarks and tests (``Checks.differs``)."""
    from fsdpqdiag.weightguard.digest import raw_bytes, row_width

    entry = GuardedParam(
        name=name, module_name="", module=None, unit=None, param_name=name,
        fsdp_param=SimpleNamespace(sharded_param=reference), kind="tensor", trainable=False,
        cast_dtype=None, group=None, numel=reference.numel(),
    )  # fmt: skip
    entry.torch_dtype, entry.dtype = reference.dtype, str(reference.dtype).removeprefix("torch.")
    entry.width = row_width(reference.numel() * reference.element_size())
    entry.expected = int(word_digest(raw_bytes(reference).cpu(), 0, entry.width)) & MASK32
    return Checks([entry], legacy=False)


def _fused_module():
    """``fused`` where Triton imports (a GPU), else None: the torch path."""
    try:
        from fsdpqdiag.weightguard import fused
    except ImportError:
        return None
    return fused


def _prepare_digests(entries: list[GuardedParam], legacy: bool, on_gpu: bool) -> int:
    """Each entry's precomputed pieces for the torch (GPU) and numpy (CPU) paths, and the bytes
    they keep resident: the digest's factors (one set per device, views of it per weight) and on
    a CPU one scratch for the products. No scratch on a GPU: the caching allocator hands a freed
    block back as cheaply and keeps it stream-safe, which one shared buffer would not be."""
    if not entries:
        return 0
    device = entries[0].fsdp_param.sharded_param.device
    largest = max(_word_count(entry, legacy) for entry in entries)
    if legacy:
        table = multipliers(largest, device)
        scratch = None if on_gpu else _torch_scratch(min(largest, CHUNK))
        for entry in entries:
            count = _word_count(entry, legacy)
            entry.words, entry.table = word_dtype(entry.torch_dtype.itemsize), table[:count]
            entry.scratch = None if scratch is None else scratch[: min(count, CHUNK)]
        return factor_bytes() + table.numel() * 4 + (0 if scratch is None else scratch.numel() * 4)
    if on_gpu:
        for entry in entries:
            if _whole_rows(entry):
                rows = _word_count(entry, legacy) // entry.width
                entry.columns = column_factors(device)[: entry.width]
                entry.factors = row_factors(rows, device)[:rows]
        return factor_bytes()
    return _prepare_host(entries, largest)


def _torch_scratch(count: int):
    import torch

    return torch.empty(count, dtype=torch.int32)


def _prepare_host(entries: list[GuardedParam], largest: int) -> int:
    """The CPU path's numpy factors and one flat uint32 scratch for the products."""
    try:
        import numpy
    except ImportError:  # the torch path, unprepared: ``word_digest`` looks its factors up
        return factor_bytes()
    scratch = numpy.empty(min(largest, CHUNK), dtype=numpy.uint32)
    columns, factors = host_factors(max(_word_count(e, False) // e.width for e in entries))
    for entry in entries:
        if _whole_rows(entry):
            rows = _word_count(entry, False) // entry.width
            entry.columns, entry.factors, entry.scratch = columns[: entry.width], factors[:rows], scratch
    return factor_bytes() + columns.nbytes + factors.nbytes + scratch.nbytes


def observe_host(entry: GuardedParam, tensor) -> int:
    """The word digest (modulo 2**32) of a CPU tensor forward receives, as a host integer."""
    if entry.scratch is not None and tensor.is_contiguous():
        words = host_words(tensor.data_ptr(), _word_count(entry, False)).reshape(-1, entry.width)
        return host_rows_digest(words, entry.columns, entry.factors, entry.scratch)
    return int(word_digest(_plain_bytes(tensor), 0, entry.width)) & MASK32


def _plain_bytes(tensor):
    import torch

    tensor = tensor.detach()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)  # Params4bit & co.: the storage, not their ops
    return tensor.contiguous().view(-1).view(torch.uint8)


def observe(entry: GuardedParam, tensor, legacy: bool):
    """The digest of the tensor forward receives in torch ops, a device int64 scalar, no sync."""
    import torch

    if legacy:
        if tensor.device == entry.table.device:
            return digest_words(received_words(tensor, entry.words), 0, entry.table, entry.scratch)
        return digest(tensor, 0)  # not where its shard lives: the general path
    tensor = tensor.detach()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)  # Params4bit & co.: the storage, not their ops
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if isinstance(entry.factors, torch.Tensor) and tensor.device == entry.factors.device:
        try:
            words = tensor.view(-1).view(torch.int32)
        except RuntimeError:  # storage not 4-byte aligned: the general path copies it
            words = None
        if words is not None:
            return rows_digest(words.view(-1, entry.width), entry.columns, entry.factors)
    return word_digest(tensor.view(-1).view(torch.uint8), 0, entry.width)
