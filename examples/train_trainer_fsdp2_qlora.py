"""QLoRA with the Hugging Face Trainer sharding through accelerate's FSDP2, guarded by GuardCallback.

    torchrun --nproc-per-node 1 examples/train_trainer_fsdp2_qlora.py --guard-report g.json   # 1 GPU
    torchrun --nproc-per-node 2 examples/train_trainer_fsdp2_qlora.py --guard-report g.json   # 2 GPUs
    fsdpqdiag watch --json w.json -- torchrun --nproc-per-node 2 examples/train_trainer_fsdp2_qlora.py

The Trainer as an FSDP-QLoRA user drives it: a causal LM loaded through from_pretrained with a
BitsAndBytesConfig (NF4, bf16 quant storage), PEFT LoRA on every projection, and
``fsdp=True`` with ``fsdp_version: 2`` and one unit per decoder layer, so that
accelerate calls ``fully_shard`` while the Trainer prepares the model. ``--guard-report`` adds
``GuardCallback``, which attaches once the model is sharded; under ``fsdpqdiag watch`` it is not
needed. ``--inject`` has the callback apply one of fsdpqdiag's faults (``nan-canonicalize``:
FSDP2's unshard copy canonicalizes NaN payloads) in every rank, the positive control the guard
must trip on (under ``watch``, ``watch --inject`` does it).
The model is fsdpqdiag's offline preset (fixed-seed weights built from a config, no download).

accelerate runs FSDP only on GPUs: on CPU (``MULTI_CPU``) it wraps the model in
DistributedDataParallel instead and nothing is sharded (docs/watch.md).
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments


class RandomTokens(torch.utils.data.Dataset):
    """Fixed-seed token ids, labels the ids: enough for a few optimizer steps."""

    def __init__(self, vocab: int, rows: int, seq_len: int):
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local Hugging Face causal-LM directory (default: a preset)")
    parser.add_argument("--preset", default="tiny-llama", help="tiny-llama | tinyllama-1.1b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="the Trainer's ddp_backend")
    parser.add_argument("--guard-report", help="add GuardCallback; rank 0 writes its report here")
    parser.add_argument("--inject", help="with --guard-report: a fault of fsdpqdiag.stack.faults")
    parser.add_argument("--output-dir", default=os.environ.get("TMPDIR", "/tmp") + "/trainer-fsdp2-qlora")
    args = parser.parse_args()
    if args.inject and not args.guard_report:
        parser.error("--inject is applied by the callback: give --guard-report too (or use watch --inject)")
    return args


def load_model(args: argparse.Namespace):
    if args.model:
        path = args.model
    else:
        from fsdpqdiag.stack.models import preset_dir

        path = preset_dir(args.preset)  # atomic: concurrent ranks may build it together
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,  # what lets FSDP shard the packed weights
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = local_rank % max(1, torch.cuda.device_count()) if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": device},
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
    return get_peft_model(model, lora)


def main() -> None:
    args = parse_args()
    callbacks = []
    if args.guard_report:
        from fsdpqdiag.integrations.hf_trainer import GuardCallback

        # Made before the Trainer shards the model: a fault (or fix) is in place by then.
        callbacks.append(GuardCallback(action="report", report_path=args.guard_report, inject=args.inject))
    model = load_model(args)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=args.backend,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        fsdp=True,
        fsdp_config={
            "fsdp_version": 2,  # accelerate's fully_shard, not FSDP1's wrapper
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": False,
        },
    )
    rows = args.steps * args.batch * int(os.environ.get("WORLD_SIZE", "1"))
    dataset = RandomTokens(model.config.vocab_size, rows, args.seq_len)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    modules = trainer.model_wrapped.named_modules()
    sharded = [name or "(root)" for name, module in modules if hasattr(module, "_get_fsdp_state")]
    if int(os.environ.get("RANK", "0")) == 0:
        kind = trainer.accelerator.distributed_type
        print(f"sharded units: {len(sharded)} ({kind}): {', '.join(sharded)}", flush=True)
        for callback in callbacks:
            findings = len((callback.state or {}).get("findings", [])) if callback.state else None
            print(f"guard: attached={callback.state is not None} findings={findings}", flush=True)


if __name__ == "__main__":
    main()
