"""Write the generated references under docs/: the HTTP API (from the FastAPI OpenAPI schema of our router),
the configuration reference (from the pydantic settings models) and the CLI reference (from the parsers).

Each block lives between `<!-- BEGIN GENERATED: NAME -->` and `<!-- END GENERATED: NAME -->` in its file
(`TARGETS`); the prose around it is hand-written. `tests/test_docs.py` fails when a file differs from what
this writes.

    python scripts/gen_docs.py            # rewrite docs/api.md, docs/cli.md, docs/configuration.md
    python scripts/gen_docs.py --check    # exit 1 if one of them is out of date
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SKIPPED_SCHEMAS = frozenset({"HTTPValidationError", "ValidationError"})
HELP_COLUMNS = "100"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type(schema: dict[str, Any]) -> str:
    """A JSON-schema type as a short string (`int`, `str \\| null`, `SyncTimings`, `"a" \\| "b"`)."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_type(s) for s in schema["prefixItems"]) + "]"
        return f"list[{_type(schema.get('items', {}))}]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"dict[str, {_type(extra)}]" if isinstance(extra, dict) else "object"
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}
    return names.get(str(kind), "any")


def _fields_table(schema: dict[str, Any], default_of: Callable[[str, dict[str, Any]], str]) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        rows.append(
            f"| `{name}` | {_cell(_type(prop))} | {_cell(default_of(name, prop))} "
            f"| {_cell(prop.get('description', ''))} |"
        )
    return rows


# ----------------------------------------------------------------------------------------- HTTP API


def openapi() -> dict[str, Any]:
    from fastapi import FastAPI

    from rpc.server.routes import build_router

    def unused() -> Any:
        raise AssertionError("the docs never call a route")

    app = FastAPI(title="layercast", version="0")
    app.include_router(build_router(unused, token="documented", get_checker=unused))
    return app.openapi()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def http_api_block() -> str:
    spec = openapi()
    schemas = spec["components"]["schemas"]
    out = [
        "| route | auth | what |",
        "|---|---|---|",
    ]
    sections: list[str] = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            auth = "bearer" if op.get("security") else "none"
            desc = " ".join(op.get("description", "").split())
            out.append(f"| `{method.upper()} {path}` | {auth} | {_cell(desc.split('. ')[0].rstrip('.'))} |")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            lines = [f"#### `{method.upper()} {path}`", "", desc, ""]
            answers = []
            for code, resp in op["responses"].items():
                if code == "422":
                    answers.append("422 a body field is invalid (named)")
                    continue
                schema = resp.get("content", {}).get("application/json", {}).get("schema")
                what = f"`{_type(schema)}`" if code == "200" and schema else resp["description"]
                answers.append(f"{code} {what}")
            head = f"Body `{_type(body)}`; answers: " if body else "Answers: "
            lines.append(head + "; ".join(answers) + ".")
            sections += [*lines, ""]
    out += ["", "Error bodies are `ErrorBody` (`error`, `detail`); 401/403 answer `{\"detail\": ...}`.", ""]
    out += sections
    out += ["#### Bodies", ""]
    for name in sorted(set(_refs(spec["paths"])) | {r for s in schemas.values() for r in _refs(s)}):
        if name in SKIPPED_SCHEMAS:
            continue
        schema = schemas[name]
        doc = " ".join(schema.get("description", "").split())
        out += [f"`{name}`" + (f": {doc}" if doc else ""), ""]

        def default_of(field: str, prop: dict[str, Any], schema: dict[str, Any] = schema) -> str:
            if field in schema.get("required", []):
                return "required"
            return f"`{json.dumps(prop.get('default'))}`"

        out += [*_fields_table(schema, default_of), ""]
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------------------- settings


