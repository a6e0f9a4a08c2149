"""A report for one upstream repository, shaped like that repository's bug template.

Only the findings attributed to the repository, each with its standalone script embedded as
code (a maintainer has no checkout of this tool) and the line that runs it with the run's
configuration, what the run observed against what was expected, and the stack without any
path. PyTorch's template asks for a self-contained example, observed against expected, and
"Versions" (``collect_env``); bitsandbytes' (and the Hugging Face libraries') for "System
Info", "Reproduction" as code and "Expected behavior". Everything goes through
``report.redact``; the whole stays under GitHub's limit by folding evidence, never findings.
"""

from __future__ import annotations

import json
from pathlib import Path

from fsdpqdiag.render import reproducer
from fsdpqdiag.render.env_table import optional_packages
from fsdpqdiag.render.markdown import GITHUB_COMMENT_LIMIT, _fold_to_fit, _label, fsdpqdiag_command
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Report
from fsdpqdiag.report.redact import redact_data, redact_text

# The names a user types for a repository, and the repository attribution records.
REPOSITORIES = {
    "pytorch": "pytorch/pytorch",
    "bitsandbytes": "bitsandbytes-foundation/bitsandbytes",
    "transformers": "huggingface/transformers",
    "peft": "huggingface/peft",
    "axolotl": "axolotl-ai-cloud/axolotl",
}
EXIT_STATUS = {REPRODUCED: 1, NOT_REPRODUCED: 0, INCONCLUSIVE: 2}


class NothingToReport(ValueError):
    """The report holds no finding attributed to the repository asked for."""


def repository(name: str) -> str:
    """The ``owner/name`` a user's short or full name stands for."""
    key = name.strip().lower()
    if key in REPOSITORIES:
        return REPOSITORIES[key]
    if key in REPOSITORIES.values():
        return key
    raise ValueError(f"unknown repository {name!r} (known: {', '.join(REPOSITORIES)})")


def attributed(report: Report, repo: str) -> list:
    """The results whose attribution names ``repo``."""
    return [r for r in report.results if (r.evidence.get("attribution") or {}).get("report_to") == repo]


def _cpu_path_lines(env: dict) -> list[str]:
    path = (env.get("bitsandbytes") or {}).get("cpu_path")
    if not path:
        return []
    forced = path.get("override")
    how = (
        f"forced `{'on' if forced == 'on' else 'off'}` on this machine (layer attribute "
        "`support_avx512bf16_for_cpu`)"
        if forced
        else "as bitsandbytes chose it"
    )
    return [
        f"- CPU kernel path: `{path.get('path')}` ({how}); this CPU has AVX512-BF16: "
        f"{path.get('avx512_bf16')}. bitsandbytes takes the repack path by itself on CPUs with "
        "AVX512-BF16 (`bitsandbytes.functional.has_avx512bf16()`: Intel Cooper Lake, Sapphire "
        "Rapids and later Xeons, AMD Zen 4 and later), for a `Linear4bit` in inference "
        "(module not training, input without grad)."
    ]


def _stack_lines(env: dict) -> list[str]:
    torch_info = env.get("torch") or {}
    bnb = env.get("bitsandbytes") or {}
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus") or []) or "none"
    return [
        f"- bitsandbytes {bnb.get('version')} (backend {bnb.get('backend')})",
        f"- torch {torch_info.get('version')} (CUDA {torch_info.get('cuda')}, NCCL {torch_info.get('nccl')}, "
        f"cuDNN {torch_info.get('cudnn')})",
        f"- transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"accelerate {env.get('accelerate')}{optional_packages(env)}",
        f"- Python {env.get('python')}, {env.get('platform')} ({env.get('machine')})",
        f"- GPU: {gpus}; driver {env.get('driver')}",
        *_cpu_path_lines(env),
    ]


def _versions_block(env: dict) -> list[str]:
    """PyTorch's "Versions", in the shape of ``collect_env`` (no paths)."""
    torch_info = env.get("torch") or {}
    bnb = env.get("bitsandbytes") or {}
    gpus = "; ".join(g.get("name", "?") for g in env.get("gpus") or []) or "No CUDA"
    return [
        "```",
        f"PyTorch version: {torch_info.get('version')}",
        f"CUDA used to build PyTorch: {torch_info.get('cuda')}",
        f"NCCL version: {torch_info.get('nccl')}",
        f"OS: {env.get('platform')}",
        f"Python version: {env.get('python')}",
        f"GPU models and configuration: {gpus}",
        f"Nvidia driver version: {env.get('driver')}",
        "Versions of relevant libraries:",
        f"[pip3] bitsandbytes=={bnb.get('version')}",
        f"[pip3] transformers=={env.get('transformers')}",
        f"[pip3] peft=={env.get('peft')}",
        "```",
    ]


