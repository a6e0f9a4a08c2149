"""Byte forensics on hand-made tensors, with the canonicalizing copy as positive control."""

import torch

from fsdpqdiag.evidence import bytes as fb
from fsdpqdiag.stack.faults import canonicalize_nans_


def test_every_bf16_nan_pattern_is_classified():
    nans = fb.all_nan_patterns(torch.bfloat16)
    assert nans.numel() == 2 * 127  # two signs x every non-zero 7-bit mantissa
    codes = fb.classify(nans)
    assert int((codes == 2).sum()) == 2 * 64  # quiet bit (0x40) set
    assert int((codes == 3).sum()) == 2 * 63
    inf = torch.tensor([float("inf"), float("-inf"), 1.0, 0.0], dtype=torch.bfloat16)
    assert fb.classify(inf).tolist() == [1, 1, 0, 0]


def test_float32_and_float16_layouts():
    bits = torch.tensor([0x7FC00000, 0x7F800001, 0x7F800000, 0x3F800000], dtype=torch.int32)
    assert fb.classify(bits.view(torch.float32)).tolist() == [2, 3, 1, 0]
    half = torch.tensor([0x7E00, 0x7C01, 0x7C00, 0x3C00], dtype=torch.int16)
    assert fb.classify(half.view(torch.float16)).tolist() == [2, 3, 1, 0]


def test_identical_tensors_have_no_diff():
    payload = fb.all_nan_patterns()
    result = fb.diff(payload, payload.clone())
    assert result["bytes_equal"] and result["differing_elements"] == 0 and result["differing_bytes"] == 0
    assert result["post_bit_patterns"] == {} and result["samples"] == []


def test_canonicalizing_copy_is_caught_element_by_element():
    original = torch.cat([fb.all_nan_patterns(), torch.randn(1000).to(torch.bfloat16)])
    altered = original.clone()
    canonicalize_nans_(altered)
    result = fb.diff(original, altered)
    already_canonical = int((original.view(torch.int16) == 0x7FFF).sum())
    assert result["differing_elements"] == 254 - already_canonical
    assert result["post_bit_patterns"] == {"0x7fff": result["differing_elements"]}
    assert result["original_classes"]["finite"] == 0
    assert (
        result["original_classes"]["qNaN"] + result["original_classes"]["sNaN"]
        == result["differing_elements"]
    )
    # negative NaNs flip the sign byte too: more bytes than elements differ
    assert result["differing_bytes"] > result["differing_elements"]
    sample = result["samples"][0]
    assert sample["post_bits"] == "0x7fff" and sample["original_class"] in ("qNaN", "sNaN")
    assert len(result["positions"]) == result["differing_elements"]


def test_change_of_dtype_is_not_comparable():
    result = fb.diff(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float32))
    assert result["comparable"] is False and result["bytes_equal"] is False


def test_nan_census_and_output_delta():
    payload = fb.all_nan_patterns()
    census = fb.nan_census(payload)
    assert census["elements"] == census["nan_elements"] == 254
    assert census["original_classes"] == {"inf": 0, "qNaN": 128, "sNaN": 126}
    same = fb.output_delta(torch.ones(3), torch.ones(3))
    assert same["output_bit_equal"] and same["max_abs_delta"] == 0.0
    moved = fb.output_delta(torch.ones(3), torch.tensor([1.0, 1.5, float("nan")]))
    assert not moved["output_bit_equal"] and moved["max_abs_delta"] == 0.5
    assert moved["nonfinite_delta_elements"] == 1


def test_subclasses_are_compared_by_storage():
    bnb = __import__("bitsandbytes")
    weight = bnb.nn.Params4bit(torch.randn(64, 64), quant_storage=torch.bfloat16, quant_type="nf4")
    weight = weight.to("cpu")
    plain = fb.plain(weight)
    assert type(plain) is torch.Tensor and plain.dtype == torch.bfloat16
    assert fb.diff(weight, plain.clone())["bytes_equal"]


def _mix64_reference(x: int) -> int:
    """fsdpqdiag.evidence.bytes.mix64 in Python integers: two's-complement wrap, arithmetic shifts."""

    def signed(v: int) -> int:
        v &= (1 << 64) - 1
        return v - (1 << 64) if v >> 63 else v

    z = signed(signed(x + 0x9E3779B97F4A7C15) * 0xBF58476D1CE4E5B9)
    z = signed(signed(z ^ (z >> 32)) * 0x94D049BB133111EB)
    return signed(z ^ (z >> 29))


def test_positions_digest_is_mix64_sum_modulo_2_64():
    positions = torch.tensor([0, 1, 7, 1 << 40, (1 << 62) + 12345, 2**31 - 1])
    expected = sum(_mix64_reference(int(p)) for p in positions) & ((1 << 64) - 1)
    assert fb.positions_digest(positions) == f"mix64-sum:{expected:016x}"
    # a set digest: order does not matter, one moved position does
    assert fb.positions_digest(positions.flip(0)) == fb.positions_digest(positions)
    moved = positions.clone()
    moved[2] += 1
    assert fb.positions_digest(moved) != fb.positions_digest(positions)


def test_word_wide_search_finds_exactly_what_an_element_compare_finds():
    generator = torch.Generator().manual_seed(0)
    for dtype, count in (
        (torch.bfloat16, 4099),
        (torch.uint8, 8195),
        (torch.float32, 1001),
        (torch.int8, 64),
    ):
        original = torch.randint(
            0,
            256,
            (count * torch.tensor([], dtype=dtype).element_size(),),
            dtype=torch.uint8,
            generator=generator,
        ).view(dtype)
        altered = original.clone()
        flips = torch.randperm(count, generator=generator)[: count // 7]
        flips = torch.cat([flips, torch.tensor([0, count - 1])])  # the first element and the odd tail
        altered.view(torch.uint8).view(-1, original.element_size())[flips, 0] ^= 0x5A
        # an odd storage offset cannot be read as 8-byte words: the fallback path
        for a, b in ((original, altered), (original[1:], altered[1:])):
            before, after = fb.element_bits(a), fb.element_bits(b)
            expected = torch.nonzero(before != after).reshape(-1)
            assert torch.equal(fb.differing_positions(before, after), expected), dtype
            result = fb.diff(a, b)
            assert result["differing_elements"] == expected.numel()
            assert result["positions_digest"] == fb.positions_digest(expected)
