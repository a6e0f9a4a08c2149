"""Standalone reproducer: MoE experts as fused 3-D parameters, 4-bit, under FSDP2.

The experts are quantized to 4-bit through bitsandbytes' parametrize API, with LoRA on the
attention and FSDP2 ``fully_shard`` per decoder layer and at the root (torch + bitsandbytes
+ transformers + peft only).

A tiny Qwen3-MoE (2 layers, hidden 64, 4 experts) is built offline from its config. Each
stage runs in turn: LoRA, quantize the experts (``replace_parameter_4bit``), baseline loss
and backward without FSDP, ``fully_shard``, forward, backward, explicit unshard. It then
compares the loss, the LoRA gradients and every byte of the packed expert storage (the
rank's shard, what ``dequantize_4bit`` receives in forward, the storage after unshard)
with the baseline. A stage that raises is reported with its exception. Rank 0 prints one
verdict line for the run (``--json`` adds each rank's measurements, one JSON object a line);
the exit status is 1 where it reproduces (a stage under FSDP2 fails, or the loss, the LoRA
gradients or an expert's bytes differ), 0 where not, 2 where the setup already fails
without FSDP2 (no conclusion).

    torchrun --nproc-per-node 2 reproducers/moe_expert_quant.py               # CPU/gloo or GPU/NCCL
    python reproducers/moe_expert_quant.py --device cpu                       # world size 1

Mirrors fsdpqdiag's ``moe-expert-quant`` probe (same seeds, same defaults); a test checks
both report the same evidence. --in-features/--out-features are accepted so every
reproducer takes the same flags; this model's geometry is fixed.
"""

import argparse
import json
import os
import sys
import traceback

import bitsandbytes
import peft
import torch
import torch.distributed as dist
import transformers
from bitsandbytes.nn.parametrize import replace_parameter_4bit
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh

