"""Several standalone reproducers, one after another, in one process per rank (tests only).

    [torchrun --nproc-per-node N] tests/support/script_batch.py PLAN.json OUT_DIR PORT

PLAN.json lists each script's command line (script path first). Each script's ``main()`` runs
as ``python SCRIPT ...`` would run it (its own argv, its own process group, created and
destroyed by the script), its standard output kept apart; OUT_DIR/rankR.json receives, per
script, what ``main()`` returned (the script's exit status) and what it printed. The scripts
share the interpreter's imports: that is the saving, a fresh interpreter importing torch and
bitsandbytes per script and rank being most of a script's cost on a small CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import traceback


def run_one(index: int, argv: list[str], port: int) -> dict:
    import torch.distributed as dist

    # A store of the script's own (rank 0 serves it on PORT + index): a process group made again
    # in torchrun's agent store would meet the keys the previous script's left there.
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    os.environ["MASTER_PORT"] = str(port + index)
    printed = io.StringIO()
    sys.argv = list(argv)
    spec = importlib.util.spec_from_file_location(f"batched_reproducer_{index}", argv[0])
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(printed):
        try:
            spec.loader.exec_module(module)
            status = module.main()
        except SystemExit as stop:  # argparse, or a script's own exit
            status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:  # noqa: BLE001 - as an uncaught exception ends the script: status 1
            traceback.print_exc(file=sys.stderr)
            status = 1
    if dist.is_initialized():  # a script that failed before its own teardown
        dist.destroy_process_group()
    return {"status": status, "stdout": printed.getvalue()}


def main() -> None:
    plan_path, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])  # argv: each script's own
    with open(plan_path) as handle:
        plan = json.load(handle)
    results = [run_one(index, argv, port) for index, argv in enumerate(plan)]
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # as the scripts leave: no interpreter teardown under gloo's worker threads
