"""The guard's word digest sees the three alterations it must see.

Against a pure-Python reference, split over shards at any byte, and through the guard's own
hot path on real packed bitsandbytes Params4bit weights: a NaN payload rewritten into another
NaN, two containers swapped, one bit flipped anywhere. On a CPU the hot path is numpy's; on a
GPU the fused Triton kernel, held to the same digest and the same three alterations (``gpu``)."""

from __future__ import annotations

from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch

from fsdpqdiag.evidence.bytes import classify, plain
from fsdpqdiag.stack.faults import canonicalize_nans_
from fsdpqdiag.weightguard import verify
from fsdpqdiag.weightguard.digest import (
    MASK32,
    column_factors,
    digest,
    host,
    host32,
    raw_bytes,
    row_factors,
    row_width,
    word_digest,
)
from fsdpqdiag.weightguard.params import GuardedParam
from tests.support import gpu


def _reference(data: torch.Tensor, start: int, width: int) -> int:
    """sum over bytes p of byte_p * 2**(8 (p mod 4)) * c[w mod width] * r[w div width], w = p div 4."""
    columns = column_factors("cpu").tolist()
    rows = row_factors((start + data.numel()) // 4 // width + 1, "cpu").tolist()
    total = 0
    for offset, value in enumerate(data.tolist()):
        position = start + offset
        word = position >> 2
        total += (value << (8 * (position & 3))) * columns[word % width] * rows[word // width]
    return total & MASK32


def test_word_digest_is_the_reference_and_splits_over_shards_at_any_byte():
    generator = torch.Generator().manual_seed(5)
    for count in (3, 1000, 20000):
        data = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
        for width in (64, row_width(count)):
            whole = host32(word_digest(data, 0, width))
            assert whole == _reference(data, 0, width), (count, width)
            for cut in (1, 2, 5, count // 3, count - 1):
                # the second shard copied: its own storage, as on another rank
                parts = host32(word_digest(data[:cut], 0, width)) + host32(
                    word_digest(data[cut:].clone(), cut, width)
                )
                assert parts & MASK32 == whole, (count, width, cut)


def _packed_weight(seed: int = 7, features: int = 256):
    """A real packed NF4 weight in bf16 storage, with NaN containers among its packed codes."""
    torch.manual_seed(seed)
    linear = bnb.nn.Linear4bit(
        features, features, bias=False, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16
    ).to("cpu")
    weight = linear.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.bfloat16
    return weight


def _guarded(weight) -> GuardedParam:
    """A GuardedParam of ``weight`` as the guard prepares it, to drive its hot path."""
    entry = GuardedParam(
        name="weight", module_name="", module=None, unit=None, param_name="weight",
        fsdp_param=SimpleNamespace(sharded_param=weight), kind="Params4bit", trainable=False,
        cast_dtype=None, group=None, numel=weight.numel(),
    )  # fmt: skip
    entry.torch_dtype = weight.dtype
    entry.width = row_width(weight.numel() * weight.element_size())
    entry.expected = host32(word_digest(raw_bytes(weight), 0, entry.width))
    verify.Checks([entry], legacy=False)
    return entry


def _seen(entry: GuardedParam, tensor) -> int:
    """What the CPU hook computes for ``tensor``."""
    return verify.observe_host(entry, tensor)


@pytest.fixture(scope="module")
def packed():
    weight = _packed_weight()
    return weight, _guarded(weight)


def test_hot_path_is_the_general_digest_and_never_writes_the_weight(packed):
    weight, entry = packed
    before = plain(weight).clone()
    assert entry.scratch is not None  # whole rows: the hot path, not the general one
    assert _seen(entry, weight) == entry.expected
    # the hook's decision on it: nothing differs; the same weight with one bit flipped differs
    checks = verify.Checks([entry], legacy=False)
    (unit,) = checks.units
    assert checks.run(unit, [weight]) == []
    flipped = before.clone()
    flipped.view(torch.int16)[7] ^= 1 << 14
    assert checks.run(unit, [flipped]) == [entry]
    assert torch.equal(plain(weight).view(torch.int16), before.view(torch.int16))
    # a copy 2 bytes into its storage (its words not 4-byte aligned): the same digest
    shifted = torch.empty(before.numel() + 1, dtype=torch.bfloat16)[1:]
    shifted.copy_(before.reshape(-1))
    with pytest.raises(RuntimeError):
        shifted.view(torch.int32)
    assert _seen(entry, shifted) == entry.expected


def test_a_nan_payload_rewritten_into_another_nan_is_seen(packed):
    weight, entry = packed
    storage = plain(weight).reshape(-1)
    nans = torch.nonzero(classify(storage) >= 2).reshape(-1).tolist()
    assert nans, "the seed gives packed codes that read as bf16 NaNs"
    canonical = storage.clone()
    canonicalize_nans_(canonical)
    if not torch.equal(canonical.view(torch.int16), storage.view(torch.int16)):
        assert _seen(entry, canonical) != entry.expected
    for index in nans:  # each NaN alone, its payload changed and still a NaN
        altered = storage.clone()
        bits = altered.view(torch.int16)
        bits[index] = bits[index] ^ 0x0001 if int(bits[index]) & 0x003F else bits[index] | 0x0040
        assert bool(torch.isnan(altered[index]))
        assert _seen(entry, altered) != entry.expected, index


def test_two_containers_swapped_are_seen(packed):
    weight, entry = packed
    storage = plain(weight).reshape(-1)
    bits = storage.view(torch.int16)
    generator = torch.Generator().manual_seed(3)
    pairs = torch.randint(0, storage.numel(), (300, 2), generator=generator).tolist()
    pairs += [(0, 1), (0, storage.numel() - 1), (2, 3), (storage.numel() - 2, storage.numel() - 1)]
    checked = 0
    for first, second in pairs:
        if first == second or int(bits[first]) == int(bits[second]):
            continue  # the same bits trade places: nothing changed
        swapped = storage.clone()
        swapped[[first, second]] = swapped[[second, first]]
        assert _seen(entry, swapped) != entry.expected, (first, second)
        checked += 1
    assert checked > 250


def test_one_flipped_bit_anywhere_is_seen(packed):
    weight, entry = packed
    storage = plain(weight).reshape(-1).view(torch.uint8)
    words = storage.numel() // 4
    # Everywhere, by construction: a flipped bit changes the digest by ±2**k times its word's
    # multiplier c * r modulo 2**32, never 0 when every multiplier is odd.
    columns = column_factors("cpu")[: entry.width]
    rows = row_factors(words // entry.width, "cpu")[: words // entry.width]
    assert bool((columns & 1).all()) and bool((rows & 1).all())
    # And through the hot path: every bit of the first and last words, and bits at random.
    generator = torch.Generator().manual_seed(9)
    places = [
        (byte, bit) for byte in (0, 1, 2, 3, storage.numel() - 4, storage.numel() - 1) for bit in range(8)
    ]
    places += list(zip(torch.randint(0, storage.numel(), (200,), generator=generator).tolist(),
                       torch.randint(0, 8, (200,), generator=generator).tolist()))  # fmt: skip
    for byte, bit in places:
        flipped = storage.clone()
        flipped[byte] ^= 1 << bit
        assert _seen(entry, flipped.view(torch.bfloat16)) != entry.expected, (byte, bit)


def test_the_old_per_weight_path_still_checks_its_own_digest(packed):
    """``legacy=True`` (kept to measure against): its hook code against its per-element digest."""
    weight, _ = packed
    entry = _guarded(weight)
    verify.Checks([entry], legacy=True)
    entry.expected_legacy = host(digest(weight))
    seen = int(torch.stack([verify.observe(entry, weight, legacy=True)]).bitwise_and_(verify.mask(True)))
    assert seen == verify.expected(entry, legacy=True)
    altered = plain(weight).clone()
    canonicalize_nans_(altered)
    assert int(verify.observe(entry, altered, legacy=True)) != verify.expected(entry, legacy=True)
    # and the hook's decision on a CPU
    checks = verify.Checks([entry], legacy=True)
    assert checks.differs([weight]) == [] and checks.differs([altered]) == [entry]


def test_a_weight_larger_than_one_chunk_digests_the_same_in_chunks_and_scratch():
    import numpy

    from fsdpqdiag.weightguard.digest import CHUNK, host_factors, host_rows_digest, rows_digest

    width = 4096
    rows = CHUNK // width + 3
    generator = torch.Generator().manual_seed(13)
    words = torch.randint(-(1 << 31), 1 << 31, (rows, width), dtype=torch.int32, generator=generator)
    columns, factors = column_factors("cpu")[:width], row_factors(rows, "cpu")[:rows]
    whole = host32(rows_digest(words, columns, factors))
    assert host32(rows_digest(words, columns, factors, torch.empty(CHUNK, dtype=torch.int32))) == whole
    halves = rows_digest(words[:5], columns, factors[:5]) + rows_digest(words[5:], columns, factors[5:])
    assert host32(halves) == whole
    assert host32(word_digest(words.view(-1).view(torch.uint8), 0, width)) == whole
    # the CPU hook's numpy path, whole and in blocks of rows through a smaller scratch
    host_columns, host_rows = host_factors(rows)
    for scratch_words in (rows * width, CHUNK, 3 * width, width):
        scratch = numpy.empty(scratch_words, dtype=numpy.uint32)
        assert host_rows_digest(words.numpy(), host_columns[:width], host_rows, scratch) == whole


# -- the fused kernel on a GPU: the same digest, the same three alterations -----------------------
def _differs(checks, tensors) -> list[str]:
    """What the GPU hook counts for ``tensors`` (one per entry), read back as the drain does."""
    return [entry.name for entry in checks.differs(tensors)]


@pytest.mark.gpu
@gpu
def test_fused_kernel_is_the_word_digest_over_more_weights_than_one_launch_takes():
    pytest.importorskip("triton", reason="the fused kernel needs Triton")
    generator = torch.Generator().manual_seed(17)
    # whole rows, a ragged last row, a row width of 64, one word: twelve weights, two launches
    words = [4096 * 3, 5000, 64 * 7, 1, 12345, 4096, *[999 * (k + 1) for k in range(6)]]
    datas = [torch.randint(0, 256, (4 * n,), dtype=torch.uint8, generator=generator).cuda() for n in words]
    entries = [verify.single(data.view(torch.int32), f"w{k}").entries[0] for k, data in enumerate(datas)]
    checks = verify.Checks(entries, legacy=False)
    assert checks.path == "triton" and len(checks.units[0].launches) == 2
    for _ in range(3):  # the counters reset themselves after every launch
        assert _differs(checks, [d.view(torch.int32) for d in datas]) == []
    for k in (0, 3, 11):
        altered = [d.clone() for d in datas]
        altered[k][-1] ^= 0x80
        assert _differs(checks, [d.view(torch.int32) for d in altered]) == [f"w{k}"]
    # after the first, the launches went straight to the compiled kernel, unless this Triton's
    # interface sent them back to the JIT for good
    assert checks.launch.direct_launches > 0 or not checks.launch.direct


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_gpu_hot_path_sees_the_three_alterations_on_a_real_packed_weight(path, monkeypatch):
    """The fused kernel, and the torch ops of a GPU without Triton, which count on the device
    the same way: a NaN canonicalization, a swap and single flipped bits are all seen."""
    if path == "triton":
        pytest.importorskip("triton", reason="the fused kernel needs Triton")
    else:
        import sys

        import fsdpqdiag.weightguard

        # As if Triton were absent: the kernel's module cannot be imported (an earlier test may
        # have imported it, and ``from package import name`` reads the package's attribute first).
        monkeypatch.setitem(sys.modules, "fsdpqdiag.weightguard.fused", None)
        monkeypatch.delattr(fsdpqdiag.weightguard, "fused", raising=False)
    weight = bnb.nn.Linear4bit(
        1024, 1024, bias=False, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16
    ).to("cuda").weight  # fmt: skip
    assert type(weight).__name__ == "Params4bit" and weight.is_cuda
    storage = plain(weight).reshape(-1)
    checks = verify.single(storage)
    assert checks.path == path
    assert _differs(checks, [weight]) == []
    canonical = storage.clone()
    canonicalize_nans_(canonical)
    assert not torch.equal(canonical.view(torch.int16), storage.view(torch.int16))
    assert _differs(checks, [canonical]) == ["weight"]
    bits = storage.view(torch.int16)
    other = int(torch.nonzero(bits != bits[0])[0])
    swapped = storage.clone()
    swapped[[0, other]] = swapped[[other, 0]]
    assert _differs(checks, [swapped]) == ["weight"]
    generator = torch.Generator().manual_seed(23)
    raw = storage.view(torch.uint8)
    for byte, bit in zip(torch.randint(0, raw.numel(), (50,), generator=generator).tolist(),
                         torch.randint(0, 8, (50,), generator=generator).tolist()):  # fmt: skip
        flipped = raw.clone()
        flipped[byte] ^= 1 << bit
        assert _differs(checks, [flipped.view(torch.bfloat16)]) == ["weight"], (byte, bit)
    middle = storage.clone()
    middle.view(torch.int16)[storage.numel() // 2] ^= 1
    assert _differs(checks, [middle]) == ["weight"]
    assert _differs(checks, [weight]) == []  # counted alterations leave no count behind


@pytest.mark.gpu
@gpu
def test_counts_of_more_steps_than_copies_in_flight_all_land_with_their_step():
    """The hook's counts reach the host without waiting, one copy per optimizer step; with more
    steps in flight than the ring has copies, the oldest is waited for, and no count is lost."""
    pytest.importorskip("triton", reason="the fused kernel needs Triton")
    generator = torch.Generator().manual_seed(29)
    data = torch.randint(0, 256, (4 * 4096 * 5,), dtype=torch.uint8, generator=generator).cuda()
    checks = verify.single(data.view(torch.int32))
    (unit,) = checks.units
    altered = data.clone()
    altered[100] ^= 0x01
    found = []
    for step in range(3 * verify.RING):
        # every third step the weight forward receives is altered
        assert checks.run(unit, [(altered if step % 3 == 1 else data).view(torch.int32)]) == []
        found += checks.collect(step, block=False)
    found += checks.collect(3 * verify.RING, block=True)
    assert sorted(step for _, step in found) == [s for s in range(3 * verify.RING) if s % 3 == 1]
