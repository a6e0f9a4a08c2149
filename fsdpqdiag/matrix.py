"""The configuration-invariance matrix of bitsandbytes #1945, computed instead of argued.

A cell is a composition of small sharding choices (wrap granularity, mixed-precision
policy, ``cast_forward_inputs``, ``reshard_after_forward``) over a model built from a
quantization choice (double quant, storage dtype, quant type). All cells of one world
size run in one launch: each rank loads and quantizes a build once, deep-copies it per
cell, shards the copy and takes a forward-only loss. Each finished cell is checkpointed;
if a cell kills the launch, the sweep records it and relaunches from the next cell.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fsdpqdiag.config import QUANT_TYPES, canonical_dtype

MP_POLICIES = {"bf16/fp32": ("bfloat16", "float32"), "bf16/bf16": ("bfloat16", "bfloat16"), "none": None}
WRAPS = ("layer", "linear", "root")
GRID_DIMENSIONS = {
    "quant_storage": ("bf16", "fp16", "fp32", "uint8"),
    "quant_type": QUANT_TYPES,
    "reshard_after_forward": ("true", "false"),
    "double_quant": ("true", "false"),
    "mp": tuple(MP_POLICIES),
    "wrap": WRAPS,
}
# The dimensions whose invariance is analysed (world size and device are one launch each).
DIMENSIONS = (
    "wrap",
    "mp",
    "cast_forward_inputs",
    "double_quant",
    "quant_storage",
    "quant_type",
    "reshard_after_forward",
)


@dataclass(frozen=True)
class Cell:
    name: str
    wrap: str = "layer"
    mp: str = "bf16/fp32"
    cast_forward_inputs: bool = True
    reshard_after_forward: bool = True
    double_quant: bool = True
    quant_storage: str = "bfloat16"
    quant_type: str = "nf4"

    def build_key(self) -> tuple:
        return (self.double_quant, self.quant_storage, self.quant_type)

    def describe(self) -> str:
        other = []
        if not self.cast_forward_inputs:
            other.append("cast_forward_inputs=False")
        if not self.double_quant:
            other.append("double_quant=False")
        if not self.reshard_after_forward:
            other.append("reshard_after_forward=False")
        if self.quant_storage != "bfloat16":
            other.append(f"quant_storage={self.quant_storage}")
        if self.quant_type != "nf4":
            other.append(f"quant_type={self.quant_type}")
        return ", ".join(other)


# bitsandbytes #1945's cells A–G.
DEFAULT_CELLS = (
    Cell("A"),
    Cell("B", mp="none"),
    Cell("C", mp="bf16/bf16"),
    Cell("D", wrap="linear"),
    Cell("E", wrap="root"),
    Cell("F", double_quant=False),
    Cell("G", cast_forward_inputs=False),
)


def _parse_value(dimension: str, value: str):
    if dimension == "quant_storage":
        return canonical_dtype(value)
    if dimension in ("reshard_after_forward", "double_quant"):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{dimension} takes true or false, not {value!r}")
        return value.lower() == "true"
    if dimension == "quant_type" and value not in QUANT_TYPES:
        raise ValueError(f"unknown quant type {value!r} (known: {', '.join(QUANT_TYPES)})")
    if dimension == "mp" and value not in MP_POLICIES:
        raise ValueError(f"unknown mp policy {value!r} (known: {', '.join(MP_POLICIES)})")
    if dimension == "wrap" and value not in WRAPS:
        raise ValueError(f"unknown wrap {value!r} (known: {', '.join(WRAPS)})")
    return value


def select_cells(names: Sequence[str] = (), grid: Sequence[str] = ()) -> list[Cell]:
    """The default cells (or those named), or cell A expanded over ``--grid dim=v1,v2``."""
    if grid:
        axes = []
        seen: dict[str, str] = {}
        for spec in grid:
            dimension, _, values = spec.partition("=")
            if dimension not in GRID_DIMENSIONS or not values:
                raise ValueError(
                    f"bad --grid {spec!r}: use DIM=v1,v2 with DIM one of {', '.join(GRID_DIMENSIONS)}"
                )
            # Two specs of one dimension would be merged into one cell by keyword, silently:
            # which values were meant is the user's to say.
            if dimension in seen:
                raise ValueError(
                    f"bad --grid {spec!r}: {dimension} is already given by {seen[dimension]!r}; "
                    f"list all its values once ({dimension}=v1,v2)"
                )
            seen[dimension] = spec
            # A value given twice (bf16,bfloat16) is one cell: repeats are merged.
            parsed = dict.fromkeys(_parse_value(dimension, v) for v in values.split(","))
            axes.append([(dimension, value) for value in parsed])
        cells = []
        for combo in itertools.product(*axes):
            label = ",".join(f"{d}={v}" for d, v in combo)
            cells.append(replace(DEFAULT_CELLS[0], name=f"A[{label}]", **dict(combo)))
        return cells
    known = {cell.name: cell for cell in DEFAULT_CELLS}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown cell {name!r} (known: {', '.join(known)})")
    return [known[n] for n in dict.fromkeys(names)] if names else list(DEFAULT_CELLS)


@dataclass(frozen=True)
class MatrixConfig:
    cells: list[dict]
    model: str | None = None  # a local model directory; None: the preset
    preset: str = "tiny-llama"
    lora: bool = True
    batch: int = 2
    seq_len: int = 32
    input_seed: int = 123
    out_dir: str | None = None


def _float_bits(value: float) -> str:
    return struct.pack(">f", value).hex()


# --- on the ranks -------------------------------------------------------------------


def _shard(model, cell: Cell, mesh) -> int:
    """fully_shard by the cell's wrap granularity; returns the number of FSDP units."""
    import bitsandbytes as bnb
    import torch

    from fsdpqdiag import models
    from fsdpqdiag.probes.common import fsdp_api

    fully_shard, MixedPrecisionPolicy = fsdp_api()
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": cell.reshard_after_forward}
    dtypes = MP_POLICIES[cell.mp]
    # Cell B passes mp_policy=None literally, as #1945 did, and records what FSDP2 does.
    kwargs["mp_policy"] = (
        None
        if dtypes is None
        else MixedPrecisionPolicy(
            param_dtype=getattr(torch, dtypes[0]),
            reduce_dtype=getattr(torch, dtypes[1]),
            cast_forward_inputs=cell.cast_forward_inputs,
        )
    )
    if cell.wrap == "layer":
        units = models.decoder_layers(model)
    elif cell.wrap == "linear":
        units = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    else:
        units = []
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return len(units) + 1


