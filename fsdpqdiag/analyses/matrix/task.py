"""The matrix's rank task: one cell, sharded and run forward on every rank.

The sweep hands a launch its cells as a batch (``fsdpqdiag.launcher.batch``), one task item per
cell. Loading and quantizing the model costs more than a cell, so each rank keeps the last
build (its quantized model, original weight bytes, input and baseline loss) for the cells
after it that share its quantization choice; each cell shards a deep copy of it.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdpqdiag.analyses.matrix.cells import MP_OMITTED, MP_POLICIES, Cell, cell_verdict
from fsdpqdiag.analyses.matrix.record import append_line
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict

NAME = "matrix"


@dataclass(frozen=True)
class MatrixConfig:
    cell: dict
    model: str | None = None  # a local model directory; None: the preset
    preset: str = "tiny-llama"
    lora: bool = True
    batch: int = 2
    seq_len: int = 32
    input_seed: int = 123
    out_dir: str | None = None


def _float_bits(value: float) -> str:
    return struct.pack(">f", value).hex()


def _fsdp_kwargs(cell: Cell) -> dict[str, Any]:
    """The cell's ``fully_shard`` arguments but the mesh: its mixed precision and resharding."""
    import torch

    from fsdpqdiag.probes.common import fsdp_api

    _, MixedPrecisionPolicy = fsdp_api()
    kwargs: dict[str, Any] = {"reshard_after_forward": cell.reshard_after_forward}
    dtypes = MP_POLICIES[cell.mp]
    if dtypes == MP_OMITTED:  # FSDP2's own default
        return kwargs
    # Cell B passes mp_policy=None literally, as #1945 did, and records what FSDP2 does.
    kwargs["mp_policy"] = (
        None
        if dtypes is None
        else MixedPrecisionPolicy(
            param_dtype=getattr(torch, dtypes[0]) if dtypes[0] else None,
            reduce_dtype=getattr(torch, dtypes[1]) if dtypes[1] else None,
            cast_forward_inputs=cell.cast_forward_inputs,
        )
    )
    return kwargs


# Exceptions by which FSDP2 rejects an argument it cannot use (mp_policy=None dies on
# ``None.param_dtype`` in its lazy init): raised in its own code, they are its answer.
_REFUSALS = (AttributeError, TypeError, ValueError)
_FSDP_CODE = "torch/distributed/fsdp/"


def failed_row(exc: BaseException, baseline: float) -> dict[str, Any]:
    """The row of a cell that raised: ``refused`` where FSDP2's own code rejected the
    configuration (with the file, relative to torch's package, and function it raised in),
    else ``error``."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = frames[-1] if frames else None
    file = where.filename.replace("\\", "/") if where else ""
    inside = _FSDP_CODE in file
    message = f"{type(exc).__name__}: {exc}"
    row: dict[str, Any] = {"status": "error", "error": message, "loss_baseline": baseline}
    if where is not None:
        # From "torch/" on: the path of the package, not of the machine it ran on.
        relative = file[file.rfind("torch/") :] if "torch/" in file else file.rsplit("/", 1)[-1]
        row["raised_at"] = {"file": relative, "function": where.name}
        if inside and isinstance(exc, _REFUSALS):
            row["status"] = "refused"
            # The file's name only: the message is a table cell; raised_at keeps its path.
            row["error"] += f" (FSDP2 refused it in {relative.rsplit('/', 1)[-1]}, {where.name})"
    return row


def _shard(model, cell: Cell, mesh) -> int:
    """fully_shard by the cell's wrap granularity; returns the number of FSDP units."""
    import bitsandbytes as bnb

    from fsdpqdiag.probes.common import fsdp_api
    from fsdpqdiag.stack import models

    fully_shard, _ = fsdp_api()
    kwargs = {"mesh": mesh, **_fsdp_kwargs(cell)}
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

    from fsdpqdiag.evidence.bytes import diff, plain

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
    altered: list[str] = []
    for name, before in original.items():
        after = captured.get(name)
        if after is None:
            continue
        result = diff(before, after)
        if not result.get("comparable", True):
            differing += before.numel()
            altered.append(name)
            first_module = first_module or name
            continue
        differing += result["differing_elements"]
        nan_class += result["original_classes"].get("qNaN", 0) + result["original_classes"].get("sNaN", 0)
        for pattern, count in result["post_bit_patterns"].items():
            patterns[pattern] = patterns.get(pattern, 0) + count
        if result["differing_elements"]:
            altered.append(name)
            first_module = first_module or name
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
        "altered_modules": altered,
    }


# This rank's one live build, reused by the next cell of the same quantization choice
# (and the same model, input and device): {key: (base, original, ids, baseline)}.
_build: dict[tuple, tuple] = {}


