"""Memory a run needs, estimated before launch and held against what the device has.

The estimate comes from the geometry and dtypes: work that cannot fit is refused
(``BadInput``, nothing launched) instead of every rank ending in ERROR after minutes.

Two numbers per rank. The *floor* is memory the run certainly allocates (a Linear4bit's
weight is created in float32 before it is quantized; a model is loaded at least as its
packed 4-bit weights and its 16-bit embeddings); only the floor can refuse, since a false
refusal of a real run is worse than a late failure. The *typical* peak (the float copies,
the unsharded reference, the all-gathered parameters) only makes the progress line say
that the run is large. Ranks on CPU share the host's memory; ranks on CUDA with NCCL each
have a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fsdpqdiag.errors import BadInput

# Above this share of the memory available, the progress line says the run is large.
LARGE_SHARE = 0.5


@dataclass(frozen=True)
class Estimate:
    subject: str  # what was estimated, for the message: "a 1024x1024 Linear4bit"
    floor_bytes: int  # per rank, certainly allocated
    typical_bytes: int  # per rank, a typical peak


def layer_estimate(in_features: int, out_features: int, batch: int) -> Estimate:
    weights = in_features * out_features
    activations = batch * (in_features + out_features) * 4
    # fp32 initial weight; then packed copies, the dequantized weight, a reference layer.
    return Estimate(
        subject=f"a {out_features}x{in_features} Linear4bit",
        floor_bytes=4 * weights + activations,
        typical_bytes=12 * weights + 4 * activations,
    )


def model_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of a decoder-only LM from its config.json fields (0 where unknown)."""

    def field(name: str, default: int = 0) -> int:
        value = config.get(name, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    hidden = field("hidden_size")
    heads = field("num_attention_heads", 1)
    head_dim = field("head_dim", hidden // heads if heads else 0)
    kv_heads = field("num_key_value_heads", heads)
    intermediate = field("intermediate_size")
    experts = field("num_experts", 1)
    moe_intermediate = field("moe_intermediate_size", intermediate)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * (moe_intermediate * experts if experts > 1 else intermediate)
    embeddings = field("vocab_size") * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return field("num_hidden_layers") * (attention + mlp) + embeddings


def model_estimate(config: Mapping[str, Any], label: str) -> Estimate:
    parameters = model_parameters(config)
    vocab, hidden = config.get("vocab_size", 0), config.get("hidden_size", 0)
    embeddings = vocab * hidden if isinstance(vocab, int) and isinstance(hidden, int) else 0
    # Packed 4-bit weights (half a byte each) and the 16-bit embedding, at the least; a
    # 16-bit load, the reference model and the gathered parameters typically.
    return Estimate(
        subject=f"{label} ({parameters / 1e9:.2f} B parameters)",
        floor_bytes=max(parameters - embeddings, 0) // 2 + 2 * embeddings,
        typical_bytes=6 * parameters,
    )


def host_available_bytes() -> int | None:
    """MemAvailable, lowered to the cgroup's memory.max where a container sets one."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as limit_file:
            limit = limit_file.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as current_file:
            current = int(current_file.read().strip())
        if limit != "max" and available is not None:
            available = min(available, max(int(limit) - current, 0))
    except (OSError, ValueError):
        pass
    return available


def gpu_free_bytes(world_size: int) -> int | None:
    """The least free memory among the GPUs the ranks use, through NVML without creating a
    CUDA context in this process; None when NVML is not importable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        free = [
            pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free
            for i in range(min(world_size, count))
        ]
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 (no answer: no check, never a refusal)
        return None
    return min(free) if free else None


def check(estimate: Estimate, runs) -> str | None:
    """BadInput when the floor cannot fit the device of a run; else, where the typical peak
    is large, a note for the progress line (None when it is not)."""
    note = None
    for run in runs:
        shared = run.device == "cpu" or run.backend == "gloo"
        ranks = run.world_size if shared else 1
        if run.device == "cpu":
            available, what = host_available_bytes(), "host memory available"
        else:
            available, what = gpu_free_bytes(run.world_size), "free GPU memory"
        if available is None:
            continue
        floor, typical = ranks * estimate.floor_bytes, ranks * estimate.typical_bytes
        per_rank = f" ({ranks} ranks x {_gib(estimate.floor_bytes)})" if ranks > 1 else ""
        if floor > available:
            raise BadInput(
                f"{estimate.subject} needs at least {_gib(floor)}{per_rank} at world size "
                f"{run.world_size} on {run.device}, but only {_gib(available)} of {what} is there"
            )
        if typical > LARGE_SHARE * available:
            note = f"large: about {_gib(typical)} of {_gib(available)} {what}"
    return note


def noting(on_progress: Callable[[str], None] | None, note: str | None) -> Callable[[str], None] | None:
    """``on_progress`` whose every line carries ``note`` (a large run says so throughout)."""
    if on_progress is None or note is None:
        return on_progress
    on_progress(note)
    return lambda text: on_progress(f"{text} ({note})")


def _gib(count: int) -> str:
    return f"{count / (1 << 30):.1f} GiB" if count >= 1 << 26 else f"{count / (1 << 20):.1f} MiB"


def check_model(model: str | None, preset: str | None, runs) -> str | None:
    """``check`` for a --model directory's config.json or a preset's geometry; a model
    whose config cannot be read is left to the model checks that follow."""
    from pathlib import Path

    from fsdpqdiag.core import bounded_json
    from fsdpqdiag.stack.models import PRESETS

    if model is None:
        config = PRESETS.get(preset or "")
    else:
        try:
            path = Path(model).expanduser() / "config.json"
            config = bounded_json.load_file(path, bounded_json.CONFIG_LIMITS)
        except bounded_json.UntrustedJSONError:
            config = None
    if not isinstance(config, dict):
        return None
    return check(model_estimate(config, model or preset or "the model"), runs)
