"""Frozen configuration handed from the CLI to the launcher and on to every rank.

Everything here is plain data (strings, ints, bools) so that it crosses the process
boundary as JSON and lands verbatim in the report: a report must say exactly what ran.
Nothing in this module imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.errors import BadInput

# Canonical dtype names and the spellings users type for them.
DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "uint8": "uint8",
    "int8": "int8",
}
# Dtypes a layer can compute in and FSDP2's MixedPrecisionPolicy can cast to: an integer
# compute or param dtype is not a configuration that fails in an interesting way, only late.
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
# Bytes per element of each storage dtype: packed 4-bit weights are viewed as it.
STORAGE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1}
QUANT_TYPES = ("nf4", "fp4")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
# The plain frozen integer parameters the non-float probe carries beside a float Linear (and
# its verdict reads by name, in the parent, where torch is not imported).
INTEGER_PARAMS = ("u8", "i8")


def canonical_dtype(name: str, *, allow_none: bool = False) -> str | None:
    """Map a user-typed dtype name to its canonical torch attribute name.

    Raises ValueError with a one-line message for an unknown name.
    """
    key = name.strip().lower()
    if allow_none and key in ("none", "null", ""):
        return None
    if key not in DTYPE_ALIASES:
        known = ", ".join(sorted(set(DTYPE_ALIASES)))
        raise ValueError(f"unknown dtype {name!r} (known: {known})")
    return DTYPE_ALIASES[key]


def torch_dtype(name: str | None):
    """The torch.dtype for a canonical name (imports torch, so only ranks call it)."""
    import torch

    return None if name is None else getattr(torch, name)


@dataclass(frozen=True)
class LinearConfig:
    """A synthetic bitsandbytes ``Linear4bit`` and the FSDP2 policy it is sharded with.

    Defaults are those of bitsandbytes #1945's reproducer, scaled to 1024x1024.
    """

    in_features: int = 1024
    out_features: int = 1024
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"
    double_quant: bool = True
    bias: bool = False
    weight_seed: int = 42
    input_seed: int = 123
    batch: int = 2
    # FSDP2 MixedPrecisionPolicy; param_dtype None means "no policy casting".
    param_dtype: str | None = "bfloat16"
    reduce_dtype: str | None = "float32"

    def validate(self) -> None:
        """BadInput (a ValueError) naming the field at fault, as ``BadInput.about`` words it."""
        if self.quant_type not in QUANT_TYPES:
            raise BadInput(f"unknown quant type {self.quant_type!r} (known: nf4, fp4)")
        for name in ("in_features", "out_features", "batch"):
            if getattr(self, name) < 1:
                raise BadInput.about(f"{{{name}}} must be >= 1, got {{0}}", getattr(self, name))
        # torch.manual_seed takes what fits in 64 bits, signed or not; beyond, every rank would raise.
        for name in ("weight_seed", "input_seed"):
            if not -(1 << 63) <= getattr(self, name) < (1 << 64):
                raise BadInput.about(
                    f"{{{name}}} must fit in 64 bits (-2**63 .. 2**64-1), got {{0}}", getattr(self, name)
                )
        canonical_dtype(self.quant_storage)
        for name, allow_none in (("compute_dtype", False), ("param_dtype", True), ("reduce_dtype", True)):
            value = getattr(self, name)
            dtype = canonical_dtype(value or "none", allow_none=allow_none)
            if dtype is not None and dtype not in FLOAT_DTYPES:
                raise BadInput.about(
                    f"{{{name}}} must be a float dtype (bf16, fp16, fp32), not {{0!r}}", value
                )
        problem = packing_problem(self.in_features, self.out_features, self.quant_storage)
        if problem:
            raise BadInput(problem)


def packing_problem(in_features: int, out_features: int, quant_storage: str) -> str | None:
    """Why bitsandbytes cannot hold this layer's packed 4-bit weight in ``quant_storage``
    (None when it can). Two weights share a byte, and the packed bytes are viewed as the
    storage dtype, which needs a whole number of its elements: 7x7 = 49 weights pack into
    25 bytes, which no 2-byte bf16 view holds (a RuntimeError inside every rank otherwise)."""
    storage = canonical_dtype(quant_storage)
    weights = in_features * out_features
    packed_bytes = (weights + 1) // 2
    element_bytes = STORAGE_BYTES[storage]
    if packed_bytes % element_bytes == 0:
        return None
    return (
        f"a {out_features}x{in_features} layer packs its {weights} 4-bit weights into {packed_bytes} "
        f"bytes, which {storage} storage ({element_bytes} bytes per element) cannot hold: "
        f"in_features * out_features must be a multiple of {2 * element_bytes}"
    )


@dataclass(frozen=True)
class RunConfig:
    """Where and how the ranks run."""

    world_size: int
    device: str  # resolved: "cpu" or "cuda"
    timeout_s: float = 300.0
    inject: str | None = None
    # "" resolves to the device's natural backend. gloo on CUDA lets several ranks share
    # one GPU (NCCL refuses that), so sharding at world size 2 runs through CUDA copy
    # kernels even on a one-GPU machine.
    backend: str = ""

    def __post_init__(self) -> None:
        if not self.backend:
            object.__setattr__(self, "backend", "nccl" if self.device == "cuda" else "gloo")


@dataclass(frozen=True)
class RankTask:
    """What one launch asks every rank to do: one probe, one configuration."""

    probe: str
    probe_config: dict[str, Any]
    run: RunConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankTask:
        return cls(
            probe=data["probe"],
            probe_config=data["probe_config"],
            run=RunConfig(**data["run"]),
            extra=data.get("extra", {}),
        )
