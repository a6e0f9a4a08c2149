"""Markdown view of any report, to paste into an upstream issue as it is.

A summary paragraph with each verdict, the commands that reproduce it (fsdpqdiag and, for
each result that reproduced, its standalone script with the result's configuration), one
table, sample elements, the full evidence inside <details>, and
the environment. GitHub refuses comments over 65,536 characters: the largest evidence
blocks are folded first, with a note saying what was cut; where the results' own lines
still exceed it (hundreds of results), the lines that do not fit are cut too. Every line and
block goes through ``report.redact`` first: no path or credential of the machine leaves it.
"""

from __future__ import annotations

import json

from fsdpqdiag import envvars
from fsdpqdiag.render import reproducer
from fsdpqdiag.render.env_table import optional_packages
from fsdpqdiag.render.preflight_table import markdown_lines as preflight_lines
from fsdpqdiag.report.model import REPRODUCED, Report
from fsdpqdiag.report.redact import command_line, redact_data, redact_text
from fsdpqdiag.tasks import presentation_of

GITHUB_COMMENT_LIMIT = 65_536


def _label(r) -> str:
    config = r.config
    for key in ("cell", "workaround", "target"):
        if key in config:
            value = config[key]["name"] if key == "cell" else config[key]
            return f"{r.probe} {value}"
    return r.probe


def _key_numbers(r) -> str:
    """The result's few numbers that matter, as its probe words them (the probe's
    presentation), for one cell of the summary table."""
    ev = r.evidence
    if ev.get("failed_preconditions"):  # UNSUPPORTED: the probe was not run
        return "failed in preflight: " + ", ".join(c["name"] for c in ev["failed_preconditions"])
    return presentation_of(r.probe).key_numbers(ev).replace("|", "\\|")


def _md_row(cells) -> str:
    return "  | " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def fsdpqdiag_command(report: Report) -> str:
    """The command that wrote ``report``, as a user reruns it: the kernel path it forced, its
    options without output files or credentials, shell-quoted."""
    override = ((report.env.get("bitsandbytes") or {}).get("cpu_path") or {}).get("override")
    prefix = [f"{envvars.BNB_CPU_REPACK}={override}"] if override else []
    return command_line([*prefix, "fsdpqdiag", *(report.argv or [report.command])])


def _reproduce_lines(report: Report) -> list[str]:
    """The command that wrote the report, then one standalone line per result that
    reproduced, each with that result's configuration."""
    lines = [f"    {fsdpqdiag_command(report)}"]
    seen: set[str] = set()
    for r in report.results:
        line = reproducer.command(r) if r.verdict == REPRODUCED else None
        if line and line not in seen:
            seen.add(line)
            missing = reproducer.arguments(r)[1]
            lines.append(
                f"    {line}" + (f"  # the script has no option for {', '.join(missing)}" if missing else "")
            )
    return lines


def _software_stack(env: dict) -> str:
    torch_info = env.get("torch", {})
    bnb = env.get("bitsandbytes", {})
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or "no GPU"
    return (
        f"torch {torch_info.get('version')} (CUDA {torch_info.get('cuda')}, NCCL {torch_info.get('nccl')}), "
        f"bitsandbytes {bnb.get('version')} ({bnb.get('backend')}), transformers {env.get('transformers')}, "
        f"peft {env.get('peft')}{optional_packages(env)}, {gpus}, driver {env.get('driver')}, "
        f"Python {env.get('python')}"
    )


def _summary_lines(report: Report) -> list[str]:
    """The title, the stack with every verdict, the commands that reproduce them and the
    summary table: what a reader of the issue sees before anything folds."""
    verdicts = "; ".join(f"**{r.verdict}** {_label(r)} (ws={r.world_size})" for r in report.results)
    injected = {r.injected for r in report.results if r.injected}
    lines = [
        f"## fsdpqdiag {report.command}",
        "",
        f"On {_software_stack(report.env)}: {verdicts}."
        + (f" Positive control: the fault `{', '.join(sorted(injected))}` was injected." if injected else ""),
        "",
        "To reproduce:",
        "",
        *_reproduce_lines(report),
        "",
        "| run | ws | device | injected | verdict | key numbers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {_label(r)} | {r.world_size} | {r.device}/{r.backend} | {r.injected or '–'} | **{r.verdict}** | "
        f"{_key_numbers(r)} |"
        for r in report.results
    ]
    lines.append("")
    return lines


