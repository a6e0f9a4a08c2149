"""The guard's digest against a pure-Python reference, and its hot path against the general one."""

from __future__ import annotations

import torch

from fsdpqdiag.weightguard.digest import (
    CHUNK,
    MASK64,
    bit_words,
    digest,
    digest_words,
    host,
    multipliers,
    received_words,
    word_dtype,
)


def _wrap32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _reference(tensor, start_element: int = 0) -> int:
    """sum_i wrap32(bits_i * m_i) mod 2**64, in Python integers."""
    words, per_element = bit_words(tensor)
    start = start_element * per_element
    table = multipliers(start + words.numel(), "cpu")[start:].tolist()
    return sum(_wrap32(w * m) for w, m in zip(words.tolist(), table)) & MASK64


def _tensors():
    generator = torch.Generator().manual_seed(11)
    bits = torch.randint(-(1 << 15), 1 << 15, (1000,), dtype=torch.int16, generator=generator)
    yield bits.view(torch.bfloat16)
    yield torch.randint(0, 256, (777,), dtype=torch.uint8, generator=generator)
    yield torch.randn(300, dtype=torch.float64, generator=generator)
    yield torch.randn(257, dtype=torch.float32, generator=generator)


def test_digest_is_the_reference_sum_at_any_offset():
    for tensor in _tensors():
        for start in (0, 1, 4097):
            assert host(digest(tensor, start)) == _reference(tensor, start)


def test_hot_path_equals_the_general_digest():
    """What the guard's hook computes (precomputed table, int32 scratch, a parameter subclass,
    a non-contiguous tensor, more than one chunk) is the digest set-up and localization use."""
    big = torch.randint(-(1 << 15), 1 << 15, (CHUNK + 123,), dtype=torch.int16).view(torch.bfloat16)
    cases = [*_tensors(), torch.nn.Parameter(next(_tensors()).view(50, 20), requires_grad=False)]
    cases += [next(_tensors()).view(20, 50).t(), big]
    for tensor in cases:
        words = received_words(tensor, word_dtype(tensor.element_size()))
        table = multipliers(words.numel(), "cpu")[: words.numel()]
        scratch = torch.empty(min(words.numel(), CHUNK), dtype=torch.int32)
        expected = host(digest(tensor.contiguous()))
        assert host(digest_words(words, 0, table, scratch)) == expected
        assert host(digest_words(words, 0)) == expected
    # the scratch is written, never the weight
    weight = next(_tensors())
    before = weight.clone()
    words = received_words(weight, torch.int16)
    digest_words(words, 0, multipliers(1000, "cpu")[:1000], torch.empty(1000, dtype=torch.int32))
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))