def _quantized_modules(model) -> list[tuple[str, Any]]:
    import bitsandbytes as bnb

    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    ]


def _run_cell(cell: Cell, base, original: dict, ids, baseline: float, mesh) -> dict[str, Any]:
    import torch

    from fsdpqdiag.bytes import diff, plain

    model = copy.deepcopy(base)
    units = _shard(model, cell, mesh)
    captured: dict[str, torch.Tensor] = {}
    hooks = []

    def capture(name: str):
        # A pre-hook that returned the tensor would replace forward's input: return None.
        def hook(module, args) -> None:
            captured.setdefault(name, plain(module.weight).clone())

        return hook

    for name, module in _quantized_modules(model):
        hooks.append(module.register_forward_pre_hook(capture(name)))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss.float())
    for hook in hooks:
        hook.remove()
    differing = nan_class = 0
    patterns: dict[str, int] = {}
    first_module = None
    for name, before in original.items():
        after = captured.get(name)
        if after is None:
            continue
        result = diff(before, after)
        if not result.get("comparable", True):
            differing += before.numel()
            first_module = first_module or name
            continue
        differing += result["differing_elements"]
        nan_class += result["original_classes"].get("qNaN", 0) + result["original_classes"].get("sNaN", 0)
        for pattern, count in result["post_bit_patterns"].items():
            patterns[pattern] = patterns.get(pattern, 0) + count
        if result["differing_elements"] and first_module is None:
            first_module = name
    delta = loss - baseline
    return {
        "status": "ok",
        "fsdp_units": units,
        "loss_fsdp2": loss,
        "loss_fsdp2_bits": _float_bits(loss),
        "loss_baseline": baseline,
        "delta": delta,
        "relative_delta": delta / baseline if baseline else None,
        "loss_bit_equal": _float_bits(loss) == _float_bits(baseline),
        "differing_elements": differing,
        "differing_nan_class": nan_class,
        "post_bit_patterns": patterns,
        "first_altered_module": first_module,
        "weights_compared": len(captured),
    }


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag import models
    from fsdpqdiag.bytes import plain

    cfg = MatrixConfig(**config)
    cells = [Cell(**c) for c in cfg.cells]
    path = models.resolve_model(cfg.model, cfg.preset)
    mesh = ctx.mesh()
    builds: dict[tuple, tuple] = {}
    evidence: dict[str, Any] = {"cells": {}}
    for cell in cells:
        ctx.checkpoint(cell.name, evidence)
        if cell.build_key() not in builds:
            quant = models.QuantConfig(
                quant_type=cell.quant_type, double_quant=cell.double_quant, quant_storage=cell.quant_storage
            )
            base = models.load_quantized(path, quant, ctx.device)
            if cfg.lora:
                base = models.apply_lora(base)
            ids = models.fixed_input(base.config.vocab_size, cfg.batch, cfg.seq_len, cfg.input_seed).to(
                ctx.device
            )
            original = {n: plain(m.weight).clone() for n, m in _quantized_modules(base)}
            with torch.no_grad():
                baseline = float(copy.deepcopy(base)(input_ids=ids, labels=ids).loss.float())
            builds = {cell.build_key(): (base, original, ids, baseline)}  # keep one build alive
        base, original, ids, baseline = builds[cell.build_key()]
        try:
            row = _run_cell(cell, base, original, ids, baseline, mesh)
        except Exception as exc:  # noqa: BLE001 - a cell that raises is a row, as #1945's cell B
            row = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "loss_baseline": baseline}
        evidence["cells"][cell.name] = row
        if cfg.out_dir and ctx.rank == 0:
            append_line(Path(cfg.out_dir), cell, row, ctx.world_size)
    ctx.checkpoint("done", evidence)
    return evidence


