"""The package as a user installs it: the wheel built from this tree holds exactly the five top-level
packages (with `py.typed`) and every module of the tree, the `layercast` command and vLLM's endpoint-plugin
entry point; none of its import names collides with an installed distribution's; and the trainer side
imports from the wheel alone with vLLM, fastapi and uvicorn made unimportable (a trainer environment needs
none of them)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["broadcaster", "configs", "inference_worker", "rpc", "trainer_side"]
SERVER_ONLY = ["vllm", "fastapi", "uvicorn"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            ".",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        cwd=src,
        check=True,
        timeout=300,
    )
    (built,) = out.glob("layercast-*.whl")
    return built


def test_the_wheel_holds_the_packages_the_command_and_the_plugin(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert sorted(tops) == PACKAGES
    assert all(f"{pkg}/py.typed" in names for pkg in PACKAGES)
    modules = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    missing = sorted(modules - set(names))  # a subpackage left out of pyproject's `packages`
    assert not missing, f"modules of the source tree missing from the wheel: {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "layercast = rpc.tools.cli:main" in text
    assert (
        "[vllm.endpoint_plugins]" in text and "inference_worker.http_plugin:LayercastEndpointPlugin" in text
    )


def test_no_import_name_collides_with_an_installed_distribution() -> None:
    owners = importlib.metadata.packages_distributions()
    clashes = {pkg: owners[pkg] for pkg in PACKAGES if set(owners.get(pkg, [])) - {"layercast"}}
    assert not clashes, f"top-level names also provided by other installed distributions: {clashes}"


def test_the_trainer_side_imports_from_the_wheel_without_the_server_stack(
    wheel: Path, tmp_path: Path
) -> None:
    probe = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError(f"{{name}} is not installed in a trainer environment")
sys.meta_path.insert(0, Block())
import trainer_side, rpc.client.http_client, rpc.client.orchestrator, configs.trainer, broadcaster.shared_wire
from trainer_side import WeightBroadcaster
from configs.trainer import BroadcasterConfig
modules = (trainer_side, rpc.client.http_client, rpc.client.orchestrator, configs.trainer)
modules += (broadcaster.shared_wire,)
for m in modules:
    assert m.__file__.startswith({str(wheel)!r}), m.__file__
config = BroadcasterConfig(servers=["http://127.0.0.1:1"], inference_config={{"model_type": "qwen3"}})
WeightBroadcaster(config)
print("ok", sorted(n for n in sys.modules if n.split(".")[0] in {SERVER_ONLY!r}))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok []"
