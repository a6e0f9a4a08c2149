"""The weight guard's digests: pure tensor functions, on any device, no host sync.

Why a digest of our own: PyTorch's DebugMode hashes tensors per op, but its default hash maps
NaN to 0 before an L1 norm, so it cannot see a NaN payload rewritten into another NaN — the
very change #1945 is about. Both digests here are exact on raw bits and position-aware.

**The word digest** (what the guard checks at every unshard, what set-up and localization use)::

    word_digest(x) = sum_w W_w * c[w mod P] * r[w div P]  (mod 2**32)

over the little-endian 32-bit words ``W_w`` of the tensor's raw bytes, with odd 31-bit factors
``c`` (one per column of a row of ``P`` words, at most 4096: 16 KiB per device) and ``r`` (one
per row: 8 bytes per 16 KiB of the largest weight). Every word's multiplier ``c * r`` is odd,
and a multiply by an odd number is a bijection modulo 2**32, so:

- one flipped bit anywhere changes its word by ``±2**k`` (k < 32), and the digest by that times
  an odd number: never 0 modulo 2**32, so it is always seen;
- a NaN payload rewritten into another NaN (or any one element rewritten, 1 to 4 bytes, which
  never straddles a word) changes one word: always seen;
- two containers swapped change the digest by ``(a - b) * (m_i - m_j)``, zero only where the
  two multipliers agree on the low bits that ``a - b`` leaves (about 2**-31 for one swap);
  two containers inside one word change that word itself, which is always seen.

Several unrelated changes go unseen only if they cancel exactly (about 2**-32). It is linear
in the bytes modulo 2**32, so a shard's digest at its global byte offset needs no other rank's
bytes, and the ranks' shard digests sum to the unsharded tensor's.

Where it is computed: ``c[j] = odd31(mix64(j))`` and ``r[i] = odd31(mix64(i + 2**40))`` are
functions of the word's index, so three implementations give the same number bit for bit:
torch ops reading the factors from two small tables (set-up over each shard at its global
offset, localization, a GPU without Triton: ``word_digest``, ``rows_digest``), numpy on a CPU's
hot path (``host_rows_digest``: uint32 arithmetic, which wraps modulo 2**32 as defined), and
the Triton kernel of ``fused`` on a GPU, which computes both factors from the index and keeps
no table. The kernel sums one total per weight, never one per unit: each weight's check is its
own digest, so nothing that alters one weight can be cancelled by another weight of its unit,
and the three properties above hold per weight whatever path checked it. Each path reads the
weight once as 32-bit words: no widening of packed bytes, no per-element table.

**The per-element digest** (the old per-weight path, kept selectable for comparison)::

    digest(x) = sum_i wrap32(bits(x_i) * m_i)  (mod 2**64)

with ``bits`` the element's integer view (8-byte elements as two 32-bit words) and ``m_i`` a
per-position multiplier read from a table as long as the largest weight (``multipliers``).
"""

from __future__ import annotations

import math
from typing import Any

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
# Words per row of the word digest at most: the column factors are this many int32 (16 KiB).
ROW_WORDS = 4096
# Row factors start here in ``mix64``'s domain, away from the column factors' positions.
_ROW_SALT = 1 << 40
# Elements digested per kernel: bounds the int32 temporary to 4 MiB whatever the weight's size.
CHUNK = 1 << 20

_TABLES: dict[str, Any] = {}


def multipliers(count: int, device) -> Any:
    """The first ``count`` position multipliers (odd, 31-bit, int32) on ``device``; the table
    grows on demand and is shared by every parameter on that device."""
    import torch

    from fsdpqdiag.evidence.bytes import mix64

    key = str(device)
    table = _TABLES.get(key)
    if table is None or table.numel() < count:
        positions = torch.arange(max(count, 1), dtype=torch.int64, device=device)
        table = (((mix64(positions) >> 16) & 0x7FFFFFFF) | 1).to(torch.int32)
        _TABLES[key] = table
    return table


def bit_words(tensor):
    """Flat integer view of the bits; 8-byte elements as two int32 words each."""
    import torch

    from fsdpqdiag.evidence.bytes import element_bits

    bits = element_bits(tensor)
    if bits.element_size() == 8:
        return bits.view(torch.int32), 2
    return bits, 1