def _finding_lines(r) -> list[str]:
    """One finding: what was run, the line that reruns it, observed against expected."""
    attribution = r.evidence.get("attribution") or {}
    known = ", ".join(attribution.get("known_issues") or []) or "none known"
    line = reproducer.command(r, bare=True)
    missing = reproducer.arguments(r)[1]
    status = EXIT_STATUS.get(r.verdict)
    lines = [
        f"#### `{_label(r)}` at world size {r.world_size} on {r.device}/{r.backend}: {r.verdict}",
        "",
        f"Component: {attribution.get('component')}; known upstream issues: {known}.",
        "",
    ]
    if line:
        lines += [
            f"Save the script embedded here as `{Path(reproducer.script_of(r.probe)).name}` and run:",
            "",
            "```sh",
            line,
            "```",
        ]
        if missing:
            lines.append(f"(The script has no option for {', '.join(missing)}; the run used these.)")
        lines.append("")
    lines += [f"**Observed** (fsdpqdiag's measurement of the same code): {r.summary}", ""]
    # Every script prints one verdict line from rank 0 and exits with it.
    if line and status is not None:
        lines += [f"The script prints one line starting `{r.verdict}` and exits {status}.", ""]
    lines += [
        "**Expected:** every rank completes, and the layer gives the same bytes and the same "
        "output under FSDP2 as without it"
        + (" (the script prints `NOT REPRODUCED` and exits 0)." if line else "."),
        "",
        "Controls that decided the component:",
        *(f"- {decided}" for decided in attribution.get("decided_by") or []),
        "",
    ]
    return lines


def _script_lines(results) -> list[str]:
    """Each finding's script once, as code: the reproducer needs only torch and bitsandbytes."""
    lines: list[str] = []
    for script in dict.fromkeys(reproducer.script_of(r.probe) for r in results):
        if script is None:
            continue
        source = reproducer.source_of(script)
        name = Path(script).name
        if source is None:
            lines += [f"(`{name}` is not shipped with this installation of fsdpqdiag.)", ""]
            continue
        lines += [f"<details open><summary><code>{name}</code></summary>", "", "```python"]
        lines += [redact_text(source).rstrip("\n"), "```", "</details>", ""]
    return lines


def render(report: Report, repo: str, limit: int = GITHUB_COMMENT_LIMIT) -> str:
    """The findings of ``report`` attributed to ``repo``, in that repository's bug template."""
    repo = repository(repo)
    results = attributed(report, repo)
    if not results:
        named = sorted(
            {(r.evidence.get("attribution") or {}).get("report_to") or "-" for r in report.results}
        )
        raise NothingToReport(
            f"no finding in this report is attributed to {repo} (attributed: {', '.join(named)})"
        )
    findings = [line for r in results for line in _finding_lines(r)]
    scripted = any(reproducer.script_of(r.probe) for r in results)
    intro = [
        f"{len(results)} finding(s) measured by fsdpqdiag `{fsdpqdiag_command(report)}` "
        f"({report.fsdpqdiag_version})"
        + (
            "; each reruns from the script embedded here alone (torch and bitsandbytes only)."
            if scripted
            else "."
        ),
        "",
    ]
    if repo == REPOSITORIES["pytorch"]:
        head = ["### 🐛 Describe the bug", "", *intro, *findings, *_script_lines(results), "### Versions", ""]
        head += _versions_block(report.env)
    else:
        head = ["### System Info", "", *_stack_lines(report.env), "", "### Reproduction", "", *intro]
        head += [*_script_lines(results), *findings]
        head += [
            "### Expected behavior",
            "",
            "The same bytes and output under FSDP2 as without it (see each finding).",
        ]
    details = [
        (f"evidence: {r.probe} ws={r.world_size}", json.dumps(redact_data(r.evidence), indent=1))
        for r in results
    ]
    return _fold_to_fit([redact_text(line) for line in head], details, limit)
