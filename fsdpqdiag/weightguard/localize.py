"""Byte forensics of one weight that reached forward altered, on the rank that saw it: which
ranks' slices differ (by their digests), this rank's slice against its own shard element by
element (``fsdpqdiag.evidence.bytes``), a fingerprint, and a one-line summary."""

from __future__ import annotations

from typing import Any

from fsdpqdiag.weightguard.digest import host32, raw_bytes, word_digest
from fsdpqdiag.weightguard.params import GuardedParam, Slice, shard_word_digest

# What a finding keeps of ``fsdpqdiag.evidence.bytes.diff``'s comparison of this rank's slice.
COMPARISON_KEYS = (
    "bytes_equal",
    "differing_bytes",
    "differing_elements",
    "original_classes",
    "post_bit_patterns",
    "samples",
    "positions_digest",
)


def same_form(entry: GuardedParam, tensor) -> bool:
    return str(tensor.dtype).removeprefix("torch.") == entry.dtype and tensor.numel() == entry.numel


def finding_head(entry: GuardedParam, rank: int, step: int | None) -> dict[str, Any]:
    return {
        "module": entry.module_name,
        "parameter": entry.name,
        "kind": entry.kind,
        "rank": rank,
        "step": step,
    }


def unlocalized(entry: GuardedParam, rank: int) -> dict[str, Any]:
    """The finding of a mismatch whose bytes are gone (no later unshard to localize it in)."""
    return {
        **finding_head(entry, rank, entry.first_step),
        "first_step": entry.first_step,
        "summary": "the digest differed; no later unshard to localize it in",
    }


def localize(entry: GuardedParam, tensor, step: int, rank: int) -> dict:
    """Byte forensics of one altered weight on this rank: which slices differ (their
    digests), this rank's slice against its own shard element by element, a fingerprint."""
    from fsdpqdiag.analyses.fingerprint import classify
    from fsdpqdiag.evidence.bytes import plain

    observed = plain(tensor)
    finding = {**finding_head(entry, rank, step), "dtype": entry.dtype, "elements": entry.numel}
    shard_now = host32(shard_word_digest(entry))
    finding["shard_byte_true"] = shard_now == entry.shard_digest
    if not same_form(entry, observed):
        finding.update(
            comparable=False,
            reason=f"sharded {entry.dtype}[{entry.numel}] reached forward as "
            f"{str(observed.dtype).removeprefix('torch.')}{list(observed.shape)}",
        )
        finding["summary"] = finding["reason"]
        return finding
    differing = _slices_differing(entry, observed)
    finding["slices_differing"] = differing
    mine = next((s for s in entry.slices_nonempty if s.rank == _group_rank(entry)), None)
    comparison: dict[str, Any] = {"bytes_equal": True, "differing_elements": 0}
    if mine is not None and finding["shard_byte_true"]:
        comparison = _compare_own_slice(entry, observed, mine)
        finding["own_slice"] = {"start": mine.start, "elements": mine.numel}
    finding.update({k: comparison.get(k) for k in COMPARISON_KEYS if k in comparison})
    finding["fingerprint"] = (
        classify(comparison, observed.device) if comparison.get("differing_elements") else None
    )
    finding["summary"] = _summary(finding["shard_byte_true"], comparison, mine, differing)
    return finding


def _slices_differing(entry: GuardedParam, observed) -> list[int]:
    """The shard-group ranks whose slice of ``observed`` no longer has its set-up digest."""
    data, size = raw_bytes(observed), observed.element_size()
    differing = []
    for piece in entry.slices_nonempty:
        begin, end = piece.start * size, (piece.start + piece.numel) * size
        if host32(word_digest(data[begin:end], begin, entry.width)) != piece.digest:
            differing.append(piece.rank)
    return differing


def _compare_own_slice(entry: GuardedParam, observed, mine: Slice) -> dict[str, Any]:
    """This rank's slice of ``observed`` against its shard, positions in the unsharded tensor."""
    from fsdpqdiag.evidence.bytes import diff

    flat = observed.reshape(-1)[mine.start : mine.start + mine.numel]
    comparison = diff(entry.shard().reshape(-1), flat)
    comparison["positions"] = [p + mine.start for p in comparison.get("positions", [])]
    for sample in comparison.get("samples", []):
        sample["index"] += mine.start
    return comparison


def _summary(shard_byte_true: bool, comparison: dict, mine: Slice | None, differing: list[int]) -> str:
    if not shard_byte_true:
        return "the shard itself changed since set-up (something wrote into it)"
    if comparison.get("differing_elements"):
        patterns = ", ".join(list(comparison.get("post_bit_patterns") or {})[:3])
        return (
            f"{comparison['differing_elements']} of {mine.numel if mine else 0} elements of this "
            f"rank's slice differ from its shard (post bits {patterns})"
        )
    if not differing:
        return "the digest differed, but every slice is byte-true now (a transient alteration)"
    return f"slices of rank(s) {', '.join(map(str, differing))} differ; this rank's slice is byte-true"


def _group_rank(entry: GuardedParam) -> int:
    import torch.distributed as dist

    return dist.get_rank(entry.group) if dist.is_initialized() else 0
