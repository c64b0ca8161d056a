"""The documentation stays true: docs/cli.md is the commands' current --help, links and the
``streamnn.*`` names the pages cite resolve, and the pages speak to users."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_cli_reference_is_current():
    # The generator as a user runs it (its exit code and message are part of the check).
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "cli_reference.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    text = page.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link to missing {target}"
        if anchor and path.suffix == ".md":
            anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                       for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}
            assert anchor in anchors, f"{page.name}: no heading #{anchor} in {target or page.name}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cited_names_exist(page):
    names = set(re.findall(r"`(streamnn(?:\.\w+)+)", page.read_text()))
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{page.name} cites names that do not exist: {missing}"


def test_readme_maps_every_page_of_docs():
    section = (ROOT / "README.md").read_text().partition("## Documentation")[2].partition("\n## ")[0]
    mapped = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", section))
    assert mapped == {p.name for p in (ROOT / "docs").glob("*.md")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_development_history(page):
    text = page.read_text()
    assert not re.search(r"\bissues?\b|\bPR\b|pull request|\bsessions?\b", text, flags=re.I), page.name
