"""storage-dtype-mismatch: ``quant_storage`` that differs from FSDP2's ``param_dtype``.

bitsandbytes says packed 4-bit weights shard under FSDP only when ``quant_storage``
equals the model dtype. This probe measures what happens otherwise: for each
(quant_storage, param_dtype) pair, on a fresh ``Linear4bit``, does ``fully_shard``
succeed, does the unshard all-gather, does forward run; which dtype the sharded and the
unsharded parameter have; whether the weight forward receives holds the original packed
bytes; and whether the output matches the layer's own forward without FSDP. A failure of
the stack becomes the row's evidence (exception, stage, raising frame), and the next pair
still runs on the same process group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Alarm, Column, DetailTable, Presentation, cell
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.probes.raised import RaisedStage
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED

# (quant_storage, param_dtype): float and uint8 storage under bf16 mixed precision, then
# bf16 storage under the other float policies; the matching pair first, as the reference.
REFERENCE = ("bfloat16", "bfloat16")
DEFAULT_COMBINATIONS: tuple[tuple[str, str | None], ...] = (
    REFERENCE,
    ("float16", "bfloat16"),
    ("float32", "bfloat16"),
    ("uint8", "bfloat16"),
    ("bfloat16", "float16"),
    ("bfloat16", "float32"),
)
STAGES = ("fully_shard", "unshard (all-gather)", "forward")
# The rank's own shard is a side check (FSDP2 keeps it in the storage dtype); its summary is enough.
LOCAL_SHARD_KEYS = ("dtype", "bytes_equal", "differing_bytes", "differing_elements")
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def label(quant_storage: str, param_dtype: str | None) -> str:
    return f"{SHORT.get(quant_storage, quant_storage)}/{SHORT.get(param_dtype or '', param_dtype) or 'none'}"


def combinations(config: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The pairs to run: ``config['combinations']`` or the defaults, plus the configured
    (quant_storage, param_dtype) pair when it is not among them, so that
    ``reproduce --quant-storage X --param-dtype Y`` always measures X/Y."""
    pairs = [tuple(pair) for pair in config.get("combinations") or DEFAULT_COMBINATIONS]
    own = (config.get("quant_storage", REFERENCE[0]), config.get("param_dtype", REFERENCE[1]))
    if own not in pairs:
        pairs.append(own)
    return pairs


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compare_storage(original, observed) -> dict[str, Any]:
    """Bytes of ``observed`` against the packed ``original``, also across a dtype change.

    Same dtype: the full byte diff. Another dtype of the same byte size: how many bytes
    differ, and whether ``observed`` is exactly ``original`` cast by value (the signature
    of mixed precision applied to packed storage).
    """
    import torch

    from fsdpqdiag.evidence.bytes import diff, plain, raw_bytes

    original, observed = plain(original), plain(observed).to(plain(original).device)
    entry = diff(original, observed)
    entry["dtype"] = _dtype_name(observed.dtype)
    entry["nbytes_original"] = original.numel() * original.element_size()
    entry["nbytes_observed"] = observed.numel() * observed.element_size()
    if entry["comparable"]:
        entry["cast_by_value"] = None
        return entry
    if entry["nbytes_original"] == entry["nbytes_observed"]:
        before, after = raw_bytes(original), raw_bytes(observed)
        entry["differing_bytes"] = int((before != after).sum())
        entry["bytes_equal"] = entry["differing_bytes"] == 0
    else:
        entry["differing_bytes"] = None
    entry["cast_by_value"] = original.numel() == observed.numel() and bool(
        torch.equal(raw_bytes(original.to(observed.dtype)), raw_bytes(observed))
    )
    return entry


