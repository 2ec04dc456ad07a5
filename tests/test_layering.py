"""Imports only run downward: every module of the five packages belongs to one layer, and may import only
the layers the table below allows (top-level and function-local imports alike, read from the source with
`ast`, so nothing is executed). And the trainer side, imported in a fresh interpreter, loads no server
stack: neither FastAPI, uvicorn nor vLLM, nor any `rpc.server`, `rpc.tools` or `inference_worker` module.

Layers, low to high (the two stacks in the middle never import each other):

    0 configs
    1 broadcaster
    2 rpc root (`rpc`, `rpc.errors`: shared by both halves)
    2 rpc.client        → 3 trainer_side
    2 rpc.server        → 3 inference_worker
    4 rpc.tools (the `layercast` command, demo, check, bench, launcher)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "broadcaster", "rpc", "trainer_side", "inference_worker")

# Each module's layer: the longest prefix of its dotted name; `rpc` and whatever else sits at the rpc root
# (`rpc.errors`) is "rpc" (the shared, lowest rpc layer).
LAYER_OF_PREFIX = {
    "configs": "configs",
    "broadcaster": "broadcaster",
    "rpc": "rpc",
    "rpc.client": "rpc.client",
    "rpc.server": "rpc.server",
    "trainer_side": "trainer_side",
    "inference_worker": "inference_worker",
    "rpc.tools": "rpc.tools",
}

# The allowed-dependency table: a module of layer K may import modules of the layers in ALLOWED[K] only.
ALLOWED: dict[str, frozenset[str]] = {
    "configs": frozenset({"configs"}),
    "broadcaster": frozenset({"configs", "broadcaster"}),
    "rpc": frozenset({"configs", "rpc"}),
    "rpc.client": frozenset({"configs", "broadcaster", "rpc", "rpc.client"}),
    "rpc.server": frozenset({"configs", "broadcaster", "rpc", "rpc.server"}),
    "trainer_side": frozenset({"configs", "broadcaster", "rpc", "rpc.client", "trainer_side"}),
    "inference_worker": frozenset({"configs", "broadcaster", "rpc", "rpc.server", "inference_worker"}),
    "rpc.tools": frozenset(LAYER_OF_PREFIX.values()),
}

# What a trainer process must never load (importing `trainer_side` or `rpc.client`).
SERVER_STACK = ("fastapi", "uvicorn", "vllm", "rpc.server", "rpc.tools", "inference_worker")


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:n])) in LAYER_OF_PREFIX:
            return LAYER_OF_PREFIX[prefix]
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    path: Path
    line: int
    statement: str  # the import as written
    target: str  # the imported project module


def imports_of(module: str, path: Path, known: set[str]) -> list[Edge]:
    """Every import of a project module in `path`, wherever it is (module level, function, `if`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    edges = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from rpc.server import sync_guard` imports the module `rpc.server.sync_guard`
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PACKAGES:
                edges.append(Edge(module, path, node.lineno, ast.unparse(node), target))
    return edges


def all_edges() -> list[Edge]:
    modules = project_modules()
    return [e for name, path in modules.items() for e in imports_of(name, path, set(modules))]


def test_every_layer_has_a_rule_and_rules_name_only_layers() -> None:
    layers = set(LAYER_OF_PREFIX.values())
    assert set(ALLOWED) == layers
    assert all(allowed <= layers and layer in allowed for layer, allowed in ALLOWED.items())
    assert {layer_of(m) for m in project_modules()} == layers  # every layer holds modules


def test_the_scanner_sees_module_level_and_function_local_imports() -> None:
    """Guards the check below against passing vacuously (a scanner that finds nothing)."""
    found = {(e.source, e.target) for e in all_edges()}
    assert ("trainer_side.broadcast", "rpc.client.http_client") in found  # module level
    assert ("rpc.tools.cli", "inference_worker.serve") in found  # inside a function
    assert ("rpc.server.routes", "rpc.server.sync_guard") in found  # `from rpc.server import sync_guard`


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for e in all_edges():
        src, dst = layer_of(e.source), layer_of(e.target)
        if dst not in ALLOWED[src]:
            bad.append(
                f"{e.path.relative_to(ROOT)}:{e.line}: {e.source} ({src}) imports {e.target} ({dst}): "
                f"`{e.statement}`; {src} may import only {sorted(ALLOWED[src])}"
            )
    assert not bad, "imports that run upward or across:\n" + "\n".join(bad)


def test_the_trainer_side_and_the_client_load_no_server_stack() -> None:
    probe = (
        "import json, sys\n"
        "import trainer_side, trainer_side.broadcast, rpc.client.http_client, rpc.client.orchestrator\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"importing the trainer side failed:\n{done.stderr[-3000:]}"
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if any(m == s or m.startswith(f"{s}.") for s in SERVER_STACK)]
    assert not heavy, f"importing trainer_side / rpc.client loaded server-side modules: {heavy}"


# Names defined the same way with the same meaning in several modules (a plain alias, not a type).
SHARED_ALIASES = {"Shape"}


def test_one_meaning_per_public_type_name() -> None:
    """A public class or type alias name is defined once across the packages: `SyncError` in two
    modules with two meanings makes an `except` catch the wrong one."""
    where: dict[str, list[str]] = {}
    for module, path in project_modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name) and t.id[:1].isupper()
                         and not t.id.isupper()]  # fmt: skip
            else:
                continue
            for name in names:
                if not name.startswith("_") and name not in SHARED_ALIASES:
                    where.setdefault(name, []).append(module)
    twice = {name: mods for name, mods in where.items() if len(mods) > 1}
    assert not twice, f"type names defined in several modules: {twice}"
    assert {"SyncHeader", "ManifestEntry", "WeightBroadcaster"} <= set(where), "the scan found no types"
