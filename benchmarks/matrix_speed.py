"""Wall time of the default matrix in one launch per world size vs one launch per cell.

    python benchmarks/matrix_speed.py --ws 2 --device cpu
    python benchmarks/matrix_speed.py --ws 2 --device cuda --preset tinyllama-1.1b

Both sweeps run in the same invocation, one after the other, through the real CLI; the
output names the machine and the stack.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsdpqdiag.rank import env  # noqa: E402


def sweep(args, isolate: bool) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        command = [
            sys.executable,
            "-m",
            "fsdpqdiag",
            "matrix",
            "--ws",
            str(args.ws),
            "--device",
            args.device,
            "--preset",
            args.preset,
            "--json",
            str(report),
            "-q",
        ]
        if isolate:
            command.append("--isolate-cells")
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        verdicts = {
            r["config"]["cell"]["name"]: r["verdict"] for r in json.loads(report.read_text())["results"]
        }
    return elapsed, verdicts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny-llama")
    args = parser.parse_args()
    # Build the preset first so neither sweep pays for it.
    from fsdpqdiag.stack.models import preset_dir

    preset_dir(args.preset)
    one_launch, verdicts = sweep(args, isolate=False)
    isolated, verdicts_isolated = sweep(args, isolate=True)
    stack = env.capture()
    print(
        json.dumps(
            {
                "benchmark": "matrix_speed",
                "ws": args.ws,
                "device": args.device,
                "preset": args.preset,
                "one_launch_s": round(one_launch, 1),
                "isolated_cells_s": round(isolated, 1),
                "speedup": round(isolated / one_launch, 2),
                "same_verdicts": verdicts == verdicts_isolated,
                "verdicts": verdicts,
                "torch": stack["torch"]["version"],
                "bitsandbytes": stack["bitsandbytes"]["version"],
                "gpus": [g["name"] for g in stack["gpus"]],
                "cpus": __import__("os").cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