def run_combination(base, quant_storage: str, param_dtype: str | None, ctx, evidence: dict) -> dict[str, Any]:
    """One fresh layer through fully_shard, unshard and forward; its row joins ``evidence``."""
    from fsdpqdiag.evidence.bytes import output_delta, plain, sha256
    from fsdpqdiag.probes.common import build_linear4bit, capture_forward_weight, local_shard_of, shard

    cfg = dataclasses.replace(base, quant_storage=quant_storage, param_dtype=param_dtype)
    name = label(quant_storage, param_dtype)
    # Building and the reference forward are not FSDP2: a failure there is unexpected and
    # propagates (ERROR), but the checkpoint still names the combination.
    ctx.checkpoint(f"{name}: build + forward without FSDP", evidence)
    linear, x = build_linear4bit(cfg, ctx.device)
    baseline = linear(x).detach().clone()
    original = plain(linear.weight).clone()
    row: dict[str, Any] = {
        "combination": name,
        "quant_storage": quant_storage,
        "param_dtype": param_dtype,
        "matching": param_dtype is None or param_dtype == quant_storage,
        "packed_dtype": _dtype_name(original.dtype),
        "packed_shape": list(original.shape),
        "packed_sha256": sha256(original),
        "sharded": False,
        "completed_stages": [],
        "failure": None,
    }
    evidence["rows"].append(row)
    captured = None
    try:
        ctx.checkpoint(f"{name}: fully_shard", evidence)
        shard(linear, ctx, cfg)
        row["sharded"] = True
        row["completed_stages"].append(STAGES[0])
        local = linear.weight._local_tensor
        row["sharded_dtype"] = _dtype_name(local.dtype)
        shard_bytes = compare_storage(local_shard_of(original, ctx.rank, ctx.world_size), local)
        row["local_shard"] = {key: shard_bytes.get(key) for key in LOCAL_SHARD_KEYS}

        ctx.checkpoint(f"{name}: unshard (all-gather)", evidence)
        linear.unshard()
        row["completed_stages"].append(STAGES[1])
        row["unsharded_dtype"] = _dtype_name(linear.weight.dtype)

        captured, handle = capture_forward_weight(linear)
        ctx.checkpoint(f"{name}: forward", evidence)
        try:
            after = linear(x).detach().clone()
        finally:
            handle.remove()
        row["completed_stages"].append(STAGES[2])
        row["output"] = output_delta(baseline, after)
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is this row's finding
        row["failure"] = RaisedStage.of(exc, STAGES[len(row["completed_stages"])]).to_dict()
    # Taken even when forward raised: the pre-hook ran first, so this is what it refused.
    if captured is not None and captured.tensor is not None:
        row["forward_weight"] = compare_storage(original, captured.tensor)
        row["forward_weight"].update(captured.describe())
    forward_weight = row.get("forward_weight") or {}
    output = row.get("output") or {}
    row["bytes_preserved"] = bool(forward_weight.get("bytes_equal")) if forward_weight else None
    # Equal values in the policy's dtype are preserved output (see bytes.output_delta).
    row["output_preserved"] = (
        bool(output.get("output_bit_equal") or output.get("output_value_equal")) if output else None
    )
    row["preserved"] = (
        row["failure"] is None and bool(row["bytes_preserved"]) and bool(row["output_preserved"])
    )
    # diff() keeps up to 8192 positions per comparison; the verdict needs none, and six
    # rows of them would swamp the report (positions_digest still identifies them).
    row.get("forward_weight", {}).pop("positions", None)
    del linear, baseline, original, captured
    return row


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.core.config import LinearConfig

    fields = {f.name for f in dataclasses.fields(LinearConfig)}
    base = LinearConfig(**{k: v for k, v in config.items() if k in fields})
    evidence: dict[str, Any] = {"rows": []}
    for quant_storage, param_dtype in combinations(config):
        run_combination(base, quant_storage, param_dtype, ctx, evidence)
    return evidence


def describe_row(row: dict[str, Any]) -> str:
    """One phrase: how a combination ended."""
    failure = row.get("failure")
    weight = row.get("forward_weight") or {}
    parts = []
    if failure:
        parts.append(f"{failure['stage']} raised {failure['exception']}")
    if weight and not weight.get("bytes_equal"):
        packed, seen = row["packed_dtype"], weight["dtype"]
        change = f"{packed}→{seen}" if seen != packed else packed
        if weight.get("cast_by_value"):
            how = "cast by value"
        elif weight.get("differing_bytes") is not None:
            how = f"{weight['differing_bytes']} bytes differ"
        else:
            how = f"{weight['nbytes_original']} B became {weight['nbytes_observed']} B"
        parts.append(f"forward weight {change} ({how})")
    output = row.get("output") or {}
    if output and not output.get("output_bit_equal"):
        parts.append(f"max |Δy| {output.get('max_abs_delta')}")
    return ", ".join(parts) if parts else "bytes and output preserved"


