"""Input a user can get wrong, checked before any rank starts or any file is written.

Each problem is a ``BadInput`` with a one-line message (the CLI exits 2 on it). A stack that
imports but cannot run (bitsandbytes without its native library) is learned from the first
rank, before anything is written (see ``require_stack``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Sequence

from fsdpqdiag.core.config import BACKENDS, DEVICES, LinearConfig, RunConfig
from fsdpqdiag.errors import BadInput
from fsdpqdiag.launcher import rank_start
from fsdpqdiag.launcher.session import LaunchSession


def require_stack(session: LaunchSession) -> None:
    """torch and bitsandbytes installed, or a one-line error; checked without importing them.

    Importing them takes seconds that the ranks spend anyway: whether torch has distributed
    support and whether bitsandbytes imports with its native library is learned from the
    first rank that starts (it captures the stack for the report, see ``fsdpqdiag.rank.env``), and
    the launcher raises the same one-line ``BadInput`` for it. Under torchrun this process is
    a rank itself and checks them here. A stack an earlier command of the same session
    captured is forgotten first: this command's report carries its own.
    """
    from fsdpqdiag.rank import env

    session.forget_stack()
    if importlib.util.find_spec("torch") is None:
        raise BadInput("torch is not installed")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInput("bitsandbytes is not installed: pip install bitsandbytes")
    from fsdpqdiag.launcher.launch import in_launched_job
    from fsdpqdiag.stack import bnb_cpu_path

    try:
        bnb_cpu_path.override()
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    if in_launched_job():
        problem = env.problem(env.capture())
        if problem is not None:
            raise BadInput(problem)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str) -> str:
    if requested not in DEVICES:
        raise BadInput(f"unknown device {requested!r} (known: {', '.join(DEVICES)})")
    if requested == "cpu":  # asking torch would import it, seconds before any rank needs it
        return requested
    gpus = visible_gpus()
    if requested == "auto":
        return "cuda" if gpus else "cpu"
    if gpus == 0:
        raise BadInput.about("{device=0}, but no CUDA GPU is visible", requested)
    return requested


def default_world_size(device: str) -> int:
    """2 where the devices allow, since FSDP2 shards for real only above world size 1."""
    if device == "cuda":
        return 2 if visible_gpus() >= 2 else 1
    return 2


def resolve_backend(requested: str, device: str) -> str:
    if requested not in BACKENDS:
        raise BadInput(f"unknown backend {requested!r} (known: {', '.join(BACKENDS)})")
    if requested == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if requested == "nccl" and device != "cuda":
        raise BadInput.about("{backend=0} needs {device=1}", "nccl", "cuda")
    return requested


def _check_positive(world_size: int) -> None:
    if world_size < 1:
        raise BadInput.about("{world_sizes} must be >= 1, got {0}", world_size)


def check_world_size(world_size: int, device: str, backend: str | None = None) -> None:
    _check_positive(world_size)
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if device == "cuda" and backend == "nccl" and world_size > visible_gpus():
        raise BadInput.about(
            "{world_sizes=0} needs {0} GPUs with NCCL, but {1} are visible "
            "({backend=2} lets ranks share GPUs)",
            world_size,
            visible_gpus(),
            "gloo",
        )


def check_inject(inject: str | None) -> None:
    from fsdpqdiag.stack import faults

    if inject is not None and inject not in faults.FAULTS:
        raise BadInput.about(
            "unknown fault {0!r} for {inject} (known: {1})", inject, ", ".join(faults.FAULTS)
        )


def check_probes(names: Sequence[str]) -> list[str]:
    from fsdpqdiag.tasks import PROBES

    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise BadInput(f"unknown probe {unknown[0]!r} (known: {', '.join(PROBES)})")
    return merged(names) or list(PROBES)


def merged(values: Sequence) -> list:
    """A repeatable option's values with repeats merged, in first-seen order: asking twice
    for the same probe or world size asks for it once, not for the same work twice."""
    return list(dict.fromkeys(values))


def run_configs(
    world_sizes: Sequence[int], device: str, backend: str, timeout_s: float, inject: str | None
) -> list[RunConfig]:
    """Validated run configurations, one per world size, or BadInput."""
    from fsdpqdiag.launcher.launch import check_job_environment

    try:
        check_job_environment()
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    check_inject(inject)
    rank_start.requested_start()
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    for world_size in world_sizes:
        _check_positive(world_size)
    # nan compares false with everything: "<= 0" alone would let it through to the ranks.
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise BadInput.about("{timeout_s} must be > 0 and finite, got {0}", timeout_s)
    # Last: where the device is "auto" or "cuda", resolving it imports torch.
    resolved = resolve_device(device)
    rank_start.start_method(resolved)
    resolved_backend = resolve_backend(backend, resolved)
    sizes = merged(world_sizes) or [default_world_size(resolved)]
    for world_size in sizes:
        check_world_size(world_size, resolved, resolved_backend)
    return [
        RunConfig(
            world_size=ws, device=resolved, timeout_s=timeout_s, inject=inject, backend=resolved_backend
        )
        for ws in sizes
    ]


def checked_linear(linear: LinearConfig | None) -> LinearConfig:
    linear = linear or LinearConfig()
    try:
        linear.validate()
    except BadInput:
        raise
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    return linear


def check_storage_pairs(linear: LinearConfig) -> None:
    """storage-dtype-mismatch packs the layer in every storage dtype of its pairs, not only
    in --quant-storage: a geometry one of them cannot hold is refused here, not per rank."""
    from fsdpqdiag.core.config import packing_problem
    from fsdpqdiag.probes.storage_dtype_mismatch import combinations

    for storage, _ in combinations(dataclasses.asdict(linear)):
        problem = packing_problem(linear.in_features, linear.out_features, storage)
        if problem:
            raise BadInput(f"{problem} (the storage-dtype-mismatch probe also packs it as {storage})")
