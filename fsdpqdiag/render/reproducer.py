"""The standalone script that reruns one result, with that result's configuration.

A line under "To reproduce" must run what the tool ran on the device it ran on: the world
size, device, geometry, seeds and kernel path of the result, passed as the script's own
options. The options a script accepts are read from its source (its ``add_argument``
calls), so a script and this module cannot drift apart; a setting the script has no option
for is named beside the line rather than silently dropped.
"""

from __future__ import annotations

import re
import shlex
import site
import sysconfig
from functools import cache
from pathlib import Path

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.tasks import PROBES

# The checkout's scripts sit beside the package; an installed wheel puts them under its data
# prefix (``share/fsdpqdiag/reproducers/``, see pyproject.toml), for a system, venv or user install.
SCRIPTS_ROOT = Path(__file__).resolve().parents[2]
INSTALLED_ROOTS = tuple(
    Path(prefix) / "share" / "fsdpqdiag" for prefix in (sysconfig.get_path("data"), site.USER_BASE) if prefix
)
_OPTION = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"")
# Configuration keys a script may take as an option of the same name.
_CONFIG_OPTIONS = ("in_features", "out_features", "weight_seed", "input_seed", "batch", "quant_type")
_DEFAULTS = LinearConfig().__dict__


def script_of(probe: str) -> str | None:
    """The probe's standalone script, relative to the checkout, or None."""
    return PROBES[probe].standalone if probe in PROBES else None


def path_of(script: str) -> Path | None:
    """Where this installation keeps ``script`` (``reproducers/NAME.py``), or None."""
    for root in (SCRIPTS_ROOT, *INSTALLED_ROOTS):
        if (root / script).is_file():
            return root / script
    return None


@cache
def source_of(script: str) -> str | None:
    """The script's text, or None where this installation has no ``reproducers/``."""
    path = path_of(script)
    return path.read_text() if path else None


def _options(script: str) -> set[str]:
    return set(_OPTION.findall(source_of(script) or ""))


def arguments(result) -> tuple[list[str], list[str]]:
    """The script's options for ``result``, and the settings of the run it has no option for."""
    script = script_of(result.probe)
    accepted = _options(script) if script else set()
    args: list[str] = []
    missing: list[str] = []
    if "--device" in accepted:
        args += ["--device", result.device]
    if "--backend" in accepted:
        args += ["--backend", result.backend]
    elif result.device == "cuda" and result.backend != "nccl":
        missing.append(f"backend={result.backend}")
    for key in _CONFIG_OPTIONS:
        if key not in result.config:
            continue
        option = "--" + key.replace("_", "-")
        if option in accepted:
            args += [option, str(result.config[key])]
        elif result.config[key] != _DEFAULTS.get(key):
            missing.append(f"{key}={result.config[key]}")
    if "--repack" in accepted and "repack_path" in result.evidence:
        args += ["--repack", "on" if result.evidence["repack_path"] else "off"]
    for key, value in result.config.items():
        if key not in _CONFIG_OPTIONS and key in _DEFAULTS and value != _DEFAULTS[key]:
            missing.append(f"{key}={value}")
    if getattr(result, "injected", None):  # a fault of the tool's: the script runs the stack as it is
        missing.append(f"inject={result.injected}")
    return args, missing


def command(result, *, bare: bool = False) -> str | None:
    """The shell-quoted line that reruns ``result`` (torchrun for several ranks), or None.
    ``bare``: the script by its file name alone, as saved from a report that embeds it."""
    script = script_of(result.probe)
    if script is None:
        return None
    if bare:
        script = Path(script).name
    args, _ = arguments(result)  # read from the checkout's script, whatever name it is run by
    launcher = (
        ["python"] if result.world_size == 1 else ["torchrun", "--nproc-per-node", str(result.world_size)]
    )
    return shlex.join([*launcher, script, *args])