def _agreement_key(evidence: dict) -> tuple:
    return tuple(
        (
            row["combination"],
            row["preserved"],
            row["sharded"],
            row.get("unsharded_dtype"),
            (row.get("failure") or {}).get("exception"),
            (row.get("forward_weight") or {}).get("differing_bytes"),
            (row.get("output") or {}).get("max_abs_delta"),
        )
        for row in evidence.get("rows", [])
    )


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    failed = failure_verdict(outcomes, keep_evidence=True)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    evidence["ranks_agree"] = ranks_agree(outcomes, _agreement_key)
    # A combination breaks if it breaks on any rank; rank 0's row describes it unless
    # another rank's is the broken one.
    broken: dict[str, dict] = {}
    for outcome in outcomes:
        for row in outcome.evidence["rows"]:
            if not row["preserved"] and row["combination"] not in broken:
                broken[row["combination"]] = row
    rows = evidence["rows"]
    failing = [row["combination"] for row in rows if not row["matching"] and row["combination"] in broken]
    evidence["failing_combinations"] = failing
    reference = [row for row in rows if row["matching"]]
    ref_note = "; ".join(
        f"matching {row['combination']}: {describe_row(broken.get(row['combination'], row))}"
        for row in reference
    )
    mismatched = [row for row in rows if not row["matching"]]
    if failing:
        details = "; ".join(f"{name}: {describe_row(broken[name])}" for name in failing)
        kept = [row["combination"] for row in mismatched if row["combination"] not in broken]
        kept_note = f"; preserved: {', '.join(kept)}" if kept else ""
        return Verdict(
            REPRODUCED,
            f"{len(failing)} of {len(mismatched)} mismatched storage/param pairs break: {details}{kept_note}"
            + (f" ({ref_note})" if ref_note else ""),
            evidence,
        )
    return Verdict(
        NOT_REPRODUCED,
        f"all {len(mismatched)} mismatched storage/param pairs shard, keep every byte and the output"
        + (f" ({ref_note})" if ref_note else ""),
        evidence,
    )


def attribute(evidence: dict) -> tuple[str, list[str]]:
    """The matching-dtype rows are the controls: same layer, same FSDP2 call, only the
    storage/param dtype pair differs."""
    from fsdpqdiag.evidence import attribution

    rows = evidence.get("rows") or []
    references = [row for row in rows if row["matching"]]
    failing = evidence.get("failing_combinations") or []
    if not references or not failing:
        return attribution.UNDETERMINED, [f"the run ended in {evidence.get('stage') or 'setup'}"]
    kept = all(row["preserved"] for row in references)
    said = [
        f"control: matching pair {row['combination']} {'kept' if row['preserved'] else 'broke'}"
        for row in references
    ]
    if not kept:
        return attribution.UNDETERMINED, [*said, "the matching pair breaks too"]
    return attribution.TORCH_FSDP, [
        *said,
        f"mismatched pairs break ({', '.join(failing)}): FSDP2's MixedPrecisionPolicy casts float packed "
        "storage to param_dtype by value (init_dtype_attrs exempts only non-float parameters); "
        "bitsandbytes documents quant_storage == model dtype for FSDP",
    ]


# The priorities say what an 80-column log keeps.
DETAIL_COLUMNS = (
    Column("storage/params"),
    Column("dtype sharded → forward", priority=2),
    Column("failure"),
    Column("forward weight bytes", priority=1),
    Column("max |Δy|", priority=3),
    Column("preserved"),
)


def key_numbers(evidence: dict) -> str:
    """How a result reads: how many mismatched pairs break (and a row per combination, :func:`detail`)."""
    failing = evidence.get("failing_combinations") or []
    mismatched = sum(not row["matching"] for row in evidence.get("rows", []))
    return f"{len(failing)} of {mismatched} mismatched pairs break" + (
        f": {', '.join(failing)}" if failing else ""
    )


def detail(evidence: dict) -> DetailTable | None:
    """A row per (quant_storage, param_dtype) combination it tried."""
    rows = evidence.get("rows")
    if not rows:
        return None
    return DetailTable(DETAIL_COLUMNS, [_cells(row) for row in rows])


def _cells(row: dict) -> list[str]:
    failure = row.get("failure")
    weight = row.get("forward_weight") or {}
    if not weight:
        weight_cell = "–"
    elif weight.get("bytes_equal"):
        weight_cell = "equal"
    elif weight.get("cast_by_value"):
        weight_cell = "cast by value"
    elif weight.get("differing_bytes") is not None:
        weight_cell = f"{weight['differing_bytes']} B differ"
    else:
        weight_cell = f"{weight.get('nbytes_original')} B → {weight.get('nbytes_observed')} B"
    forward_dtype = weight.get("dtype") or row.get("unsharded_dtype")
    return [
        row["combination"] + (" (matching)" if row.get("matching") else ""),
        f"{row.get('sharded_dtype') or '–'} → {forward_dtype or '–'}",
        f"{failure['stage']}: {failure['exception']}" if failure else "–",
        weight_cell,
        cell((row.get("output") or {}).get("max_abs_delta")),
        "yes" if row.get("preserved") else Alarm("NO"),
    ]


PROBE = Probe(
    name="storage-dtype-mismatch",
    description=(
        "quant_storage != FSDP2 param_dtype (fp16/fp32/uint8 vs bf16 and the reverse): "
        "does it shard, and are bytes and output kept?"
    ),
    run=run,
    verdict=verdict,
    needs=Needs(),
    standalone="reproducers/storage_dtype_mismatch.py",
    attribute=attribute,
    controls=("cast-mismatched-storage",),
    presentation=Presentation(key_numbers, detail, reads=frozenset({"failing_combinations", "rows"})),
)
