"""The guard's hot path: one check per FSDP unit per unshard, no host sync inside a step.

A forward pre-hook on each FSDP unit runs after FSDP2's own (``fully_shard`` prepends its
pre-forward hook, which unshards the unit), so every guarded weight of the unit is then the
tensor its module's forward receives. Per weight: its bytes viewed as int32 words, no copy, and
the word digest's multiply, row sum and dot (``digest.rows_digest``); per unit: one stack of
the digests. On a CPU the unit's digests are compared at once; on a GPU they join the step's
and are copied to the host without waiting, at the optimizer step, and compared there once the
copy has landed. Only a weight whose digest differs costs more: localization, at once on a CPU,
at its next unshard on a GPU (the bytes of the unshard that differed are gone by then).

``legacy``: the old per-weight path, a hook on every guarded module and the per-element digest
with its table of one multiplier per element of the largest weight; kept to measure against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fsdpqdiag.weightguard.digest import (
    CHUNK,
    MASK32,
    column_factors,
    digest,
    digest_words,
    factor_bytes,
    multipliers,
    received_words,
    row_factors,
    rows_digest,
    signed,
    word_digest,
    word_dtype,
)
from fsdpqdiag.weightguard.params import GuardedParam

# Below this many words the CPU allocator hands a temporary back faster than an ``out=`` takes.
SCRATCH_MIN = 1 << 16


@dataclass
class Unit:
    """The guarded weights one hook verifies: an FSDP unit's (a module's, ``legacy``)."""

    module: Any
    entries: list[GuardedParam]


def units(entries: list[GuardedParam], legacy: bool) -> list[Unit]:
    grouped: dict[int, Unit] = {}
    for entry in entries:
        owner = entry.module if legacy else entry.unit
        grouped.setdefault(id(owner), Unit(owner, [])).entries.append(entry)
    return list(grouped.values())


def expected(entry: GuardedParam, legacy: bool) -> int:
    """What ``observe``'s value must be, as the device computes it (masked, signed)."""
    return signed(entry.expected_legacy) if legacy else entry.expected


def mask(legacy: bool) -> int:
    """What of the device's int64 digest counts: the low 32 bits of the word digest; all 64 of
    the per-element one (-1: every bit set, as an int64 takes it)."""
    return -1 if legacy else MASK32


def prepare(entries: list[GuardedParam], legacy: bool) -> int:
    """What each verification needs, once, and the bytes it keeps resident: the digest's factors
    (one set per device, views of it per weight) and, on a CPU, one int32 scratch for the
    products. Not on a GPU: the caching allocator hands a freed block back as cheaply and keeps
    it stream-safe, which one shared buffer would not be across streams."""
    import torch

    cpu = torch.device("cpu")
    largest: dict[Any, int] = {}
    for entry in entries:
        device = entry.fsdp_param.sharded_param.device
        largest[device] = max(largest.get(device, 0), _word_count(entry, legacy))
    tables = {device: multipliers(count, device) for device, count in largest.items()} if legacy else {}
    scratch = torch.empty(min(largest.get(cpu, 0), CHUNK), dtype=torch.int32)
    for entry in entries:
        device = entry.fsdp_param.sharded_param.device
        count = _word_count(entry, legacy)
        entry.scratch = scratch[: min(count, CHUNK)] if device == cpu else None
        if legacy:
            entry.words = word_dtype(entry.torch_dtype.itemsize)
            entry.table = tables[device][:count]
            continue
        nbytes = entry.numel * entry.torch_dtype.itemsize
        if nbytes % (4 * entry.width) == 0:  # whole rows: the hot path; else the general one
            rows = count // entry.width
            entry.columns = column_factors(device)[: entry.width]
            entry.factors = row_factors(rows, device)[:rows]
            if entry.scratch is not None and count <= CHUNK:
                entry.scratch = entry.scratch.view(rows, entry.width)
            if entry.scratch is not None and count < SCRATCH_MIN:
                entry.scratch = None  # a small temporary costs less than writing into a view
    legacy_bytes = sum(t.numel() * t.element_size() for t in tables.values())
    return factor_bytes() + legacy_bytes + scratch.numel() * scratch.element_size()


def _word_count(entry: GuardedParam, legacy: bool) -> int:
    if legacy:
        return entry.numel * (2 if entry.torch_dtype.itemsize == 8 else 1)
    return entry.numel * entry.torch_dtype.itemsize // 4


def observe(entry: GuardedParam, tensor, legacy: bool):
    """The digest of the tensor forward receives, a device int64 scalar, no host sync."""
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
    if entry.factors is not None and tensor.device == entry.factors.device:
        try:
            words = tensor.view(-1).view(torch.int32)
        except RuntimeError:  # storage not 4-byte aligned: the general path copies it
            words = None
        if words is not None:
            return rows_digest(words.view(-1, entry.width), entry.columns, entry.factors, entry.scratch)
    return word_digest(tensor.view(-1).view(torch.uint8), 0, entry.width)