def _built(cfg: MatrixConfig, cell: Cell, ctx) -> tuple:
    import torch

    from fsdpqdiag.evidence.bytes import plain
    from fsdpqdiag.stack import models

    key = (
        cell.build_key(),
        cfg.model,
        cfg.preset,
        cfg.lora,
        cfg.batch,
        cfg.seq_len,
        cfg.input_seed,
        str(ctx.device),
    )
    if key not in _build:
        _build.clear()  # keep one build alive
        path = models.resolve_model(cfg.model, cfg.preset)
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
        _build[key] = (base, original, ids, baseline)
    return _build[key]


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    """One cell's row (rank 0 appends it to the sweep's record as it finishes)."""
    cfg = MatrixConfig(**config)
    cell = Cell(**cfg.cell)
    ctx.checkpoint(cell.name, {})
    base, original, ids, baseline = _built(cfg, cell, ctx)
    try:
        row = _run_cell(cell, base, original, ids, baseline, ctx.mesh())
    except Exception as exc:  # noqa: BLE001 - a cell that raises is a row, as #1945's cell B
        row = failed_row(exc, baseline)
    else:
        ctx.checkpoint(f"{cell.name}: control: {CONTROL}", row)
        control = _plain_control(cell, row, original, ctx)
        if control is not None:
            row["controls"] = {CONTROL: control}
    if cfg.out_dir and ctx.rank == 0:
        append_line(Path(cfg.out_dir), cell, row, ctx.world_size)
    return row


# The altered weights' bits in plain parameters, through the cell's own fully_shard.
CONTROL = "plain_parameters_same_bits"


def _plain_control(cell: Cell, row: dict, original: dict, ctx) -> dict[str, Any] | None:
    """The control that differs from the cell only in bitsandbytes: the very bits of each
    weight the cell altered, in plain ``nn.Parameter``s of one module, through ``fully_shard``
    with the cell's mesh, mixed precision and resharding (the wrap is that one module), and
    one unshard. Run only for a cell that altered bytes on some rank, so a clean sweep pays
    nothing; the ranks agree first, so that all enter the same collectives. None: nothing to
    control. A control that raises is recorded as ``raised``, like a cell."""
    from fsdpqdiag.probes.common import agreed_flags, plain_carriers_control

    names = list(original)
    flags = agreed_flags([name in row["altered_modules"] for name in names], ctx.device)
    altered = {name: original[name] for name, flag in zip(names, flags) if flag}
    if not altered:
        return None
    try:
        return plain_carriers_control(altered, ctx.mesh(), **_fsdp_kwargs(cell))
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is the control's result
        return {"outcome": "raised", "exception": f"{type(exc).__name__}: {exc}", "weights": len(altered)}


def verdict(outcomes) -> Verdict:
    # The sweep reads each cell's row itself (``cell_verdict``); this states one cell's.
    failed = failure_verdict(outcomes)
    row = dict(outcomes[0].evidence)
    if failed is not None:
        failed.evidence.update(row)
        return failed
    return Verdict(cell_verdict(row), row.get("error") or "one cell", row)


def cell_attribution(row: dict) -> tuple[str, list[str]]:
    """The cell's control decides whose copy altered the weights: the same bits in plain
    parameters through the cell's own fully_shard altered too (FSDP2's unshard) or kept
    (the bitsandbytes path). The byte signature (NaN-class containers only, all rewritten:
    a float-value copy) is said beside it, and decides alone only in a row from before the
    control existed."""
    from fsdpqdiag.evidence import attribution

    altered, nan_class = row.get("differing_elements") or 0, row.get("differing_nan_class") or 0
    if row.get("status") != "ok" or not altered:
        return attribution.UNDETERMINED, ["no weight altered in the cell: nothing for a control to separate"]
    patterns = ", ".join(row.get("post_bit_patterns") or {}) or "other bits"
    said = (
        f"{nan_class} of {altered} altered elements were NaN-class containers, now {patterns}; "
        f"first in {row.get('first_altered_module')}"
    )
    control = (row.get("controls") or {}).get(CONTROL)
    if control is None:
        if nan_class == altered:
            return attribution.TORCH_FSDP, [said, "byte signature of a float-value copy (no control ran)"]
        return attribution.UNDETERMINED, [said, "no control ran"]
    if control["outcome"] == "raised":
        return attribution.UNDETERMINED, [f"control raised {control['exception']}", said]
    result = (
        f"altered {control['differing_elements']} elements in {len(control['altered_weights'])} weights"
        if control["outcome"] == "altered"
        else "kept every byte"
    )
    control_said = (
        f"control: the same bits of the {control['weights']} altered weights in plain parameters "
        f"(no bitsandbytes), the cell's fully_shard and unshard, {result}"
    )
    if control["outcome"] == "altered":
        return attribution.TORCH_FSDP, [control_said, said]
    return attribution.BITSANDBYTES, [control_said, "only the Params4bit path altered bytes", said]


def key_numbers(evidence: dict) -> str:
    """How a cell reads: its loss against the unsharded baseline, and the differing elements."""
    loss, baseline = evidence.get("loss_fsdp2"), evidence.get("loss_baseline")
    return f"loss {loss} vs {baseline}; differing {evidence.get('differing_elements')}"


PROBE = Probe(
    NAME,
    "the configuration-invariance sweep of #1945: one cell",
    run,
    verdict,
    # every cell loads its model (the preset's or --model's) through transformers
    Needs(("bitsandbytes", "transformers")),
    attribute=cell_attribution,
    presentation=Presentation(
        key_numbers, reads=frozenset({"loss_fsdp2", "loss_baseline", "differing_elements"})
    ),
)
