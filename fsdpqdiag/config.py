"""Frozen configuration handed from the CLI to the launcher and on to every rank.

Everything here is plain data (strings, ints, bools) so that it crosses the process
boundary as JSON and lands verbatim in the report: a report must say exactly what ran.
Nothing in this module imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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
QUANT_TYPES = ("nf4", "fp4")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")


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
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"unknown quant type {self.quant_type!r} (known: nf4, fp4)")
        for label, value in (("in_features", self.in_features), ("out_features", self.out_features)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        canonical_dtype(self.compute_dtype)
        canonical_dtype(self.quant_storage)
        canonical_dtype(self.param_dtype or "none", allow_none=True)
        canonical_dtype(self.reduce_dtype or "none", allow_none=True)


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