def verdict(outcomes):
    from fsdpqdiag.probes.base import Verdict, failure_verdict

    # The sweep reads the per-cell rows itself; this only summarises the launch.
    failed = failure_verdict(outcomes)
    evidence = dict(outcomes[0].evidence)
    if failed is not None:
        failed.evidence.update(evidence)
        return failed
    return Verdict("NOT REPRODUCED", f"{len(evidence.get('cells', {}))} cells", evidence)


def cell_attribution(row: dict) -> tuple[str, list[str]]:
    """A cell runs no control of its own; its byte signature says whose copy altered the
    weights: NaN-class containers only, all rewritten, is a float-value copy in the unshard
    (the nan-canonicalization probe's plain-parameter control decides that for one layer)."""
    from fsdpqdiag import attribution

    altered, nan_class = row.get("differing_elements") or 0, row.get("differing_nan_class") or 0
    if row.get("status") != "ok" or not altered:
        return attribution.UNDETERMINED, ["a cell runs no control that separates the suspects"]
    patterns = ", ".join(row.get("post_bit_patterns") or {}) or "other bits"
    said = (
        f"{nan_class} of {altered} altered elements were NaN-class containers, now {patterns}; "
        f"first in {row.get('first_altered_module')}"
    )
    if nan_class == altered:
        return attribution.TORCH_FSDP, [said, "byte signature of a float-value copy (no control in the cell)"]
    return attribution.UNDETERMINED, [said]


def _probe():
    from fsdpqdiag.probes.base import Needs, Probe

    return Probe(
        "matrix",
        "the configuration-invariance sweep of #1945",
        run,
        verdict,
        Needs(("bitsandbytes",)),
        attribute=cell_attribution,
    )


# --- the sweep (parent side) --------------------------------------------------------


def cell_verdict(row: dict) -> str:
    if row.get("status") == "error":
        return "ERROR"
    if row.get("status") == "unsupported":  # the preflight refused the stack (api.matrix)
        return "UNSUPPORTED"
    if row.get("status") in ("crashed", "timeout"):
        return row["status"].upper()
    altered = row.get("differing_elements", 0) > 0
    if altered and not row.get("loss_bit_equal"):
        return "REPRODUCED"
    if not altered and row.get("loss_bit_equal"):
        return "NOT REPRODUCED"
    return "INCONCLUSIVE"


