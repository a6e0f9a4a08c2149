"""Markdown view of any report, to paste into an upstream issue as it is.

A summary paragraph with each verdict, the commands that reproduce it (fsdpqdiag and the
standalone script), one table, sample elements, the full evidence inside <details>, and
the environment. GitHub refuses comments over 65,536 characters: the largest evidence
blocks are folded first, with a note saying what was cut.
"""

from __future__ import annotations

import json

from fsdpqdiag.render.preflight_table import markdown_lines as preflight_lines
from fsdpqdiag.render.table import COMBINATION_COLUMNS, COMBINATION_PROBES, combination_cells
from fsdpqdiag.report import Report

GITHUB_COMMENT_LIMIT = 65_536
SECTIONS = ("swap_target", "local_tensor", "full_tensor", "full_tensor()", "redistribute([Replicate()])")


def _bytes(section) -> str:
    if not isinstance(section, dict):
        return "–"
    if section.get("status") not in (None, "completed"):
        return f"{section['status']} {section.get('signal') or ''}".strip()
    if not section.get("comparable", True):
        return "changed form"
    return f"{section.get('differing_elements', 0)} el / {section.get('differing_bytes', 0)} B"


def _label(r) -> str:
    config = r.config
    for key in ("cell", "workaround", "target"):
        if key in config:
            value = config[key]["name"] if key == "cell" else config[key]
            return f"{r.probe} {value}"
    return r.probe


def _stage(entry) -> str:
    """One stage of a staged probe (int8-params): ok, altered, raised <exception type>, not run."""
    if not isinstance(entry, dict):
        return "–"
    if entry.get("status") == "raised":
        return f"raised {(entry.get('error') or '').split(':', 1)[0]}".strip()
    if entry.get("status") == "not run":
        return "not run"
    return "ok" if entry.get("ok") else "altered"


def _key_numbers(r) -> str:
    ev = r.evidence
    if ev.get("failed_preconditions"):  # UNSUPPORTED: the probe was not run
        return "failed in preflight: " + ", ".join(c["name"] for c in ev["failed_preconditions"])
    if r.probe in ("nan-canonicalization", "full-tensor-crash"):
        parts = [f"{name}: {_bytes(ev.get(name))}" for name in SECTIONS if name in ev]
        if "max_abs_delta" in ev:
            parts.append(f"max \\|Δy\\| {ev['max_abs_delta']}")
        return "; ".join(parts)
    if r.probe == "quant-state-loss":
        handed, recovery = ev.get("forward_weight") or {}, ev.get("recovery") or {}
        reshard, update = ev.get("after_reshard") or {}, ev.get("after_update") or {}
        parts = [
            f"forward gets {handed.get('type')} quant_state={handed.get('has_quant_state')}",
            f"recovered={recovery.get('restored')} replaced weight={recovery.get('replaced_module_weight')} "
            f"shares FSDP2 storage={recovery.get('uses_fsdp_storage')}",
        ]
        if (ev.get("forward") or {}).get("error"):
            parts.append(f"forward raised {ev['forward']['error']}")
        if reshard:
            parts.append(f"freed on reshard={reshard.get('memory_freed')}")
        if update:
            parts.append(f"stale after update={update.get('stale')}")
        return "; ".join(parts)
    if r.probe in COMBINATION_PROBES:
        failing = ev.get("failing_combinations") or []
        mismatched = sum(not row["matching"] for row in ev.get("rows", []))
        return f"{len(failing)} of {mismatched} mismatched pairs break" + (
            f": {', '.join(failing)}" if failing else ""
        )
    if r.probe == "moe-expert-quant":
        views = {"forward": "in forward", "local": "shard", "unsharded": "after unshard"}
        loss = ev.get("loss", "– (no forward)")
        parts = [f"loss {loss} vs baseline {ev.get('baseline_loss', '–')}"]
        parts += [
            f"experts {label}: {_bytes(ev.get(f'expert_storage_{view}'))}" for view, label in views.items()
        ]
        grads = ev.get("lora_grads")
        if grads:
            parts.append(f"LoRA grads bit-equal {grads['bit_equal']}/{grads['trainable']}")
        parts += [f"{f['stage']} failed: {f['exception']}" for f in ev.get("failures", [])[:1]]
        return "; ".join(parts).replace("|", "\\|")
    if r.probe == "forensics" and "totals" in ev:
        totals, ended = ev["totals"], (ev.get("full_tensor") or {})
        return (
            f"{totals['altered_modules']} of {totals['quantized_modules']} weights altered, "
            f"{totals['differing_elements']} elements; "
            f"loss {ev.get('loss_before')} → {ev.get('loss_after')}; "
            f"full_tensor(): {ended.get('signal') or ended.get('status')}"
        )
    if r.probe == "non-float-params":
        refusal = ev.get("fully_shard") or {}
        if refusal.get("status") == "raised":
            return (
                f"fully_shard raised {refusal['error']} ({refusal.get('fsdp_frame') or refusal.get('where')})"
            )
        return "; ".join(
            f"{name}: {ev[name]['unsharded_dtype']}, bytes equal {ev[name].get('bytes_equal')}"
            for name in ("u8", "i8")
            if name in ev
        )
    if r.probe == "matrix":
        loss, baseline = ev.get("loss_fsdp2"), ev.get("loss_baseline")
        return f"loss {loss} vs {baseline}; differing {ev.get('differing_elements')}"
    if r.probe == "fix-verify":
        return f"first divergence: {ev.get('first_divergence') or 'none'}"
    if r.probe == "localize":
        stage = (ev.get("first_altering_stage") or {}).get("stage")
        op = (ev.get("first_altering_op") or {}).get("stage")
        return f"first altering stage: {stage or 'none'}; first altering op: {op or 'none'}"
    if r.probe == "cpu-weight-repack" and "forwards" in ev:
        path = "repack" if ev.get("repack_path") else "dequantize"
        return f"{path} path; " + "; ".join(
            f"forward {i + 1}: bytes equal {f['received']['bytes_equal']}, max \\|Δy\\| {f['max_abs_delta']}"
            for i, f in enumerate(ev["forwards"])
        )
    if isinstance(ev.get("stages"), dict):
        return "; ".join(f"{name}: {_stage(entry)}" for name, entry in ev["stages"].items())
    return ""