def _result_lines(r) -> list[str]:
    """One result's bullet: its verdict and summary (with whom to file it against, where
    attributed), then its probe's own table, sample elements and a crashed rank's stack."""
    lines = []
    attribution = r.evidence.get("attribution")
    if attribution:
        target = attribution.get("report_to") or "nobody upstream"
        known = ", ".join(attribution.get("known_issues") or []) or "no known upstream issue"
        lines.append(
            f"- **{r.verdict}** {_label(r)} (ws={r.world_size}): File against: {target} "
            f"({attribution['component']}); {known}. {r.summary}"
        )
        lines.append(f"  Decided by: {'; '.join(attribution.get('decided_by') or [])}")
    else:
        lines.append(f"- **{r.verdict}** {_label(r)} (ws={r.world_size}): {r.summary}")
    script = reproducer.script_of(r.probe)
    if script:  # the line that runs it, with this run's configuration, is under "To reproduce"
        lines.append(f"  Standalone script: `{script}`")
    table = presentation_of(r.probe).detail(r.evidence)
    if table is not None:  # the probe's own table, e.g. a row per configuration it tried
        headers = [column.header for column in table.columns]
        lines += ["", _md_row(headers), "  |" + " --- |" * len(headers)]
        lines += [_md_row(row) for row in table.rows]
    samples = (r.evidence.get("swap_target") or {}).get("samples") or []
    if samples:
        lines += ["", "  | element | original bits | class | post bits |", "  | --- | --- | --- | --- |"]
        lines += [
            f"  | {s['index']} | {s['original_bits']} | {s['original_class']} | {s['post_bits']} |"
            for s in samples
        ]
    stack = r.evidence.get("python_stack")
    if stack:  # where a rank died by a signal: readable here, not only inside the JSON
        lines += ["", "  ```", *(f"  {line}" for line in stack.splitlines()), "  ```"]
    return lines


def _invariance_lines(report: Report) -> list[str]:
    lines = []
    for world_size, analysis in report.analysis.items():
        if isinstance(analysis, dict):
            for reading, claims in analysis.items():
                if isinstance(claims, dict) and "summary" in claims:
                    lines.append(f"- invariance at ws={world_size} ({reading}): {claims['summary']}")
    return lines


def _details(report: Report) -> list[tuple[str, str]]:
    """The full JSON blocks, each (title, body): every result's evidence, every preflight,
    the environment."""
    details = [
        (f"evidence: {_label(r)} ws={r.world_size}", json.dumps(redact_data(r.evidence), indent=1))
        for r in report.results
    ]
    details += [
        (f"preflight ws={checked['world_size']}", json.dumps(redact_data(checked), indent=1))
        for checked in report.preflight
    ]
    details.append(("environment", json.dumps(redact_data(report.env), indent=1)))
    return details


def _assemble(head: list[str], details: list[tuple[str, str]], folded: list[str], limit: int) -> str:
    blocks = [
        f"<details><summary>{title}</summary>\n\n```json\n{body}\n```\n</details>" for title, body in details
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


def _fold_to_fit(head: list[str], details: list[tuple[str, str]], limit: int) -> str:
    """Fold the largest JSON block, then the next largest, until the text fits ``limit``:
    the summary and every result's bullet always stay."""
    details = list(details)
    folded: list[str] = []
    text = _assemble(head, details, folded, limit)
    while len(text) > limit and any(body != "(folded)" for _, body in details):
        index = max(
            range(len(details)), key=lambda i: len(details[i][1]) if details[i][1] != "(folded)" else -1
        )
        folded.append(details[index][0])
        details[index] = (details[index][0], "(folded)")
        text = _assemble(head, details, folded, limit)
    return text if len(text) <= limit else _cut_to_fit(head, limit)


def _cut_to_fit(head: list[str], limit: int) -> str:
    """Where the lines of the results alone exceed ``limit`` (hundreds of results, each
    with its probe's table): no JSON block, and the lines from the first that does not
    fit on, with a note. The title, the stack and every verdict come first."""
    kept: list[str] = []
    size = 0
    reserve = 400  # the note, and a code fence to close
    for line in head:
        if size + len(line) + 1 > limit - reserve:
            break
        kept.append(line)
        size += len(line) + 1
    if sum(line.strip().startswith("```") for line in kept) % 2:
        kept.append("  ```")
    note = (
        f"_Folded to fit GitHub's {limit:,}-character limit: every JSON block, and the last "
        f"{len(head) - len(kept):,} of {len(head):,} lines (the JSON report has them)._"
    )
    return "\n".join([*kept, "", note, ""])


def render(report: Report, limit: int = GITHUB_COMMENT_LIMIT) -> str:
    head = _summary_lines(report)
    for r in report.results:
        head += _result_lines(r)
    head += preflight_lines(report)
    head += _invariance_lines(report)
    return _fold_to_fit([redact_text(line) for line in head], _details(report), limit)