# --- the sweep's record: cells.jsonl ----------------------------------------------------
#
# The first line is a header holding the sweep's plan (which cells, world sizes, device,
# model, ...), written by rename before any cell, so it is never torn; then one line per
# finished cell, appended by rank 0 (or by the launcher for a cell that killed its launch).
# A kill can tear only the line being appended: the cell in flight.

RECORD_NAME = "cells.jsonl"
REJECTED_NAME = "cells.rejected.jsonl"
SWEEP_HEADER = "fsdpqdiag_sweep"
SWEEP_VERSION = 1
ROW_STATUSES = ("ok", "error", "crashed", "timeout")


class SweepRecordError(ValueError):
    """A cells.jsonl whose header is missing or damaged: the sweep's plan is unknown."""


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep runs, as recorded in its header; ``--resume`` runs exactly this."""

    cells: list[dict]
    world_sizes: list[int]
    device: str
    backend: str
    model: str | None  # an absolute model directory, or None for the preset
    preset: str
    lora: bool
    inject: str | None

    def header_line(self) -> str:
        return json.dumps({SWEEP_HEADER: SWEEP_VERSION, **asdict(self)}, allow_nan=False) + "\n"

    def cell_list(self) -> list[Cell]:
        return [Cell(**c) for c in self.cells]


@dataclass
class RecoveredSweep:
    """A sweep read back: its plan, its valid records, and what had to be set aside."""

    plan: SweepPlan
    done: dict[tuple[str, int], dict]
    valid_lines: list[bytes]
    torn_tail: bytes = b""
    rejected: list[dict] = field(default_factory=list)

    def needs_repair(self) -> bool:
        return bool(self.torn_tail or self.rejected)

    def summary(self) -> dict[str, Any]:
        return {
            "recorded_cells": len(self.done),
            "torn_line_truncated": bool(self.torn_tail),
            "rejected_records": [{"line": r["line"], "reason": r["reason"]} for r in self.rejected],
        }


def start_record(out_dir: Path, plan: SweepPlan) -> None:
    from fsdpqdiag.report import atomic_write_text

    atomic_write_text(out_dir / RECORD_NAME, plan.header_line())


def append_line(out_dir: Path, cell: Cell, row: dict, world_size: int) -> None:
    """One JSON line per finished cell, in one write: a crash can cost at most this line."""
    line = json.dumps({"cell": asdict(cell), "world_size": world_size, "row": row}, allow_nan=False)
    fd = os.open(out_dir / RECORD_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _plan_from_header(line: bytes) -> SweepPlan:
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get(SWEEP_HEADER) != SWEEP_VERSION:
        raise SweepRecordError(
            f"its first line is not a version-{SWEEP_VERSION} sweep header (written by another "
            "fsdpqdiag, or not a sweep record): start the sweep again with --out"
        )
    fields = {k: v for k, v in data.items() if k != SWEEP_HEADER}
    try:
        plan = SweepPlan(**fields)
        cells = plan.cell_list()
    except TypeError as exc:
        raise SweepRecordError(f"its header is damaged ({exc})") from None
    sizes_ok = isinstance(plan.world_sizes, list) and all(
        isinstance(ws, int) and not isinstance(ws, bool) and ws >= 1 for ws in plan.world_sizes
    )
    if not cells or not sizes_ok or not isinstance(plan.lora, bool):
        raise SweepRecordError("its header is damaged (cells, world sizes or lora of the wrong type)")
    return plan


def _record_problem(item: Any, plan: SweepPlan) -> str | None:
    """Why a line is not a finished cell of this sweep (None when it is one)."""
    if not isinstance(item, dict) or not {"cell", "world_size", "row"} <= item.keys():
        return "not a cell record (needs cell, world_size, row)"
    cell, world_size, row = item["cell"], item["world_size"], item["row"]
    if not isinstance(cell, dict) or cell not in plan.cells:
        return "its cell is not one of this sweep's cells"
    if isinstance(world_size, bool) or world_size not in plan.world_sizes:
        return f"world size {world_size!r} is not one of this sweep's"
    if not isinstance(row, dict) or row.get("status") not in ROW_STATUSES:
        return f"its row has no status among {', '.join(ROW_STATUSES)}"
    if row["status"] == "ok":
        numbers = ("loss_fsdp2", "loss_baseline", "differing_elements")
        if any(isinstance(row.get(k), bool) or not isinstance(row.get(k), (int, float)) for k in numbers):
            return f"an ok row without numeric {', '.join(numbers)}"
        if not isinstance(row.get("loss_bit_equal"), bool):
            return "an ok row without loss_bit_equal"
    return None


def recover(out_dir: Path) -> RecoveredSweep:
    """Read a sweep's record back without changing it: the plan, every valid record (the
    first of duplicates), a torn last line cut off, and each bad line with its reason."""
    data = (out_dir / RECORD_NAME).read_bytes()
    complete = data.rfind(b"\n") + 1
    torn_tail = data[complete:]
    lines = data[:complete].split(b"\n")[:-1]
    if not lines:
        raise SweepRecordError("it holds no complete header line")
    plan = _plan_from_header(lines[0])
    recovered = RecoveredSweep(plan=plan, done={}, valid_lines=[lines[0]], torn_tail=torn_tail)
    first_seen: dict[tuple[str, int], int] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            item = json.loads(line)
        except ValueError:
            item, problem = None, "not JSON"
        else:
            problem = _record_problem(item, plan)
        if problem is None:
            key = (item["cell"]["name"], item["world_size"])
            if key in first_seen:
                problem = (
                    f"a second record of cell {key[0]} at world size {key[1]} (first: line {first_seen[key]})"
                )
            else:
                first_seen[key] = number
                recovered.done[key] = item
                recovered.valid_lines.append(line)
                continue
        recovered.rejected.append({"line": number, "reason": problem, "text": line.decode(errors="replace")})
    return recovered


def repair(out_dir: Path, recovered: RecoveredSweep) -> None:
    """Set aside what ``recover`` rejected, losing nothing: the bad lines and the torn tail go
    to cells.rejected.jsonl first, then cells.jsonl is replaced (by rename) with its header
    and valid records, so the next record starts on a line of its own."""
    from fsdpqdiag.report import atomic_write_bytes

    if not recovered.needs_repair():
        return
    set_aside = list(recovered.rejected)
    if recovered.torn_tail:
        set_aside.append(
            {"line": None, "reason": "torn last line", "text": recovered.torn_tail.decode(errors="replace")}
        )
    fd = os.open(out_dir / REJECTED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, "".join(json.dumps(item) + "\n" for item in set_aside).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic_write_bytes(out_dir / RECORD_NAME, b"".join(line + b"\n" for line in recovered.valid_lines))


def sweep(
    cells: list[Cell],
    run,
    base_config: dict[str, Any],
    execute: Callable,
    isolate: bool = False,
    done: dict[tuple[str, int], dict] | None = None,
    on_cell: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Every cell's row at one world size: one launch for all cells, relaunching after a
    crash from the next cell (or one launch per cell with ``isolate``)."""
    from fsdpqdiag.config import RankTask

    rows: dict[str, dict] = {}
    for cell in cells:
        if done and (cell.name, run.world_size) in done:
            rows[cell.name] = done[(cell.name, run.world_size)]["row"]
            if on_cell:
                on_cell(cell.name, rows[cell.name])
    pending = [c for c in cells if c.name not in rows]
    while pending:
        batch = pending[:1] if isolate else pending
        config = {**base_config, "cells": [asdict(c) for c in batch]}
        reported: set[str] = set()

        def watch(written: dict, batch_names=frozenset(c.name for c in batch), reported=reported) -> None:
            # Rank 0 checkpoints every finished cell: report it while the launch runs.
            for name, row in ((written.get("evidence") or {}).get("cells") or {}).items():
                if name in batch_names and name not in reported:
                    reported.add(name)
                    if on_cell:
                        on_cell(name, row)

        task = RankTask(probe="matrix", probe_config=config, run=run)
        if "watch" in inspect.signature(execute).parameters:
            outcomes = execute(task, watch=watch)
        else:
            outcomes = execute(task)
        finished = outcomes[0].evidence.get("cells", {})
        for cell in batch:
            if cell.name in finished:
                rows[cell.name] = finished[cell.name]
                if on_cell and cell.name not in reported:
                    on_cell(cell.name, rows[cell.name])
        if all(c.name in finished for c in batch):
            pending = pending[len(batch) :]
            continue
        # The launch ended inside the first unfinished cell: that cell is the casualty.
        casualty = next(c for c in batch if c.name not in finished)
        failed = next((o for o in outcomes if o.status != "ok"), outcomes[0])
        row = {
            "status": failed.status if failed.status in ("crashed", "timeout") else "error",
            "signal": failed.signal,
            "error": (failed.error or "").strip().splitlines()[-1:] or None,
        }
        if isinstance(row["error"], list):
            row["error"] = row["error"][0] if row["error"] else None
        if failed.python_stack:
            row["python_stack"] = failed.python_stack
        rows[casualty.name] = row
        if base_config.get("out_dir"):
            append_line(Path(base_config["out_dir"]), casualty, row, run.world_size)
        if on_cell:
            on_cell(casualty.name, row)
        pending = [c for c in pending if c.name not in rows]
    return rows


