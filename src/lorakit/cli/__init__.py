"""The `lorakit` command: one module per subcommand, each with `register(subparsers)` and `run(args)`."""
from __future__ import annotations

import argparse
import logging
import sys

from . import demo, inspect, merge, plan, serve, sweep, train
from . import eval as eval_cmd  # a plain `eval` would shadow the builtin here

COMMANDS = {"train": train, "eval": eval_cmd, "plan": plan, "inspect": inspect, "merge": merge, "serve": serve,
            "sweep": sweep, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Parameter-efficient fine-tuning and adapter serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what lorakit does")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.register(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args) or 0
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
