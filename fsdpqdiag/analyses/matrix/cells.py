"""A matrix cell: a composition of small sharding choices over a quantization choice.

A cell is a composition of small sharding choices (wrap granularity, mixed-precision
policy, ``cast_forward_inputs``, ``reshard_after_forward``) over a model built from a
quantization choice (double quant, storage dtype, quant type). Pure data: no torch here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fsdpqdiag.core.config import QUANT_TYPES, canonical_dtype
from fsdpqdiag.errors import BadInput

# The mixed-precision choice of a cell: the (param_dtype, reduce_dtype) of a
# MixedPrecisionPolicy; "none" passes mp_policy=None literally, as #1945's cell B did (FSDP2
# refuses it); "no-cast" is MixedPrecisionPolicy() with no dtypes, and "omitted" gives no
# mp_policy argument at all: FSDP2 without a cast, the question cell B meant to ask.
MP_OMITTED = "omitted"
MP_POLICIES = {
    "bf16/fp32": ("bfloat16", "float32"),
    "bf16/bf16": ("bfloat16", "bfloat16"),
    "none": None,
    "no-cast": (None, None),
    MP_OMITTED: MP_OMITTED,
}
# Which policies cast the parameters to bf16 for forward, and which leave them as stored.
CASTING_POLICIES = ("bf16/fp32", "bf16/bf16")
NON_CASTING_POLICIES = ("no-cast", MP_OMITTED)
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
        if self.mp != "bf16/fp32":
            other.append(f"mp={self.mp}")
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
    # What B meant: A without the bf16 param_dtype cast, by an empty policy and by none given.
    Cell("H", mp="no-cast"),
    Cell("I", mp=MP_OMITTED),
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
    """The default cells (or those named), or cell A expanded over ``grid`` (``dim=v1,v2``)."""
    if grid and names:
        # A grid expands cell A: named cells beside it would be dropped without a word.
        raise BadInput.about(
            "{cells=0} with {grid}: the grid expands cell A over its values; "
            "give {cells} or {grid}, not both",
            list(names),
        )
    if grid:
        axes = []
        seen: dict[str, str] = {}
        for spec in grid:
            dimension, _, values = spec.partition("=")
            if dimension not in GRID_DIMENSIONS or not values:
                raise BadInput.about(
                    "bad {grid} {0!r}: use DIM=v1,v2 with DIM one of {1}", spec, ", ".join(GRID_DIMENSIONS)
                )
            # Two specs of one dimension would be merged into one cell by keyword, silently:
            # which values were meant is the user's to say.
            if dimension in seen:
                raise BadInput.about(
                    "bad {grid} {0!r}: {1} is already given by {2!r}; list all its values once ({1}=v1,v2)",
                    spec,
                    dimension,
                    seen[dimension],
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


def cell_verdict(row: dict) -> str:
    if row.get("status") == "error":
        return "ERROR"
    if row.get("status") == "refused":
        return "REFUSED"
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
