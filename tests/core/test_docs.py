"""The documentation holds together: every relative link resolves, every page is reachable
from the front page, and every command and option of the CLI is documented somewhere."""

from __future__ import annotations

import re

import pytest

from tests.support import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_every_docs_page_is_linked_from_the_front_page():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages no link on README.md reaches: {unlinked}"


def _commands():
    import typer.main

    from fsdpqdiag.cli import app

    return typer.main.get_command(app).commands


def test_every_command_and_option_is_documented():
    docs = "\n".join(page.read_text() for page in PAGES)
    missing = []
    for name, command in sorted(_commands().items()):
        if f"fsdpqdiag {name}" not in docs:
            missing.append(f"fsdpqdiag {name}")
        for param in command.params:
            for option in param.opts:
                if option.startswith("--") and option not in ("--help",) and option not in docs:
                    missing.append(f"{name} {option}")
    assert not missing, f"not in README.md or docs/: {missing}"


def test_the_layout_tree_in_the_docs_is_the_package():
    tree = (ROOT / "docs/development.md").read_text().split("```")[1]
    folders = {p.name for p in (ROOT / "fsdpqdiag").iterdir() if (p / "__init__.py").exists()}
    listed = set(re.findall(r"^\s{4}([a-z_]+)/", tree, flags=re.M)) | set(re.findall(r"\b([a-z_]+)/", tree))
    assert folders <= listed, f"subpackages the layout tree does not show: {sorted(folders - listed)}"
    named = set(re.findall(r"^\s{4}([a-z_]+)/", tree, flags=re.M))
    assert named <= folders, f"folders the layout tree shows that do not exist: {sorted(named - folders)}"