# --- invariance analysis (pure) -------------------------------------------------------


def outcome_key(row: dict) -> tuple:
    if row.get("status") != "ok":
        return ("failed", row.get("status"))
    return (
        row.get("loss_fsdp2_bits"),
        row.get("differing_elements"),
        tuple(sorted((row.get("post_bit_patterns") or {}).items())),
    )


def invariance(table: list[dict], dimensions: Sequence[str] = DIMENSIONS) -> dict[str, Any]:
    """For each dimension: invariant / depends / untested, with the supporting cell pairs.

    ``table`` rows hold the cell's dimension values, ``name`` and ``outcome`` (any
    hashable). Two cells support a claim about a dimension when they differ in it alone.
    """
    result: dict[str, Any] = {}
    for dimension in dimensions:
        pairs_same, pairs_diff, not_comparable = [], [], set()
        for a, b in itertools.combinations(table, 2):
            if a.get(dimension) == b.get(dimension):
                continue
            if any(a.get(d) != b.get(d) for d in dimensions if d != dimension):
                continue
            # A cell that raised or crashed measured nothing: it neither supports nor refutes.
            failed = [row["name"] for row in (a, b) if not row.get("comparable", True)]
            if failed:
                not_comparable.update(failed)
                continue
            (pairs_same if a["outcome"] == b["outcome"] else pairs_diff).append([a["name"], b["name"]])
        status = "depends" if pairs_diff else "invariant" if pairs_same else "untested"
        result[dimension] = {
            "status": status,
            "same_outcome": pairs_same,
            "different_outcome": pairs_diff,
            "not_comparable": sorted(not_comparable),
        }
    invariant = [d for d, v in result.items() if v["status"] == "invariant"]
    depends = [d for d, v in result.items() if v["status"] == "depends"]
    result["summary"] = (
        f"Invariant in: {', '.join(invariant) or 'nothing tested'}; "
        f"Depends on: {', '.join(depends) or 'nothing'}"
    )
    return result