def word_dtype(element_size: int):
    """The integer word ``bit_words`` views an element of ``element_size`` bytes as."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int32}[element_size]


def received_words(tensor, words):
    """``bit_words`` for the guard's hot path: the tensor forward receives, viewed as ``words``
    (``word_dtype``) with no import, lookup or copy where the tensor is contiguous."""
    import torch

    tensor = tensor.detach()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)  # Params4bit & co.: the storage, not their ops
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.view(-1).view(words)


def digest_words(words, start: int, table=None, scratch=None):
    """Device int64 scalar: sum of ``wrap32(words[j] * m[start + j])``, no host sync.

    ``table``: the multipliers from position ``start`` on (else looked up); ``scratch``: an int32
    buffer of at least ``min(words.numel(), CHUNK)`` elements for the products (CPU only: else
    they are allocated)."""
    import torch

    count = words.numel()
    if table is None:
        table = multipliers(start + count, words.device)[start:]
    if count <= CHUNK:
        return _product_sum(words, table if table.numel() == count else table[:count], scratch)
    sums = [
        _product_sum(words[begin : begin + CHUNK], table[begin : min(begin + CHUNK, count)], scratch)
        for begin in range(0, count, CHUNK)
    ]
    return torch.stack(sums).sum()


def _product_sum(words, table, scratch):
    """``sum(wrap32(words * table))`` in int64. Never in place on ``words``: they are the weight.
    ``sum()`` of int32 accumulates in int64 without the cast copy ``sum(dtype=int64)`` makes."""
    import torch

    if scratch is None:
        # int8/int16 * int32 promotes to int32; on a GPU the cast is inside the one kernel.
        return torch.mul(words, table).sum()
    # On a CPU a mixed-dtype multiply casts through a temporary it allocates: copying the words
    # into the int32 scratch (the same sign or zero extension) and multiplying there does not.
    if scratch.numel() != words.numel():
        scratch = scratch[: words.numel()]
    return scratch.copy_(words).mul_(table).sum()


def digest(tensor, start_element: int = 0):
    """The position-aware digest of ``tensor``'s raw bits, as if it began at flat element
    ``start_element`` of a larger tensor (a shard at its global offset). Device int64 scalar."""
    tensor_words, per_element = bit_words(tensor)
    return digest_words(tensor_words, start_element * per_element)


def host(value) -> int:
    return int(value) & MASK64


def signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# -- the word digest ----------------------------------------------------------------------
_FACTORS: dict[tuple[str, str], Any] = {}


def _odd31(positions):
    from fsdpqdiag.evidence.bytes import mix64

    return ((mix64(positions) >> 16) & 0x7FFFFFFF) | 1


def column_factors(device) -> Any:
    """The ``ROW_WORDS`` column factors (odd, 31-bit, int32) on ``device``."""
    import torch

    key = ("column", str(device))
    if key not in _FACTORS:
        _FACTORS[key] = _odd31(torch.arange(ROW_WORDS, dtype=torch.int64, device=device)).to(torch.int32)
    return _FACTORS[key]


def row_factors(count: int, device) -> Any:
    """The first ``count`` row factors (odd, 31-bit, int64) on ``device``; grows on demand."""
    import torch

    key = ("row", str(device))
    table = _FACTORS.get(key)
    if table is None or table.numel() < count:
        _FACTORS[key] = table = _odd31(
            torch.arange(max(count, 1), dtype=torch.int64, device=device) + _ROW_SALT
        )
    return table


def factor_bytes() -> int:
    """What the word digest keeps resident, all devices together."""
    return sum(t.numel() * t.element_size() for t in _FACTORS.values())


def row_width(nbytes: int) -> int:
    """Words per row for a tensor of ``nbytes``: a divisor of its word count where one is large
    enough, so the guard's pass over it has no ragged tail; else ``ROW_WORDS``."""
    if nbytes % 4:
        return ROW_WORDS
    width = math.gcd(nbytes // 4, ROW_WORDS)
    return width if width >= 64 else ROW_WORDS


def raw_bytes(tensor):
    """Flat uint8 view of the raw bytes, with no copy where the tensor is contiguous."""
    import torch

    tensor = tensor.detach()
    local = getattr(tensor, "_local_tensor", None)
    if local is not None:
        tensor = local.detach()
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)  # Params4bit & co.: the storage, not their ops
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.view(-1).view(torch.uint8)


