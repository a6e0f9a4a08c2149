"""The stack under test, captured into every report.

Narrowed from ``python -m torch.utils.collect_env`` and ``python -m bitsandbytes`` to what
decides these bugs: versions of torch/CUDA/NCCL/bitsandbytes/transformers/peft, the
native library bitsandbytes loaded, the GPUs and their driver. Never raises: a missing
piece is recorded as missing.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
from typing import Any

from fsdpqdiag.rank import stacklog
from fsdpqdiag.stack import bnb_cpu_path


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return {"version": None, "error": str(exc)}
    info: dict[str, Any] = {
        "version": torch.__version__,
        "git_version": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "distributed_available": torch.distributed.is_available(),
        "gloo_available": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
        "nccl_available": torch.distributed.is_available() and torch.distributed.is_nccl_available(),
        "nccl": None,
        "cudnn": None,
    }
    if info["nccl_available"] and torch.cuda.is_available():
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as exc:  # noqa: BLE001
            info["nccl"] = f"unknown ({exc})"
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return gpus


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _bitsandbytes_info(import_it: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {"version": _version("bitsandbytes")}
    if info["version"] is None or not (import_it or "bitsandbytes" in sys.modules):
        return info
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes import cextension
    except Exception as exc:  # noqa: BLE001 - a broken install is itself a finding
        info["import_error"] = f"{type(exc).__name__}: {exc}"
        return info
    info["backend"] = getattr(cextension, "BNB_BACKEND", None)
    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    if mock is not None and isinstance(getattr(cextension, "lib", None), mock):
        # bitsandbytes imports without its native library and fails only at the first kernel
        # call; a diagnosis on such a stack would blame FSDP2 for a broken install.
        first_line = (getattr(cextension.lib, "error_msg", "") or "").strip().splitlines()
        info["native_library_error"] = first_line[0] if first_line else "no native library could be loaded"
    try:
        info["cpu_path"] = bnb_cpu_path.describe()
    except ValueError as exc:
        info["cpu_path"] = {"error": str(exc)}
    info["log"] = stacklog.captured()
    library = getattr(cextension, "lib", None)
    native = getattr(library, "_lib", None)
    info["native_library"] = getattr(native, "_name", None) or type(library).__name__
    return info


def capture(import_bitsandbytes: bool = True) -> dict[str, Any]:
    """The stack as this process sees it (imports torch and bitsandbytes: seconds).
    ``import_bitsandbytes=False`` (inside a user's process): bitsandbytes is described only
    if the process has imported it, else by its installed version alone."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": _torch_info(),
        "bitsandbytes": _bitsandbytes_info(import_bitsandbytes),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "accelerate": _version("accelerate"),
        # torchao's NF4Tensor is the reference the torchao-nf4-reference probe compares with.
        "torchao": _version("torchao"),
        "gpus": _gpus(),
        "driver": _driver(),
    }


def problem(captured: dict[str, Any]) -> str | None:
    """Why nothing can run on the stack ``captured`` describes, in one line, or None."""
    torch_info = captured.get("torch") or {}
    if torch_info.get("version") and not torch_info.get("distributed_available", True):
        return "this torch build has no distributed support (torch.distributed)"
    bnb = captured.get("bitsandbytes") or {}
    if bnb.get("import_error"):
        return f"bitsandbytes does not import: {bnb['import_error']}"
    if bnb.get("native_library_error"):
        return f"bitsandbytes has no usable native library: {bnb['native_library_error']}"
    return None
