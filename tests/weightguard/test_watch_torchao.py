"""fsdpqdiag watch on a torchtune-style torchao QLoRA loop (NF4Tensor weights) under torchrun.

Every NF4 weight is guarded through the inner tensors FSDP2 all-gathers (never "0 guarded
weights"); the positive control swap-packed-nibbles, which alters the unsharded packed codes,
trips it. CPU, gloo, WS=2: at WS=1 torch from 2.9 refuses an NF4Tensor's all-gather extension.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[torchao]'")

EXAMPLE = ROOT / "examples" / "train_torchao_qlora.py"
INNER = ("quantized_data", "quantized_scalers", "quantization_factor")


def _watch(tmp: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    completed = subprocess.run(
        [sys.executable, "-m", "fsdpqdiag", "watch", *options, "--json", "w.json", "--",
         *torchrun, str(EXAMPLE), "--steps", "2"],
        capture_output=True, text=True, timeout=420, env=env, cwd=tmp,
    )  # fmt: skip
    assert (tmp / "w.json").exists(), completed.stderr[-3000:]
    return completed, json.loads((tmp / "w.json").read_text())


def _evidence(report: dict) -> dict:
    (result,) = report["results"]
    return result["evidence"]


def test_every_nf4_weight_is_checked(tmp_path):
    completed, report = _watch(tmp_path)
    names = set(_evidence(report)["guarded_parameters"])
    assert names == {f"{block}.weight.{inner}" for block in ("0", "1") for inner in INNER}, names
    assert _evidence(report)["checks"] >= 2 * len(names)  # each inner tensor at every step, at least
    assert report["results"][0]["verdict"] == "NOT REPRODUCED" and completed.returncode == 0


def test_altered_packed_codes_trip_it(tmp_path):
    completed, report = _watch(tmp_path, "--inject", "swap-packed-nibbles")
    altered = {row["parameter"] for row in _evidence(report)["modules"]}
    assert altered == {"0.weight.quantized_data", "1.weight.quantized_data"}, altered
    assert report["results"][0]["verdict"] == "REPRODUCED" and completed.returncode == 1