def config_block() -> str:
    from pydantic import AliasChoices
    from pydantic_core import PydanticUndefined

    from configs.settings import ROLES

    out = [
        "Every role reads one table of a TOML file (`--config FILE`), overridden by its environment "
        "variables, overridden by flags (`--field-name VALUE`; lists take several values, tables take "
        "JSON). Unknown keys are errors that name the key.",
        "",
    ]
    for section, cls in ROLES.items():
        prefix = cls.model_config.get("env_prefix", "")
        doc = " ".join((cls.__doc__ or "").split())
        out += [f"#### `[{section}]`", "", doc, ""]
        out += ["| key | type | default | environment | description |", "|---|---|---|---|---|"]
        props = cls.model_json_schema()["properties"]
        for name, info in cls.model_fields.items():
            prop = props.get(name) or next(iter(p for k, p in props.items() if k.lower() == name), {})
            if info.is_required():
                default = "required"
            elif info.default_factory is not None:
                default = f"`{json.dumps(info.default_factory())}`"  # type: ignore[call-arg]
            elif info.default is PydanticUndefined:
                default = "required"
            else:
                default = f"`{json.dumps(info.default)}`"
            env = [f"{prefix}{name}".upper()]
            alias = info.validation_alias
            if isinstance(alias, AliasChoices):
                env = [str(c).upper() for c in alias.choices if str(c) != name]
            desc = info.description or prop.get("description", "")
            env_cell = ", ".join(f"`{e}`" for e in env)
            out.append(f"| `{name}` | {_cell(_type(prop))} | {_cell(default)} | {env_cell} | {_cell(desc)} |")
        out.append("")
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------------------- CLI


def _help_of(run: Callable[[], object]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        run()
    return buf.getvalue().rstrip()


@contextlib.contextmanager
def _columns(width: str) -> Iterator[None]:
    """argparse wraps help at the terminal width (`COLUMNS`): fix it while rendering."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def cli_block() -> str:
    with _columns(HELP_COLUMNS):
        return _cli_block()


def _cli_block() -> str:
    from rpc.tools import bench, check, demo
    from rpc.tools.cli import SERVE_HELP
    from rpc.tools.cli import main as cli_main

    parts = [
        ("layercast --help", _help_of(lambda: cli_main(["--help"]))),
        ("layercast serve --help  (our part; vLLM's options follow)", SERVE_HELP.rstrip()),
        ("layercast demo --help", _help_of(lambda: demo.parse_settings(["--help"]))),
        ("layercast check --help", _help_of(lambda: check.parser().parse_args(["--help"]))),
        ("layercast bench --help", _help_of(lambda: bench.main(["--help"]))),
    ]
    out: list[str] = []
    for title, text in parts:
        out += [f"`{title}`", "", "```text", text, "```", ""]
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------------------- files


BLOCKS: dict[str, Callable[[], str]] = {
    "http-api": http_api_block,
    "config-reference": config_block,
    "cli": cli_block,
}

# Which file holds which generated block (paths relative to the repository root).
TARGETS: dict[str, tuple[str, ...]] = {
    "docs/api.md": ("http-api",),
    "docs/configuration.md": ("config-reference",),
    "docs/cli.md": ("cli",),
}


def render(text: str, names: tuple[str, ...] | None = None, where: str = "the file") -> str:
    """`text` with each generated block in `names` (default: every block) replaced by its current content."""
    for name in names if names is not None else tuple(BLOCKS):
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} [^>]*-->\n)(?:.*?\n)?(<!-- END GENERATED: {name} -->)", re.DOTALL
        )
        if not pattern.search(text):
            raise SystemExit(f"{where} has no generated block {name!r} (BEGIN/END GENERATED markers)")
        body = BLOCKS[name]() + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def render_file(rel: str) -> tuple[str, str]:
    """`(current, fresh)` text of one target file."""
    current = (REPO / rel).read_text()
    return current, render(current, TARGETS[rel], where=rel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = ap.parse_args(argv)
    stale = []
    for rel in TARGETS:
        current, fresh = render_file(rel)
        if fresh == current:
            continue
        stale.append(rel)
        if not args.check:
            (REPO / rel).write_text(fresh)
    if args.check and stale:
        print(f"{', '.join(stale)} out of date: run `python scripts/gen_docs.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
