"""Views of the stack preflight: the full `doctor` tables, and one line per run under
every other command's table."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from fsdpqdiag import envvars
from fsdpqdiag.render.fitted import Column, FittedTable


def _where(checked: dict[str, Any]) -> str:
    return f"ws={checked['world_size']} {checked['device']}/{checked['backend']}"


def bnb_path_text(path: dict[str, Any] | None) -> str:
    """bitsandbytes' kernel path, the CPU flags that chose it, the optional packages found."""
    if not path:
        return "bitsandbytes path: not measured"
    if path.get("error"):
        return f"bitsandbytes path: {path['error']}"
    flags = path.get("isa_flags")
    flag_text = (
        "no /proc/cpuinfo"
        if flags is None
        else ", ".join(name for name, present in flags.items() if present) or "none of the listed"
    )
    packages = [name for name, found in (path.get("optional_kernel_packages") or {}).items() if found]
    override = (path.get("cpu") or {}).get("override")
    return (
        f"bitsandbytes {path.get('backend')} backend, kernel path {path.get('kernel_path')}"
        + (f" (forced {override} by {envvars.BNB_CPU_REPACK})" if override else "")
        + f"; CPU flags: {flag_text}; optional kernel packages: {', '.join(packages) or 'none found'}"
    )


def units_text(units: dict[str, Any] | None) -> str:
    """How many FSDP units all-gather by value in a float dtype with packed storage in them."""
    if not units:
        return "FSDP units: not measured"
    if units.get("error"):
        return f"FSDP units: {units['error']}"
    rows = units.get("units") or []
    exposed = [row["unit"] for row in rows if row.get("packed_storage_exposed")]
    by_bytes = [row["unit"] for row in rows if row.get("all_gather_by") == "bytes"]
    return (
        f"FSDP units of {units.get('subject')} ({units.get('wrapping')}): {len(rows)}; "
        f"{len(exposed)} all-gather packed storage by value in a float dtype, "
        f"{len(by_bytes)} by bytes (uint8)"
    )


def summary_line(checked: dict[str, Any]) -> Text:
    """One line: capabilities ok or the failed ones, the bitsandbytes path, the units."""
    capabilities = checked.get("capabilities") or []
    failed = [c for c in capabilities if not c["ok"]]
    head = (
        Text(f"{len(capabilities)}/{len(capabilities)} collectives byte-true", style="green")
        if not failed
        else Text(
            f"failed: {'; '.join(c['name'] + ' (' + c['detail'] + ')' for c in failed)}", style="bold red"
        )
    )
    kernel = (checked.get("bitsandbytes_path") or {}).get("kernel_path")
    return Text.assemble(
        f"preflight {_where(checked)}: ",
        head,
        f"; bitsandbytes {kernel}; {units_text(checked.get('fsdp_units'))}",
        style="dim" if not failed else "",
    )


def summary_lines(report) -> list[Text]:
    return [summary_line(checked) for checked in getattr(report, "preflight", None) or []]


# Details are sentences: they wrap at spaces. Unit names (model.layers.0) never split.
CAPABILITY_COLUMNS = (Column("capability"), Column("ok"), Column("detail", breakable=True))
UNIT_COLUMNS = (
    Column("unit"),
    Column("params", justify="right"),
    Column("param dtypes", priority=2),
    Column("all-gather", priority=1),
    Column("quantized", justify="right"),
    Column("packed storage exposed"),
)


def preflight_table(checked: dict[str, Any], wide: bool = False) -> Group:
    """`fsdpqdiag doctor`: every capability, bitsandbytes' path, every FSDP unit."""
    capabilities = [
        [c["name"], Text("yes", style="green") if c["ok"] else Text("NO", style="bold red"), c["detail"]]
        for c in checked.get("capabilities") or []
    ]
    parts: list[Any] = [
        FittedTable(CAPABILITY_COLUMNS, capabilities, title=f"stack preflight, {_where(checked)}", wide=wide),
        Text(bnb_path_text(checked.get("bitsandbytes_path"))),
    ]
    units = checked.get("fsdp_units") or {}
    if units.get("units"):
        rows = [
            [
                row["unit"],
                str(row["parameters"]),
                ", ".join(f"{name}×{count}" for name, count in row["parameter_dtypes"].items()),
                f"by {row['all_gather_by']} in {row['all_gather_dtype']} ({row['source']})",
                str(row["quantized_parameters"]),
                Text("yes", style="yellow") if row["packed_storage_exposed"] else "no",
            ]
            for row in units["units"]
        ]
        parts.append(FittedTable(UNIT_COLUMNS, rows, title=units_text(units), wide=wide))
    else:
        parts.append(Text(units_text(units or None)))
    if checked.get("injected"):
        parts.append(Text(f"injected fault: {checked['injected']}", style="yellow"))
    parts.append(Text(f"{checked.get('launches')} launch(es), {checked.get('duration_s')} s", style="dim"))
    return Group(*parts)


def markdown_lines(report) -> list[str]:
    """The preflight of each run as Markdown for an upstream issue."""
    return checks_markdown_lines(getattr(report, "preflight", None) or [])


def checks_markdown_lines(checks: list[dict[str, Any]]) -> list[str]:
    """Each preflight of ``checks`` (one per world size) as Markdown: `doctor --markdown`."""
    lines: list[str] = []
    for checked in checks:
        lines += [
            "",
            f"Stack preflight ({_where(checked)}"
            + (f", injected `{checked['injected']}`" if checked.get("injected") else "")
            + "):",
            "",
            "| capability | ok | detail |",
            "| --- | --- | --- |",
        ]
        for capability in checked.get("capabilities") or []:
            detail = capability["detail"].replace("|", "\\|")
            ok = "yes" if capability["ok"] else "**NO**"
            lines.append(f"| {capability['name']} | {ok} | {detail} |")
        lines += ["", f"- {bnb_path_text(checked.get('bitsandbytes_path'))}"]
        lines.append(f"- {units_text(checked.get('fsdp_units'))}")
    return lines
