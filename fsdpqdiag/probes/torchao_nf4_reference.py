"""The same NF4 weight through bitsandbytes and through torchao, one stack: whose bytes survive?

torchao's ``NF4Tensor`` (the weight of torchtune's QLoRA) implements FSDP2's all-gather extension:
FSDP2 all-gathers its packed codes as uint8 and its scalers as int8 and a bf16 factor, and
rebuilds the tensor around them. bitsandbytes' ``Params4bit`` with ``quant_storage=bfloat16``
is all-gathered as the bf16 containers its packed bytes are stored in. Both are built here from
one draw, ``nn.Linear``'s initialization under ``nan-canonicalization``'s seed and geometry (what
``Linear4bit`` draws), each sharded as its own FSDP unit by the same ``fully_shard``, mesh and
bf16 ``MixedPrecisionPolicy`` in one launch, and forwarded once; a forward pre-hook copies what
each forward receives. One unit each: FSDP2 all-gathers a unit of mixed dtypes as bytes, which
would hide a float-path alteration of the bitsandbytes weight.

The common representation: one 4-bit code per element, in the weight's row-major element order.
Both libraries pack two codes a byte, the element of even index in the high nibble; they differ
in what holds the bytes: bitsandbytes reinterprets them as ``quant_storage`` containers (here
bf16, two bytes each: four codes a container, shape ``[elements / 4, 1]``), torchao keeps a flat
uint8 ``quantized_data`` inside a tensor whose nominal shape and dtype are the weight's. So both
are read as raw bytes and split into nibbles (``nf4_codes``); their codes before sharding mostly
agree (``codes_agree_between_libraries``: each library rounds its own block scales), which checks
that both are read in the same order. The scales differ in kind and are compared as bytes:
bitsandbytes' stay in its QuantState (not all-gathered); torchao's inner tensors are.

The verdict says whether an alteration follows the library (bitsandbytes altered, torchao
byte-true: the stack can carry these bytes, bitsandbytes' storage path cannot), the stack (both
altered), torchao alone, or neither. At world size 1, torch from 2.9 skips the all-gather and
hands ``fsdp_post_all_gather`` only the first of an ``NF4Tensor``'s three tensors
(https://github.com/pytorch/pytorch/pull/197999): the torchao half raises and the comparison is
UNSUPPORTED there. Skipped where torchao is not installed.

In the default ``reproduce`` set, after ``nan-canonicalization``, so that a report shows both
libraries on the same stack; on CPU it costs one small unit each and torchao's import, which the
zygote makes once (``Probe.needs``).
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict
from fsdpqdiag.report.model import NOT_REPRODUCED, REPRODUCED, UNSUPPORTED

# The inner tensors FSDP2 all-gathers for an NF4Tensor (its fsdp_pre_all_gather's).
TORCHAO_INNER = ("quantized_data", "quantized_scalers", "quantization_factor")
# Differing code positions kept as evidence.
MAX_CODE_POSITIONS = 16
LIBRARIES = ("bitsandbytes", "torchao")


def torchao_nf4():
    """``(to_nf4, linear_nf4)`` wherever this torchao keeps them."""
    try:  # torchao >= 0.15
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:  # older torchao
        from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
    return to_nf4, linear_nf4


def nf4_codes(packed):
    """One 4-bit code per element from packed bytes (any dtype, read raw), even elements first."""
    import torch

    from fsdpqdiag.evidence.bytes import plain

    data = plain(packed).contiguous().reshape(-1).view(torch.uint8)
    return torch.stack([data >> 4, data & 0x0F], dim=-1).reshape(-1)


def compare_codes(before, after) -> dict[str, Any]:
    """How many codes differ between two packings of one library, and where (element index)."""
    import torch

    if before.numel() != after.numel():
        return {"comparable": False, "elements": before.numel(), "received": after.numel()}
    positions = torch.nonzero(before != after).reshape(-1)
    return {
        "elements": before.numel(),
        "differing_codes": int(positions.numel()),
        "positions": positions[:MAX_CODE_POSITIONS].tolist(),
    }


def _torchao_module(weight, linear_nf4):
    import torch

    class FrozenNF4Linear(torch.nn.Module):
        """A frozen NF4 weight used through ``linear_nf4``, as torchtune's FrozenNF4Linear."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)

        def forward(self, x):
            return linear_nf4(x, self.weight)

    return FrozenNF4Linear()