def _md_row(cells) -> str:
    return "  | " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _reproduce_lines(report: Report) -> list[str]:
    from fsdpqdiag.tasks import PROBES

    lines = [f"    fsdpqdiag {' '.join(report.argv) if report.argv else report.command}"]
    scripts = sorted(
        {
            PROBES[r.probe].standalone
            for r in report.results
            if r.probe in PROBES and PROBES[r.probe].standalone
        }
    )
    for ws in report.world_sizes:
        lines += [f"    torchrun --nproc-per-node {ws} {script}" for script in scripts]
    return lines


def render(report: Report, limit: int = GITHUB_COMMENT_LIMIT) -> str:
    torch_info = report.env.get("torch", {})
    bnb = report.env.get("bitsandbytes", {})
    gpus = ", ".join(g["name"] for g in report.env.get("gpus", [])) or "no GPU"
    env = report.env
    stack = (
        f"torch {torch_info.get('version')} (CUDA {torch_info.get('cuda')}, NCCL {torch_info.get('nccl')}), "
        f"bitsandbytes {bnb.get('version')} ({bnb.get('backend')}), transformers {env.get('transformers')}, "
        f"peft {env.get('peft')}, {gpus}, driver {env.get('driver')}, Python {env.get('python')}"
    )
    verdicts = "; ".join(f"**{r.verdict}** {_label(r)} (ws={r.world_size})" for r in report.results)
    injected = {r.injected for r in report.results if r.injected}
    head = [
        f"## fsdpqdiag {report.command}",
        "",
        f"On {stack}: {verdicts}."
        + (f" Positive control: the fault `{', '.join(sorted(injected))}` was injected." if injected else ""),
        "",
        "To reproduce:",
        "",
        *_reproduce_lines(report),
        "",
        "| run | ws | device | injected | verdict | key numbers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    head += [
        f"| {_label(r)} | {r.world_size} | {r.device}/{r.backend} | {r.injected or '–'} | **{r.verdict}** | "
        f"{_key_numbers(r)} |"
        for r in report.results
    ]
    head.append("")
    for r in report.results:
        attribution = r.evidence.get("attribution")
        if attribution:
            target = attribution.get("report_to") or "nobody upstream"
            known = ", ".join(attribution.get("known_issues") or []) or "no known upstream issue"
            head.append(
                f"- **{r.verdict}** {_label(r)} (ws={r.world_size}): File against: {target} "
                f"({attribution['component']}); {known}. {r.summary}"
            )
            head.append(f"  Decided by: {'; '.join(attribution.get('decided_by') or [])}")
        else:
            head.append(f"- **{r.verdict}** {_label(r)} (ws={r.world_size}): {r.summary}")
        if r.probe in COMBINATION_PROBES and r.evidence.get("rows"):
            headers = [column.header for column in COMBINATION_COLUMNS]
            head += ["", _md_row(headers), "  |" + " --- |" * len(headers)]
            head += [_md_row(combination_cells(row)) for row in r.evidence["rows"]]
        samples = (r.evidence.get("swap_target") or {}).get("samples") or []
        if samples:
            head += ["", "  | element | original bits | class | post bits |", "  | --- | --- | --- | --- |"]
            head += [
                f"  | {s['index']} | {s['original_bits']} | {s['original_class']} | {s['post_bits']} |"
                for s in samples
            ]
        stack = r.evidence.get("python_stack")
        if stack:  # where a rank died by a signal: readable here, not only inside the JSON
            head += ["", "  ```", *(f"  {line}" for line in stack.splitlines()), "  ```"]
    head += preflight_lines(report)
    for world_size, analysis in report.analysis.items():
        if isinstance(analysis, dict):
            for reading, claims in analysis.items():
                if isinstance(claims, dict) and "summary" in claims:
                    head.append(f"- invariance at ws={world_size} ({reading}): {claims['summary']}")
    details = [
        (f"evidence: {_label(r)} ws={r.world_size}", json.dumps(r.evidence, indent=1)) for r in report.results
    ]
    details += [
        (f"preflight ws={checked['world_size']}", json.dumps(checked, indent=1))
        for checked in report.preflight
    ]
    details.append(("environment", json.dumps(report.env, indent=1)))
    folded: list[str] = []

    def assemble() -> str:
        blocks = [
            f"<details><summary>{title}</summary>\n\n```json\n{body}\n```\n</details>"
            for title, body in details
        ]
        note = (
            [
                f"_Folded to fit GitHub's {limit:,}-character limit: {', '.join(folded)} "
                "(the JSON report has them)._"
            ]
            if folded
            else []
        )
        return "\n".join([*head, "", *blocks, *note, ""])

    text = assemble()
    while len(text) > limit and any(body != "(folded)" for _, body in details):
        index = max(
            range(len(details)), key=lambda i: len(details[i][1]) if details[i][1] != "(folded)" else -1
        )
        folded.append(details[index][0])
        details[index] = (details[index][0], "(folded)")
        text = assemble()
    return text
