"""README.md's generated blocks (HTTP API, configuration, CLI) match the code, and the package is typed."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from configs.settings import ROLES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@pytest.fixture(scope="module")
def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_readme_is_up_to_date(gen_docs: ModuleType) -> None:
    current = README.read_text()
    assert gen_docs.render(current) == current, "README.md is out of date: run `python scripts/gen_docs.py`"


def test_a_stale_block_is_rewritten(gen_docs: ModuleType) -> None:
    current = README.read_text()
    stale = current.replace("| `POST /update_weights` | bearer |", "| `POST /update_weightz` | none |")
    assert stale != current
    assert gen_docs.render(stale) == current


def generated(text: str, name: str) -> str:
    return text[text.index(f"BEGIN GENERATED: {name}") : text.index(f"END GENERATED: {name}")]


def test_every_route_and_setting_is_documented(gen_docs: ModuleType) -> None:
    text = README.read_text()
    api = generated(text, "http-api")
    for path, ops in gen_docs.openapi()["paths"].items():
        for method in ops:
            assert f"#### `{method.upper()} {path}`" in api
    assert "#### `POST /check`" in api and "| `GET /weights` | none |" in api
    config = generated(text, "config-reference")
    for section, cls in ROLES.items():
        block = config[config.index(f"#### `[{section}]`") :]
        for name in cls.model_fields:
            assert f"| `{name}` |" in block, f"[{section}] {name} undocumented"
    cli = generated(text, "cli")
    for command in ("serve", "demo", "bench", "check"):
        assert f"`layercast {command} --help" in cli


def test_every_package_ships_py_typed() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["*"]
    for package in packages:
        assert (REPO / package / "py.typed").exists(), f"{package}/py.typed missing"