def _capture(module, copy):
    """A forward pre-hook (after FSDP2's unshard) keeping ``copy(module.weight)``."""
    seen: dict[str, Any] = {}

    def hook(mod, args) -> None:
        seen["weight"] = copy(mod.weight)
        seen["type"] = type(mod.weight).__name__

    return seen, module.register_forward_pre_hook(hook)


def _bnb_half(cfg: LinearConfig, ctx, evidence: dict) -> Any:
    """bitsandbytes' weight: bytes and codes before, then as its forward receives them."""
    from fsdpqdiag.evidence.bytes import diff, plain
    from fsdpqdiag.probes.common import build_linear4bit, shard

    linear, x = build_linear4bit(cfg, ctx.device)
    # Before any forward: on some CPUs bitsandbytes' inference forward repacks weight.data in place.
    original = plain(linear.weight).clone()
    ctx.checkpoint("bitsandbytes: fully_shard and forward", evidence)
    shard(linear, ctx, cfg)
    seen, handle = _capture(linear, lambda w: plain(w).clone())
    linear(x)
    handle.remove()
    linear.reshard()
    section = {"container": f"{str(original.dtype).removeprefix('torch.')}{list(original.shape)}"}
    section["bytes"] = diff(original, seen["weight"])
    section["codes"] = compare_codes(nf4_codes(original), nf4_codes(seen["weight"]))
    section["received_type"] = seen["type"]
    section["status"] = "completed"
    evidence["bitsandbytes"] = section
    return nf4_codes(original)


def _torchao_half(cfg: LinearConfig, ctx, evidence: dict) -> Any:
    """torchao's weight from the same draw: its inner tensors before, then as forward receives them."""
    import torch

    from fsdpqdiag.core.config import torch_dtype
    from fsdpqdiag.evidence.bytes import diff
    from fsdpqdiag.probes.common import shard
    from fsdpqdiag.probes.raised import RaisedStage

    to_nf4, linear_nf4 = torchao_nf4()
    torch.manual_seed(cfg.weight_seed)
    drawn = torch.nn.Linear(cfg.in_features, cfg.out_features, bias=False).weight.detach()
    compute = torch_dtype(cfg.compute_dtype)
    weight = to_nf4(drawn.to(device=ctx.device, dtype=compute))
    original = {name: getattr(weight, name).clone() for name in TORCHAO_INNER}
    module = _torchao_module(weight, linear_nf4)
    generator = torch.Generator().manual_seed(cfg.input_seed)
    x = torch.randn(cfg.batch, cfg.in_features, generator=generator).to(ctx.device, compute)
    ctx.checkpoint("torchao: fully_shard and forward", evidence)
    section: dict[str, Any] = {"container": f"NF4Tensor uint8[{original['quantized_data'].numel()}]"}
    evidence["torchao"] = section
    shard(module, ctx, cfg)
    seen, handle = _capture(module, lambda w: {name: getattr(w, name).clone() for name in TORCHAO_INNER})
    try:
        module(x)
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is the finding
        section.update(RaisedStage.of(exc, "forward").to_dict())
        return None
    finally:
        handle.remove()
    module.reshard()
    section["inner"] = {name: diff(original[name], seen["weight"][name]) for name in TORCHAO_INNER}
    section["codes"] = compare_codes(
        nf4_codes(original["quantized_data"]), nf4_codes(seen["weight"]["quantized_data"])
    )
    section["received_type"] = seen["type"]
    section["status"] = "completed"
    return nf4_codes(original["quantized_data"])


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    cfg = LinearConfig(**config)
    evidence: dict[str, Any] = {"elements": cfg.in_features * cfg.out_features}
    bnb_codes = _bnb_half(cfg, ctx, evidence)
    torchao_codes = _torchao_half(cfg, ctx, evidence)
    if torchao_codes is not None and torchao_codes.numel() == bnb_codes.numel():
        agree = (torchao_codes == bnb_codes).float().mean().item()
        evidence["codes_agree_between_libraries"] = round(agree, 6)
    return evidence


def altered(section: dict | None) -> bool | None:
    """Whether a library's weight reached forward altered (None: not measured)."""
    if not isinstance(section, dict) or section.get("status") != "completed":
        return None
    if section.get("codes", {}).get("differing_codes", 1) or not section.get("codes", {}).get("elements"):
        return True
    parts = [section["bytes"]] if "bytes" in section else list(section.get("inner", {}).values())
    return any(not part.get("bytes_equal") for part in parts)