def table_rows(cells: list[Cell], rows: dict[str, dict], by_verdict: bool = False) -> list[dict]:
    table = []
    for cell in cells:
        row = rows.get(cell.name, {})
        values = asdict(cell)
        values["outcome"] = cell_verdict(row) if by_verdict else outcome_key(row)
        values["comparable"] = row.get("status") == "ok"
        table.append(values)
    return table


def dataframe(cells: list[Cell], rows_by_ws: dict[int, dict[str, dict]]):
    import pandas as pd

    records = []
    for world_size, rows in rows_by_ws.items():
        for cell in cells:
            row = rows.get(cell.name, {})
            records.append(
                {
                    "cell": cell.name,
                    "world_size": world_size,
                    **{k: v for k, v in asdict(cell).items() if k != "name"},
                    "verdict": cell_verdict(row) if row else "MISSING",
                    **{
                        k: row.get(k)
                        for k in (
                            "fsdp_units",
                            "loss_baseline",
                            "loss_fsdp2",
                            "delta",
                            "relative_delta",
                            "loss_bit_equal",
                            "differing_elements",
                            "differing_nan_class",
                            "first_altered_module",
                            "error",
                        )
                    },
                    "post_bit_patterns": json.dumps(row.get("post_bit_patterns") or {}),
                }
            )
    return pd.DataFrame.from_records(records)
