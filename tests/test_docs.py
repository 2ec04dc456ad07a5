"""The generated references under docs/ (HTTP API, configuration, CLI) match the code, the README and docs
link only to files (and headings) that exist, and the package is typed."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from configs.settings import ROLES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


@pytest.fixture(scope="module")
def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_up_to_date(gen_docs: ModuleType) -> None:
    assert set(gen_docs.TARGETS) == {"docs/api.md", "docs/cli.md", "docs/configuration.md"}
    for rel in gen_docs.TARGETS:
        current, fresh = gen_docs.render_file(rel)
        assert fresh == current, f"{rel} is out of date: run `python scripts/gen_docs.py`"


def test_a_stale_block_is_rewritten(gen_docs: ModuleType) -> None:
    current = (REPO / "docs" / "api.md").read_text()
    stale = current.replace("| `POST /update_weights` | bearer |", "| `POST /update_weightz` | none |")
    assert stale != current
    assert gen_docs.render(stale, ("http-api",)) == current


def generated(text: str, name: str) -> str:
    return text[text.index(f"BEGIN GENERATED: {name}") : text.index(f"END GENERATED: {name}")]


def test_every_route_and_setting_is_documented(gen_docs: ModuleType) -> None:
    api = generated((REPO / "docs" / "api.md").read_text(), "http-api")
    for path, ops in gen_docs.openapi()["paths"].items():
        for method in ops:
            assert f"#### `{method.upper()} {path}`" in api
    assert "#### `POST /check`" in api and "| `GET /weights` | none |" in api
    config = generated((REPO / "docs" / "configuration.md").read_text(), "config-reference")
    for section, cls in ROLES.items():
        block = config[config.index(f"#### `[{section}]`") :]
        for name in cls.model_fields:
            assert f"| `{name}` |" in block, f"[{section}] {name} undocumented"
    cli = generated((REPO / "docs" / "cli.md").read_text(), "cli")
    for command in ("serve", "demo", "bench", "check"):
        assert f"`layercast {command} --help" in cli


def test_readme_opens_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert lines[0] == "# layercast"
    assert lines[2].startswith("On a fresh machine")
    assert lines[4] == "```bash"
    assert lines[5].startswith("bash scripts/demo.sh ") and lines[6].startswith("bash scripts/test.sh ")
    assert lines[7] == "```"


_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (word characters, `-` and spaces kept),
    spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text()))}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        check_anchor = dest.exists() and bool(fragment) and dest.suffix == ".md"
        if not dest.exists() or (check_anchor and fragment not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


def test_every_package_ships_py_typed() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["*"]
    for package in {p.split(".")[0] for p in packages}:  # PEP 561: a top-level marker covers its subpackages
        assert (REPO / package / "py.typed").exists(), f"{package}/py.typed missing"
