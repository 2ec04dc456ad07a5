"""`configs.settings`: every example TOML loads for every role; env beats the file, CLI flags beat env."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from configs.settings import (
    ROLES,
    OrchestratorSettings,
    ServerSettings,
    SettingsError,
    TrainerSettings,
    load_settings,
)
from configs.trainer import BroadcasterConfig
from rpc.client.orchestrator import SyncOrchestrator

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs" / "examples").glob("*.toml"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("LAYERCAST_"):
            monkeypatch.delenv(key)


def test_the_three_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "cpu-one-server.toml",
        "gpu-two-gpus-one-node.toml",
        "multi-node.toml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_for_every_role(path: Path) -> None:
    trainer = load_settings(TrainerSettings, path)
    server = load_settings(ServerSettings, path)
    orch = load_settings(OrchestratorSettings, path)
    cfg = trainer.to_config()
    assert isinstance(cfg, BroadcasterConfig) and cfg.servers == orch.servers
    assert server.serve_argv()[:2] == ["serve", server.model]
    assert SyncOrchestrator.from_settings(orch).servers == orch.servers


def test_env_overrides_file_and_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "configs" / "examples" / "multi-node.toml"
    assert load_settings(ServerSettings, path).host == "0.0.0.0"
    monkeypatch.setenv("LAYERCAST_SERVER_HOST", "10.0.0.3")
    monkeypatch.setenv("LAYERCAST_SERVER_PORT", "8100")
    monkeypatch.setenv("LAYERCAST_ADMIN_TOKEN", "tok-from-env")
    server = load_settings(ServerSettings, path)
    assert (server.host, server.port, server.url) == ("10.0.0.3", 8100, "http://10.0.0.3:8100")
    assert server.serve_env()["LAYERCAST_ADMIN_TOKEN"] == "tok-from-env"
    assert "tok-from-env" not in repr(server) and "tok-from-env" not in " ".join(server.serve_argv())
    assert server.serve_env()["GLOO_SOCKET_IFNAME"] == "eth0"  # from the file
    assert load_settings(ServerSettings, path, ["--port", "8200"]).port == 8200

    monkeypatch.setenv("LAYERCAST_TRAINER_SERVERS", '["http://10.0.0.9:8000"]')
    monkeypatch.setenv("LAYERCAST_TRAINER_MASTER_PORT", "30000")
    trainer = load_settings(TrainerSettings, path)
    assert trainer.servers == ["http://10.0.0.9:8000"] and trainer.master_port == 30000
    assert trainer.backend == "nccl"  # untouched file value
    flags = ["--servers", "http://a:1", "http://b:2", "--checksum", "true"]
    flagged = load_settings(TrainerSettings, path, flags)
    assert flagged.servers == ["http://a:1", "http://b:2"] and flagged.checksum is True


def test_errors_name_the_cause(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[trainer]\nservers = ["http://x:1"]\ninference_config = "m"\nmaster_prot = 1\n')
    with pytest.raises(ValidationError, match="master_prot"):
        load_settings(TrainerSettings, bad)
    bad.write_text('[trainer]\nservers = ["http://x:1"]\ninference_config = "m"\nmaster_port = 70000\n')
    with pytest.raises(ValidationError, match="master_port"):
        load_settings(TrainerSettings, bad)
    bad.write_text("[trainers]\n")
    with pytest.raises(SettingsError, match="trainers"):
        load_settings(TrainerSettings, bad)
    bad.write_text("[trainer\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(TrainerSettings, bad)
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(TrainerSettings, tmp_path / "missing.toml")
    with pytest.raises(ValidationError, match="model"):
        load_settings(ServerSettings, None)


def test_trainer_settings_mirror_broadcaster_config() -> None:
    assert set(TrainerSettings.model_fields) == set(BroadcasterConfig.model_fields)
    assert set(ROLES) == {"trainer", "server", "orchestrator", "demo"}


def test_cli_prints_resolved_settings_without_the_token() -> None:
    path = REPO / "configs" / "examples" / "cpu-one-server.toml"
    env = {"LAYERCAST_TRAINER_TOKEN": "hidden-token", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "configs.settings", "trainer", "--config", str(path), "--master-port", "1234"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"master_port": 1234' in out.stdout and "hidden-token" not in out.stdout
