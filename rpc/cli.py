"""The `layercast` command: `serve`, `demo` (more subcommands arrive with their features).

Each subcommand imports its heavy dependencies lazily, so `layercast --help` is instant and the trainer
side never needs vLLM installed.
"""

from __future__ import annotations

import argparse
import sys


def _serve(argv: list[str]) -> int:
    from inference_worker.serve import main as serve_main

    serve_main(argv)
    return 0


def _demo(argv: list[str]) -> int:
    from rpc.demo import main as demo_main

    return demo_main(argv)


COMMANDS = {
    "serve": (_serve, "start vLLM's OpenAI server with layercast's routes (all `vllm serve` args accepted)"),
    "demo": (_demo, "the main job: a tiny model served by vLLM, RL-like steps, sync + verify each step"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="layercast", description="Trainer-to-inference weight broadcast for RL (FP8, layer by layer)."
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
