"""Real transformers causal LMs, quantized by bitsandbytes through ``from_pretrained``.

Presets are built offline from a config with fixed-seed random weights, saved once to a
cache directory, then loaded through the very ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`` path a user's training script takes, so a
preset exercises the same code as a downloaded checkpoint without touching the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fsdpqdiag import envvars
from fsdpqdiag.core.config import torch_dtype
from fsdpqdiag.stack import bnb_cpu_path

# Geometry of each preset (LlamaConfig fields). tinyllama-1.1b is TinyLlama-1.1B's, the
# model of bitsandbytes #1945's forensic table and matrix. Every quantized projection has
# out_features divisible by 32 (REPACK_BLOCK_N): on a CPU with AVX512-BF16, bitsandbytes
# repacks a Linear4bit's weight at its first inference forward and asserts that. tiny-llama
# had intermediate_size 688 until 2026-11-29 (reports made before then used it).
REPACK_BLOCK_N = 32
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "tinyllama-1.1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
}
# A tiny Qwen3-MoE, built in memory (moe-expert-quant probe): its experts are stored as
# fused 3-D parameters (gate_up_proj [experts, 2*moe_intermediate, hidden], down_proj
# [experts, hidden, moe_intermediate]) in transformers v5, the layout axolotl #3439 quantizes
# through torch.nn.utils.parametrize. The eager experts loop is pinned so that the kernel
# choice cannot differ between devices, the probe and its standalone script.
TINY_MOE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    experts_implementation="eager",
    attn_implementation="eager",
)
DEFAULT_PRESET = "tiny-llama"
PRESET_SEED = 0


class ModelSourceError(ValueError):
    """A --model that is missing, not a model directory, or not a causal LM."""


@dataclass(frozen=True)
class QuantConfig:
    """The BitsAndBytesConfig fields a diagnosis varies; defaults are FSDP-QLoRA's."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"

    def bnb_config(self):
        import torch
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        if self.bits != 4:
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(self.compute_dtype) or torch.bfloat16,
            bnb_4bit_quant_storage=torch_dtype(self.quant_storage),
        )


def cache_root() -> Path:
    base = os.environ.get(envvars.CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fsdpqdiag"
    )
    return Path(base) / "models"


def _preset_key(name: str) -> str:
    spec = json.dumps({"preset": PRESETS[name], "seed": PRESET_SEED}, sort_keys=True)
    return f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def preset_dir(name: str, cache: Path | None = None) -> Path:
    """The saved preset, created on first use (atomically: concurrent ranks may race)."""
    if name not in PRESETS:
        raise ModelSourceError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    target = (cache or cache_root()) / _preset_key(name)
    if (target / "config.json").exists():
        return target
    staging = _staging_dir(target)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        torch.manual_seed(PRESET_SEED)
        config = LlamaConfig(**PRESETS[name], torch_dtype="bfloat16")
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _staging_dir(target: Path) -> Path:
    """A fresh directory beside ``target`` to build a preset in, or ModelSourceError naming
    the cache: an ``envvars.CACHE`` that is a file, or not writable, is the user's to fix."""
    where = envvars.CACHE if os.environ.get(envvars.CACHE) else "the model cache"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except OSError as exc:
        culprit = exc.filename or target.parent
        raise ModelSourceError(
            f"cannot build the preset in {where} ({target.parent}): {culprit}: {exc.strerror}"
        ) from None


# Weight files from_pretrained loads; a directory with config.json alone fails in every rank.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def resolve_model(model: str | None, preset: str = DEFAULT_PRESET) -> Path:
    """A local model directory: ``model`` if given (validated), else the preset's cache."""
    if model is None:
        return preset_dir(preset)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is not a Hugging Face model directory (no config.json)")
    from fsdpqdiag.core import bounded_json

    # transformers reads config.json with json.load: a hostile one is refused here first.
    bounded_json.load_file(path / "config.json", bounded_json.CONFIG_LIMITS, error=ModelSourceError)
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"{path}: config.json does not load ({exc})") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(f"{path} holds a {config.model_type!r} model, not a causal LM")
    # BERT has a causal-LM head class too, but a checkpoint saved as BertForMaskedLM is an
    # encoder: its architectures say what it was trained as.
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelSourceError(f"{path} holds a {architectures[0]}, not a causal LM")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelSourceError(
            f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin)"
        )
    return path


def load_quantized(path: Path, quant: QuantConfig, device):
    """``from_pretrained`` with bitsandbytes quantization onto ``device``, offline."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant.bnb_config(),
        dtype=torch.bfloat16,
        device_map=device_map,
        local_files_only=True,
    )
    model.eval()
    bnb_cpu_path.apply(model)
    return model


def apply_lora(model, rank: int = 8, alpha: int = 16, seed: int = 0):
    """PEFT LoRA on the attention and MLP projections, with fixed-seed adapter weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, config)


def fixed_input(vocab_size: int, batch: int = 2, seq_len: int = 32, seed: int = 123):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def decoder_layers(model) -> list:
    """The decoder layers of a (possibly PEFT-wrapped) causal LM: FSDP2's usual unit."""
    from torch import nn

    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and module is not model:
            return list(layers)
    raise ValueError("no decoder layers (a ModuleList named 'layers') found")


def quantized_parameters(model) -> Iterator[tuple[str, Any, Any, str]]:
    """(module name, module, parameter, kind) for every quantized parameter.

    Kinds: ``params4bit``, ``int8params``, and ``int`` for plain uint8/int8 parameters
    (the parametrize-based MoE expert quantization of axolotl #3439).
    """
    import torch

    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            kind = type(param).__name__
            local = getattr(param, "_local_tensor", param)
            if kind == "Params4bit":
                yield f"{module_name}.{param_name}", module, param, "params4bit"
            elif kind == "Int8Params":
                yield f"{module_name}.{param_name}", module, param, "int8params"
            elif local.dtype in (torch.uint8, torch.int8):
                yield f"{module_name}.{param_name}", module, param, "int"


def describe(quant: QuantConfig) -> dict[str, Any]:
    return asdict(quant)


def build_tiny_moe(seed: int, dtype: str = "bfloat16"):
    """``TINY_MOE`` as a Qwen3-MoE causal LM with fixed-seed random weights, on the CPU.

    Raises ImportError where the installed transformers has no Qwen3-MoE.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_MOE))
    return model.to(torch_dtype(dtype))