def word_digest(data, start: int, width: int, scratch=None):
    """Device int64 scalar, the word digest modulo 2**32 of the flat uint8 ``data`` as if it
    began at byte ``start`` of a tensor whose rows are ``width`` words (``row_width``)."""
    import torch

    count, row_bytes = data.numel(), 4 * width
    head = min(count, (-start) % row_bytes)
    body = (count - head) // row_bytes * row_bytes
    parts = []
    if head:
        parts.append(_ragged(data[:head], start, width))
    if body:
        begin = start + head
        try:
            words = data[head : head + body].view(torch.int32)
        except RuntimeError:  # storage not 4-byte aligned: an aligned copy
            words = data[head : head + body].clone().view(torch.int32)
        rows = body // row_bytes
        factors = row_factors(begin // row_bytes + rows, data.device)[begin // row_bytes :][:rows]
        parts.append(
            rows_digest(words.view(rows, width), column_factors(data.device)[:width], factors, scratch)
        )
    if head + body < count:
        parts.append(_ragged(data[head + body :], start + head + body, width))
    if not parts:
        return torch.zeros((), dtype=torch.int64, device=data.device)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def rows_digest(words, columns, factors, scratch=None):
    """The guard's hot path: ``sum_r factors[r] * sum_j words[r, j] * columns[j]`` in wrapping
    integer arithmetic. int32 products wrap modulo 2**32 and sum exactly in int64; no copy of
    the weight, and a temporary of at most ``CHUNK`` words: ``scratch`` where one is given (a
    CPU buffer shaped like a whole weight's, or a flat one of ``CHUNK`` words for a larger one)."""
    import torch

    per = max(1, CHUNK // words.shape[1])
    if words.shape[0] <= per:  # one pass: the common case, with no Python loop or list
        out = scratch if scratch is not None and scratch.shape == words.shape else None
        return torch.mul(torch.mul(words, columns, out=out).sum(dim=1), factors).sum()
    sums = []
    for begin in range(0, words.shape[0], per):
        block = words[begin : begin + per]
        out = None if scratch is None or scratch.dim() != 1 else scratch[: block.numel()].view(block.shape)
        sums.append(torch.mul(block, columns, out=out).sum(dim=1))
    return torch.mul(torch.cat(sums), factors).sum()


def host_factors(rows: int):
    """numpy uint32 copies of the column factors and of the first ``rows`` row factors (their
    low 32 bits: all the digest modulo 2**32 depends on), for the CPU's hot path."""
    import numpy

    columns = column_factors("cpu").numpy().astype(numpy.uint32)
    factors = (row_factors(max(rows, 1), "cpu")[: max(rows, 1)] & MASK32).numpy().astype(numpy.uint32)
    return columns, factors


def host_words(address: int, count: int):
    """A numpy uint32 view of ``count`` words at a CPU tensor's raw ``address``, to use at once.
    Not ``Tensor.numpy()``: exporting a storage to numpy makes it unresizable, and FSDP2 frees
    an unsharded parameter by resizing its storage to 0 after forward."""
    import ctypes

    import numpy

    return numpy.frombuffer((ctypes.c_uint32 * count).from_address(address), dtype=numpy.uint32)


def host_rows_digest(words, columns, factors, scratch) -> int:
    """``rows_digest`` in numpy on a CPU: ``words`` a ``(rows, width)`` array of 4-byte words,
    multiplied into the flat uint32 ``scratch`` (no allocation), summed per row and dotted with
    the row factors, all in uint32 that wraps modulo 2**32 as the digest is defined. numpy's
    elementwise multiply and row sum are vectorized where torch's integer ones cost twice as
    much; a weight larger than ``scratch`` goes in blocks of rows."""
    import numpy

    words = words.view(numpy.uint32)
    per = max(1, scratch.size // words.shape[1])
    total = 0
    for begin in range(0, words.shape[0], per):
        block = words[begin : begin + per]
        products = numpy.multiply(block, columns, out=scratch[: block.size].reshape(block.shape))
        total += int(numpy.dot(products.sum(axis=1, dtype=numpy.uint32), factors[begin : begin + per]))
    return total & MASK32


def _ragged(data, start: int, width: int):
    """Bytes that do not fill a row, one by one: byte ``p`` adds ``byte << 8 (p mod 4)`` times
    its word's multiplier, which is its share of that word's product modulo 2**32."""
    import torch

    positions = torch.arange(start, start + data.numel(), dtype=torch.int64, device=data.device)
    words = positions >> 2
    columns = column_factors(data.device)[words % width].to(torch.int64)
    rows = row_factors((start + data.numel() - 1) // 4 // width + 1, data.device)[words // width]
    return ((data.to(torch.int64) << ((positions & 3) << 3)) * columns * rows).sum()


def host32(value) -> int:
    return int(value) & MASK32
