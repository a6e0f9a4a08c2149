"""Bandwidth of the byte diff (fsdpqdiag.evidence.bytes.diff) against a same-run clone().

    python benchmarks/bytediff.py --device cuda --max-mib 4096
    python benchmarks/bytediff.py --device cpu --max-mib 256

For each size (1 MiB doubling up to --max-mib, capped by free memory) a bf16 tensor of
packed-looking random bits is diffed against a copy with 0.1 % of its containers altered
(as Mechanism A does); GB/s counts the bytes of both inputs read once. clone() of the same
tensor, timed in the same run, counts bytes read and written. Medians of --repeats.

A figure of a wrong diff is worthless: each size's result is checked against the count of
containers altered, and on a GPU the smallest size's whole evidence against the CPU's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsdpqdiag.evidence.bytes import diff  # noqa: E402
from fsdpqdiag.rank import env


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-mib", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    mib = 1
    while mib <= args.max_mib:
        if args.device == "cuda" and torch.cuda.mem_get_info()[0] < 5 * mib * 2**20:
            break
        elements = mib * 2**20 // 2
        # Generated where it is diffed: a 4 GiB tensor made on the host costs more device
        # time than the whole sweep.
        generator = torch.Generator(device=args.device).manual_seed(mib)
        bits = torch.randint(
            -(2**15), 2**15, (elements,), dtype=torch.int32, generator=generator, device=args.device
        ).to(torch.int16)
        original = bits.view(torch.bfloat16)
        del bits
        altered = original.clone()
        altered.view(torch.int16)[::1000] = 0x7FFF
        result = diff(original, altered)  # also the warm-up
        expected = int((original.view(torch.int16)[::1000] != 0x7FFF).sum())
        if result["differing_elements"] != expected:
            sys.exit(f"{mib} MiB: diff found {result['differing_elements']} containers, {expected} altered")
        if args.device != "cpu" and not rows and diff(original.cpu(), altered.cpu()) != result:
            sys.exit(f"{mib} MiB: the {args.device} evidence differs from the CPU's")
        diff_s = timed(lambda a=original, b=altered: diff(a, b), args.device, args.repeats)
        clone_s = timed(lambda a=original: a.clone(), args.device, args.repeats)
        nbytes = original.numel() * 2
        rows.append(
            {
                "mib": mib,
                "diff_gb_s": round(2 * nbytes / diff_s / 1e9, 2),
                "clone_gb_s": round(2 * nbytes / clone_s / 1e9, 2),
                "diff_vs_clone_pct": round(100 * clone_s / diff_s, 1),
                "differing_elements": expected,
            }
        )
        del original, altered
        mib *= 2
    stack = env.capture()
    print(
        json.dumps(
            {
                "benchmark": "bytediff",
                "device": args.device,
                "rows": rows,
                "torch": stack["torch"]["version"],
                "gpus": [g["name"] for g in stack["gpus"]],
            }
        )
    )
    for row in rows:
        print(
            f"{row['mib']:>6} MiB  diff {row['diff_gb_s']:>8} GB/s  clone {row['clone_gb_s']:>8} GB/s  "
            f"diff/clone {row['diff_vs_clone_pct']:>5} %"
        )


if __name__ == "__main__":
    main()
