"""The `layercast` command: `serve`, `demo`, `bench`, `check`; `layercast COMMAND --help` for each.

Each subcommand imports its heavy dependencies lazily, so `layercast --help` is instant and the trainer
side never needs vLLM installed.
"""

from __future__ import annotations

import argparse
import sys

SERVE_HELP = """\
usage: layercast serve [MODEL] [--config FILE] [--layercast-token-file PATH] [--insecure]
                       [vllm serve args...]

vLLM's OpenAI server with layercast's worker extension and routes (/init_broadcaster, /update_weights,
/weights, /check; layercast metrics on vLLM's /metrics). Every `vllm serve` argument is accepted.
Binds 127.0.0.1 unless --host is given. The admin token: LAYERCAST_ADMIN_TOKEN, or a file.

  --config FILE   TOML settings: its [server] table (model, host, port, served_model_name, token,
                  token_file, dev_mode, gloo_socket_ifname, env, vllm_args), overridden by
                  LAYERCAST_SERVER_* variables, overridden by MODEL / --host / --port /
                  --served-model-name / --layercast-token / --layercast-token-file.
  --layercast-token-file PATH
                  read the admin token from PATH (replaces LAYERCAST_ADMIN_TOKEN; keep it chmod 600).
  --layercast-token TOKEN
                  the admin token itself; works, but every user of the machine sees it in `ps`.
  --insecure      allow a non-loopback --host without an admin token (refused otherwise, exit 2);
                  a loud warning is printed at every start.

vLLM's own options follow.
"""


def _serve(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(SERVE_HELP)
    from configs.settings import SettingsError
    from rpc.tools import serve_guard
    from rpc.tools.serve_settings import apply

    typed_token = serve_guard.has_flag(argv, "--layercast-token")
    try:
        argv = apply(argv)
        if not any(a in ("-h", "--help") for a in argv):
            argv, warnings = serve_guard.apply(argv, token_on_command_line=typed_token)
            for warning in warnings:
                print(f"layercast serve: WARNING: {warning}", file=sys.stderr)
    except (SettingsError, ValueError) as exc:
        print(f"layercast serve: {exc}", file=sys.stderr)
        return 2
    from inference_worker.serve import main as serve_main

    serve_main(argv)
    return 0


def _demo(argv: list[str]) -> int:
    from rpc.tools.demo import main as demo_main

    return demo_main(argv)


def _bench(argv: list[str]) -> int:
    from rpc.tools.bench import main as bench_main

    return bench_main(argv)


def _check(argv: list[str]) -> int:
    from rpc.tools.check import main as check_main

    return check_main(argv)


COMMANDS = {
    "serve": (_serve, "start vLLM's OpenAI server with layercast's routes (all `vllm serve` args accepted)"),
    "demo": (_demo, "the main job: a tiny model served by vLLM, RL-like steps, sync + verify each step"),
    "bench": (_bench, "run a benchmark from bench/ (`layercast bench` lists them); args pass through"),
    "check": (_check, "dry run against live servers: scheme, load path, manifest differences, memory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="layercast",
        description="Trainer-to-inference weight broadcast for RL (FP8, layer by layer).",
        epilog="`layercast COMMAND --help` describes each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    handler, _ = COMMANDS[argv[0]]
    return handler(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
