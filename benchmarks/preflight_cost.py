"""Seconds the stack preflight adds to a report.

    python benchmarks/preflight_cost.py --ws 2 --device cpu --rounds 3

reproduce, localize and forensics run the preflight first in the probes' own launch; doctor,
matrix and fix give it a launch of its own. Interleaved in the same rounds: every reproduce
probe in one launch without the preflight, the same led by the preflight (its subject the
Linear4bit), and the preflight in its own launch with the Linear4bit and with the tiny-llama
preset. Medians; the output names the stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsdpqdiag import api  # noqa: E402
from fsdpqdiag.analyses import preflight  # noqa: E402
from fsdpqdiag.core.config import LinearConfig, RunConfig  # noqa: E402
from fsdpqdiag.rank import env  # noqa: E402
from fsdpqdiag.stack.models import preset_dir  # noqa: E402
from fsdpqdiag.tasks import PROBES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = RunConfig(world_size=args.ws, device=args.device, timeout_s=600)
    linear = dataclasses.asdict(LinearConfig())
    variants = {
        "reproduce probes, no preflight": lambda: api.run_probes(list(PROBES), linear, run),
        "reproduce probes led by preflight": lambda: api.run_checked(
            list(PROBES), linear, run, {"linear": linear}
        ),
        "preflight own launch, Linear4bit": lambda: preflight.run_preflight(run, {"linear": linear}),
        "preflight own launch, tiny-llama": lambda: preflight.run_preflight(
            run, {"model": {"model": str(preset_dir("tiny-llama"))}}
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, call in variants.items():
            started = time.monotonic()
            call()
            seconds[name].append(time.monotonic() - started)
    stack = env.capture()
    result = {
        "benchmark": "preflight_cost",
        "world_size": args.ws,
        "device": args.device,
        "rounds": args.rounds,
        "median_s": {name: round(statistics.median(values), 2) for name, values in seconds.items()},
        "all_s": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "stack": {
            "torch": stack["torch"]["version"],
            "bitsandbytes": stack["bitsandbytes"]["version"],
            "gpus": [g["name"] for g in stack["gpus"]],
        },
    }
    print(json.dumps(result))
    for name, median in result["median_s"].items():
        print(f"{name:<36} {median:>7.2f} s  (rounds: {', '.join(map(str, result['all_s'][name]))})")


if __name__ == "__main__":
    main()