FOLLOWS = {
    (True, False): "the library: bitsandbytes altered, torchao byte-true",
    (True, True): "the stack: both libraries altered",
    (False, True): "torchao alone: torchao altered, bitsandbytes byte-true",
}


FOLLOWS_SHORT = {"library": "the library", "stack": "the stack", "torchao": "torchao alone"}


def _says(section: dict) -> str:
    codes = section.get("codes") or {}
    if not codes.get("elements"):
        return "changed form"
    return f"{codes.get('differing_codes')} of {codes['elements']} codes differ"


def _finished(evidence: dict) -> bool:
    """Both halves ran to their end (torchao's may end in the stack's refusal)."""
    statuses = [(evidence.get(library) or {}).get("status") for library in LIBRARIES]
    return statuses[0] == "completed" and statuses[1] in ("completed", "raised")


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    measured = [o for o in outcomes if _finished(o.evidence)]
    if len(measured) < len(outcomes):
        failed = failure_verdict(outcomes, keep_evidence=True)
        if failed is not None:
            return failed
    evidence = dict(measured[0].evidence)
    bnb = [altered(o.evidence["bitsandbytes"]) for o in measured]
    torchao = [altered(o.evidence["torchao"]) for o in measured]
    bnb_said = f"bitsandbytes: {_says(evidence['bitsandbytes'])}"
    if None in torchao:
        raised = evidence["torchao"]
        evidence["follows"] = None
        return Verdict(
            UNSUPPORTED,
            f"torchao's NF4Tensor did not reach forward through this stack's FSDP2 "
            f"({raised.get('exception')}), so there is no reference; {bnb_said}",
            evidence,
        )
    key = (any(bnb), any(torchao))
    evidence["follows"] = {(True, False): "library", (True, True): "stack", (False, True): "torchao"}.get(key)
    said = f"{bnb_said}; torchao: {_says(evidence['torchao'])}"
    if key == (False, False):
        return Verdict(NOT_REPRODUCED, f"both libraries' NF4 codes reach forward byte-true; {said}", evidence)
    return Verdict(REPRODUCED, f"the alteration follows {FOLLOWS[key]}; {said}", evidence)


def attribute(evidence: dict) -> tuple[str, list[str]]:
    from fsdpqdiag.evidence import attribution

    follows = evidence.get("follows")
    torchao = evidence.get("torchao") or {}
    if torchao.get("status") == "raised":
        return attribution.TORCH_FSDP, [
            f"torchao's NF4Tensor raised in forward: {torchao.get('exception')}",
            f"FSDP2 frame: {torchao.get('fsdp_frame')}",
        ]
    said = "control: the same weight as torchao's NF4Tensor, same fully_shard, policy and unshard"
    if follows == "library":
        return attribution.BITSANDBYTES, [f"{said}, reached forward byte-true"]
    if follows == "stack":
        return attribution.TORCH_FSDP, [f"{said}, was altered too"]
    if follows == "torchao":
        return attribution.TORCHAO, [f"{said}: only torchao's was altered"]
    return attribution.UNDETERMINED, [f"the run ended in {evidence.get('stage') or 'setup'}"]


def key_numbers(evidence: dict) -> str:
    """Each library's codes as forward receives them, and whom the alteration follows."""
    parts = []
    for library in LIBRARIES:
        section = evidence.get(library)
        if isinstance(section, dict) and section.get("status") == "completed":
            parts.append(f"{library}: {_says(section)}")
        elif isinstance(section, dict) and section.get("status") == "raised":
            parts.append(f"{library}: raised {(section.get('exception') or '').split(':', 1)[0]}")
    if evidence.get("follows"):
        parts.append(f"follows {FOLLOWS_SHORT.get(evidence['follows'], evidence['follows'])}")
    return "; ".join(parts)


PROBE = Probe(
    name="torchao-nf4-reference",
    description="The same NF4 weight through bitsandbytes and torchao on one stack: whose codes survive?",
    run=run,
    verdict=verdict,
    needs=Needs(packages=("bitsandbytes", "torchao")),
    standalone="reproducers/torchao_nf4_reference.py",
    attribute=attribute,
    controls=("nan-canonicalize", "swap-packed-nibbles"),
    presentation=Presentation(key_numbers, reads=frozenset({*LIBRARIES, "follows"})),
)