TINY_MOE = dict(
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
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def compare(original, observed):
    original = original.detach()
    observed = observed.detach()
    if hasattr(observed, "_local_tensor"):
        observed = observed._local_tensor
    observed = observed.as_subclass(torch.Tensor).to(original.device)
    if observed.dtype != original.dtype or observed.shape != original.shape:
        return {"bytes_equal": False, "observed": f"{observed.dtype}{list(observed.shape)}"}
    before = original.contiguous().view(-1).view(torch.uint8)
    after = observed.contiguous().view(-1).view(torch.uint8)
    differing = int((before != after).sum())  # uint8 storage: one byte per element
    return {"bytes_equal": differing == 0, "differing_bytes": differing, "differing_elements": differing}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=1024, help="ignored (fixed geometry)")
    parser.add_argument("--out-features", type=int, default=1024, help="ignored (fixed geometry)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--weight-seed", type=int, default=42)
    parser.add_argument("--input-seed", type=int, default=123)
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--json", action="store_true", help="also print each rank's measurements")
    args = parser.parse_args()
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
    }.items():
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))
    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "stages": {},
        "failures": [],
    }

    def stage(name, action):
        """Run one stage; an exception of the stack is reported, not raised."""
        try:
            value = action()
        except Exception as exc:  # noqa: BLE001
            result["stages"][name] = "failed"
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            result["failures"].append(
                {
                    "stage": name,
                    "exception": f"{type(exc).__name__}: {exc}".splitlines()[0],
                    "frame": f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}",
                }
            )
            return False, None
        result["stages"][name] = "ok"
        return True, value

    # Weights and LoRA drawn on the CPU, the experts quantized on the device.
    torch.manual_seed(args.weight_seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_MOE)).to(torch.bfloat16)
    layers = list(model.model.layers)
    torch.manual_seed(args.weight_seed)
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    # bf16 adapters: the bf16 MixedPrecisionPolicy casts nothing, so the loss can be bit-equal.
    model = get_peft_model(model, lora, autocast_adapter_dtype=False).to(device)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]

    holders, originals = {}, {}

    def quantize():
        for index, layer in enumerate(layers):
            for name in EXPERT_PARAMS:
                replace_parameter_4bit(
                    layer.mlp.experts, name, compress_statistics=True, quant_type=args.quant_type
                )
                key = f"layers.{index}.mlp.experts.{name}"
                holders[key] = getattr(layer.mlp.experts.parametrizations, name)
                originals[key] = holders[key].original.detach().clone()

    ok, _ = stage("quantize experts", quantize)
    generator = torch.Generator().manual_seed(args.input_seed)
    input_ids = torch.randint(0, TINY_MOE["vocab_size"], (args.batch, args.seq_len), generator=generator)
    input_ids = input_ids.to(device)
    if ok:
        ok, baseline_loss = stage(
            "baseline forward", lambda: model(input_ids=input_ids, labels=input_ids).loss
        )
    if ok:
        result["baseline_loss"] = baseline_loss.item()
        ok, _ = stage("baseline backward", baseline_loss.backward)
    params = dict(model.named_parameters())
    baseline_grads = {n: params[n].grad.detach().clone() for n in trainable if params[n].grad is not None}
    model.zero_grad(set_to_none=True)

    def shard():
        mesh = init_device_mesh(device.type, (world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    ok = ok and stage("fully_shard", shard)[0]
    result["experts"] = {}
    if ok:
        captured = {}
        handles = []
        for key, holder in holders.items():
            local = torch.chunk(originals[key], world_size, dim=0)[rank]
            result["experts"][key] = {"local": compare(local, holder.original)}

            def capture(module, inputs, key=key):  # what dequantize_4bit receives in forward
                captured.setdefault(key, inputs[0].detach().as_subclass(torch.Tensor).clone())

            handles.append(holder[0].register_forward_pre_hook(capture))
        forward_ok, loss = stage(
            "forward after fully_shard", lambda: model(input_ids=input_ids, labels=input_ids).loss
        )
        for handle in handles:
            handle.remove()
        for key, tensor in captured.items():
            result["experts"][key]["forward"] = compare(originals[key], tensor)
        if forward_ok:
            result["loss"] = loss.item()
            result["loss_bit_equal"] = bool(torch.equal(loss.detach(), baseline_loss.detach()))
            result["max_abs_delta"] = (loss.detach().float() - baseline_loss.detach().float()).abs().item()
            if stage("backward after fully_shard", loss.backward)[0]:
                grads = {"trainable": len(trainable), "with_grad": 0, "nonfinite_elements": 0, "bit_equal": 0}
                params = dict(model.named_parameters())  # fully_shard replaced them by DTensors
                for name in trainable:
                    grad = params[name].grad
                    if grad is None:
                        continue
                    local = grad._local_tensor if hasattr(grad, "_local_tensor") else grad
                    expected = torch.chunk(baseline_grads[name], world_size, dim=0)[rank]
                    grads["with_grad"] += 1
                    grads["nonfinite_elements"] += int((~torch.isfinite(local)).sum())
                    grads["bit_equal"] += int(torch.equal(local, expected))
                result["lora_grads"] = grads

        def unshard():
            for index, layer in enumerate(layers):
                layer.unshard()
                for key in (k for k in holders if k.startswith(f"layers.{index}.")):
                    result["experts"][key]["unsharded"] = compare(originals[key], holders[key].original)
                layer.reshard()

        stage("unshard", unshard)
    ranks = [None] * world_size
    dist.all_gather_object(ranks, result)  # rank 0 speaks for the run, in one line
    dist.destroy_process_group()
    status, line = verdict(ranks, device.type)
    if rank == 0:
        if args.json:
            for each in ranks:
                print(json.dumps(each), flush=True)
        print(line, flush=True)
    return status


PRE_SHARD_STAGES = ("build model", "LoRA", "quantize experts", "baseline forward", "baseline backward")


def verdict(ranks, device):
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED, 2 INCONCLUSIVE."""
    first = ranks[0]
    head = (
        f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']} "
        f"transformers {first['transformers']} peft {first['peft']}"
    )
    failures = [(r["rank"], f) for r in ranks for f in r["failures"]]
    setup = [(rank, f) for rank, f in failures if f["stage"] in PRE_SHARD_STAGES]
    if setup:
        rank, f = setup[0]
        failed = f"{f['stage']} on rank {rank}: {f['exception']}"
        return 2, f"INCONCLUSIVE {head}: the setup fails without FSDP2: {failed}"
    findings = [f"{f['stage']} fails on rank {rank}: {f['exception']}" for rank, f in failures]
    if any(r.get("loss_bit_equal") is False for r in ranks):
        findings.append(f"loss {first.get('loss')} vs baseline {first.get('baseline_loss')}")
    for view in ("forward", "local", "unsharded"):
        if any(not e[view]["bytes_equal"] for r in ranks for e in r.get("experts", {}).values() if view in e):
            findings.append(f"expert storage ({view}) differs from the quantized original")
    grads = [r["lora_grads"] for r in ranks if "lora_grads" in r]
    if any(
        g["with_grad"] < g["trainable"] or g["nonfinite_elements"] or g["bit_equal"] < g["with_grad"]
        for g in grads
    ):
        findings.append("LoRA gradient shards differ from the baseline's")
    if findings:
        return 1, f"REPRODUCED {head}: {'; '.join(findings)}"
    return 0, f"NOT REPRODUCED {head}: loss, LoRA gradients and every expert byte equal the baseline's"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
