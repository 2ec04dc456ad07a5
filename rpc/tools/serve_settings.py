"""`layercast serve --config FILE`: the `[server]` settings (TOML < `LAYERCAST_SERVER_*` < flags) turned
into the `vllm serve` arguments and environment.

Flags that are settings fields (the positional MODEL, `--host`, `--port`, `--served-model-name`,
`--layercast-token`, `--layercast-token-file`) override the file and the environment; every other
argument passes through to `vllm serve` after the file's `vllm_args`, so a repeated vLLM flag on the
command line wins too (argparse keeps the last). Without `--config` and without any
`LAYERCAST_SERVER_*` variable, `layercast serve` passes its arguments through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from configs.settings import ServerSettings, load_settings

# flag -> ServerSettings field
SETTINGS_FLAGS: dict[str, str] = {
    "--host": "host",
    "--port": "port",
    "--served-model-name": "served_model_name",
    "--layercast-token": "token",
    "--layercast-token-file": "token_file",
}


def pop_option(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` or `flag=VALUE` from `argv` (the last occurrence wins); its value or None."""
    value = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def uses_settings(argv: list[str], environ: Mapping[str, str]) -> bool:
    return any(a == "--config" or a.startswith("--config=") for a in argv) or any(
        k.startswith("LAYERCAST_SERVER_") for k in environ
    )


def resolve(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(`layercast serve` argv for `inference_worker.serve`, environment to add) from settings + argv."""
    argv = list(argv)
    config = pop_option(argv, "--config")
    flags: dict[str, str] = {}
    if argv and not argv[0].startswith("-"):
        flags["model"] = argv.pop(0)
    for flag, name in SETTINGS_FLAGS.items():
        value = pop_option(argv, flag)
        if value is not None:
            flags[name] = value
    settings = load_settings(ServerSettings, config, flags)
    return settings.serve_argv()[1:] + argv, settings.serve_env()


def apply(argv: list[str]) -> list[str]:
    """`resolve` when settings are in use (the environment is updated here), else `argv` unchanged."""
    if not uses_settings(argv, os.environ):
        return argv
    serve_argv, env = resolve(argv)
    os.environ.update(env)
    return serve_argv
