"""The `lorakit` command: one module per subcommand, each with `register(subparsers)` and `run(args)`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import runtime

from . import demo, inspect, merge, plan, serve, sweep, train
from . import eval as eval_cmd  # a plain `eval` would shadow the builtin here

COMMANDS = {"train": train, "eval": eval_cmd, "plan": plan, "inspect": inspect, "merge": merge, "serve": serve,
            "sweep": sweep, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Parameter-efficient fine-tuning and adapter serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what lorakit does")
    parser.add_argument("--runtime", choices=runtime.MODES, default=None,
                        help="CPU runtime: stock (as installed) or tuned (Intel OpenMP preloaded; re-executes once). "
                             "Default: $LORAKIT_RUNTIME, else stock")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.register(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        runtime.apply(args.runtime, [a for i, a in enumerate(argv) if a != "--runtime" and
                                     (i == 0 or argv[i - 1] != "--runtime") and not a.startswith("--runtime=")])
        if args.command in ("train", "serve", "demo") and os.environ.get("RANK", "0") == "0":
            print(runtime.describe(), file=sys.stderr)
        return COMMANDS[args.command].run(args) or 0
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
