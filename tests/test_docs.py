"""The documentation: every relative link resolves (file and heading), every setting of
server/config.py is in docs/operations.md with its default, and the README stays a short
page for users whose quick start is the one CI runs."""

import re
from dataclasses import fields

import pytest
from helpers import ROOT, WORKER_ENDPOINTS

from server.config import Settings

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path) -> str:
    """The page without its fenced code blocks (their `#` lines are no headings, their text no links)."""
    return FENCE.sub("", path.read_text())


def anchors(path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    as hyphens, a repeated one numbered."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, number = slug, 0
        while candidate in found:
            number += 1
            candidate = f"{slug}-{number}"
        found.add(candidate)
    return found


def test_the_pages_exist():
    assert {path.name for path in PAGES} >= {"README.md", "CONTRIBUTING.md", "api.md", "operations.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: {target}"


def test_the_link_checker_sees_a_broken_link_and_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title, with `code`\n\n## Repeated\n## Repeated\n```sh\n# not a heading\n```\n")
    assert anchors(page) == {"a-title-with-code", "repeated", "repeated-1"}
    assert LINK.findall("[a](b.md#c) and ![i](d.png)") == ["b.md#c", "d.png"]


def documented_defaults() -> dict[str, str]:
    """`| `WORKERS_X` | default | ... |` rows of docs/operations.md: the default, backticks dropped."""
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", OPERATIONS.read_text(), flags=re.M)
    return {name: default.strip().replace("`", "") for name, default in rows}


def as_documented(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else "(empty)"


def test_every_setting_is_documented_with_its_default():
    documented = documented_defaults()
    for field in fields(Settings):
        name = f"WORKERS_{field.name.upper()}"
        assert name in documented, name
        assert documented[name] == as_documented(field.default), name


def test_the_readme_is_a_short_page_for_users():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "SPEC" not in text
    for endpoint in ["auth.login", *WORKER_ENDPOINTS]:
        assert f"`{endpoint}`" in text, endpoint


def test_the_quick_start_is_what_ci_runs():
    quick_start = re.search(r"^## Quick start$(.*?)^## ", README.read_text(), flags=re.M | re.S)[1]
    assert "scripts/serve-local.sh" in quick_start and "scripts/test.sh" in quick_start
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash scripts/test\.sh\b", ci, flags=re.M)
