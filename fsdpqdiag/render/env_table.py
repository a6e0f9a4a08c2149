"""The `env` command's views: the captured stack as (item, value) rows, a table, Markdown."""

from __future__ import annotations

from fsdpqdiag.render.fitted import Column, FittedTable

# Values are versions, paths and log lines of the stack: they may fold; items never split.
ENV_COLUMNS = (Column("item"), Column("value", breakable=True))


def optional_packages(captured: dict) -> str:
    """``, torchao X`` where the stack has torchao (the reference the torchao probe compares
    bitsandbytes with), else nothing: a stack without it reads as it always did."""
    return f", torchao {captured['torchao']}" if captured.get("torchao") else ""


def flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    """Nested environment data as dotted items: ``torch.version``, ``gpus.0.name``."""
    items: list[tuple[str, object]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            items += flatten(value, f"{prefix}{key}.")
    elif isinstance(data, list):
        for index, value in enumerate(data):
            items += flatten(value, f"{prefix}{index}.")
    else:
        items.append((prefix.rstrip("."), data))
    return items


def env_table(captured: dict, wide: bool = False) -> FittedTable:
    rows = [[key, str(value)] for key, value in flatten(captured)]
    return FittedTable(ENV_COLUMNS, rows, title="fsdpqdiag env", wide=wide)


def env_markdown(captured: dict) -> str:
    """For an issue: the library paths shortened to package-relative names (``report.redact``)."""
    from fsdpqdiag.report.redact import redact_data

    rows = "\n".join(f"| {key} | {value} |" for key, value in flatten(redact_data(captured)))
    return "| item | value |\n| --- | --- |\n" + rows
