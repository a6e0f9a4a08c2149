"""Building blocks shared by probes: the synthetic layer, the FSDP2 call, the capture.

Each is one small function so that a probe (and later a matrix cell) reads as a
composition of them, torchtitan-style. The FSDP2 call lives in ``shard``.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import torch

from fsdpqdiag import bnb_cpu_path
from fsdpqdiag.bytes import plain
from fsdpqdiag.config import LinearConfig, torch_dtype


def fsdp_api():
    """``fully_shard`` and ``MixedPrecisionPolicy`` wherever this torch keeps them."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def build_linear4bit(cfg: LinearConfig, device: torch.device):
    """A quantized ``bnb.nn.Linear4bit`` and a fixed-seed input for it.

    Weights and input are drawn on the CPU so that the same seeds give the same numbers
    on every device; quantization happens on ``device`` as it would in training.
    """
    import bitsandbytes as bnb

    torch.manual_seed(cfg.weight_seed)
    linear = bnb.nn.Linear4bit(
        cfg.in_features,
        cfg.out_features,
        bias=cfg.bias,
        compute_dtype=torch_dtype(cfg.compute_dtype),
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=torch_dtype(cfg.quant_storage),
    )
    bnb_cpu_path.apply(linear)
    linear = linear.to(device)
    generator = torch.Generator().manual_seed(cfg.input_seed)
    x = torch.randn(cfg.batch, cfg.in_features, generator=generator)
    return linear, x.to(dtype=torch_dtype(cfg.compute_dtype), device=device)


def shard(module: torch.nn.Module, ctx, cfg: LinearConfig) -> torch.nn.Module:
    """Apply FSDP2 to ``module`` over all ranks with the configured mixed precision."""
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(
        param_dtype=torch_dtype(cfg.param_dtype), reduce_dtype=torch_dtype(cfg.reduce_dtype)
    )
    return fully_shard(module, mesh=ctx.mesh(), mp_policy=policy)


def local_shard_of(original: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rows of ``original`` that FSDP2's Shard(0) gives ``rank`` (torch.chunk semantics)."""
    chunks = torch.chunk(original, world_size, dim=0)
    if rank < len(chunks):
        return chunks[rank]
    return original.new_empty((0, *original.shape[1:]))


@dataclass
class ForwardWeight:
    """The weight a module's forward received, as it received it."""

    tensor: torch.Tensor | None = None
    type_name: str | None = None
    has_quant_state: bool | None = None

    def describe(self) -> dict[str, Any]:
        return {"type": self.type_name, "has_quant_state": self.has_quant_state}


def capture_forward_weight(module: torch.nn.Module) -> tuple[ForwardWeight, Any]:
    """Copy ``module.weight`` at the moment ``forward`` starts.

    Registered after ``fully_shard``, this pre-hook runs after FSDP2's own pre-forward
    hook has swapped the unsharded parameter in, so it sees exactly what
    ``Linear4bit.forward`` sees. The copy matters: FSDP2 frees that storage on reshard.
    """
    captured = ForwardWeight()

    def hook(mod, args):
        weight = mod.weight
        captured.tensor = plain(weight).clone()
        captured.type_name = type(weight).__name__
        captured.has_quant_state = getattr(weight, "quant_state", None) is not None

    return captured, module.register_forward_pre_hook(hook)


def _frame_text(frame: traceback.FrameSummary) -> str:
    path = frame.filename.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} in {frame.name}"


def raised(exc: BaseException) -> dict[str, Any]:
    """A stage that raised: the exception's first line, the innermost frame it came from,
    and the innermost FSDP2 frame on the way (the line of FSDP2 that made the failing call,
    which the innermost frame, often in ``torch/nn/parameter.py``, does not name)."""
    frames = traceback.extract_tb(exc.__traceback__)
    fsdp_frames = [f for f in frames if "torch/distributed/fsdp/" in f.filename.replace("\\", "/")]
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {
        "status": "raised",
        "error": f"{type(exc).__name__}: {message}",
        "where": _frame_text(frames[-1]) if frames else None,
        "fsdp_frame": _frame_text(fsdp_frames[-1]) if fsdp_frames else None,
    }
