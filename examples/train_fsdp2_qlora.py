"""A minimal real FSDP2 QLoRA training loop: what `fsdpqdiag watch` is meant to wrap.

    torchrun --nproc-per-node 2 examples/train_fsdp2_qlora.py --steps 3            # CPU (gloo)
    torchrun --nproc-per-node 2 examples/train_fsdp2_qlora.py --device cuda        # GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/train_fsdp2_qlora.py --device cuda --backend gloo  # 1 GPU
    fsdpqdiag watch --json w.json -- torchrun --nproc-per-node 2 examples/train_fsdp2_qlora.py

A causal LM loaded through from_pretrained with a BitsAndBytesConfig (NF4, bf16 quant storage,
as FSDP-QLoRA does), PEFT LoRA on every projection, `fully_shard` per decoder layer then the
root with a bf16 MixedPrecisionPolicy, AdamW on the adapters, a few steps on a fixed batch.
`--guard` guards it in code (the plain-loop integration); under `fsdpqdiag watch` it is not
needed. The model is fsdpqdiag's offline preset (fixed-seed weights, no download) or `--model`.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local Hugging Face causal-LM directory (default: a preset)")
    parser.add_argument("--preset", default="tiny-llama", help="tiny-llama | tinyllama-1.1b")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="cuda: nccl (default) or gloo; cpu: gloo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--guard", choices=("quantized", "all"), help="guard the weights in code")
    parser.add_argument("--guard-report", help="with --guard: rank 0 writes the report here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        # More ranks than GPUs share them (gloo only: NCCL refuses two ranks on one GPU).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if (args.backend or "nccl") == "nccl":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank = dist.get_rank()

    if args.model:
        path = args.model
    else:
        from fsdpqdiag.stack.models import preset_dir

        if rank == 0:  # built once, offline, on first use; the other ranks wait for it
            preset_dir(args.preset)
        dist.barrier()
        path = preset_dir(args.preset)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": device.index if device.type == "cuda" else "cpu"},
        local_files_only=True,
    )
    torch.manual_seed(0)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    model.train()

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

    guard = None
    if args.guard:
        import fsdpqdiag

        guard = fsdpqdiag.guard(model, params=args.guard, action="report", report_path=args.guard_report)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(1234 + rank)
    vocab = model.config.vocab_size
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)

    if guard is not None:
        state = guard.close()
        if rank == 0:
            print(f"guard: {len(state['findings'])} finding(s) on rank 0", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
