"""`quantlrm` command line: each subcommand's arguments live in its own module here.

Every module `quantlrm.cli.<name>` defines `register(subparsers)`, which adds its parser
and sets `func(args) -> int | None`. Problems the user can fix are `QuantLRMError`s,
printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from quantlrm import __version__
from quantlrm.errors import QuantLRMError

COMMANDS = ("demo", "signals", "quantize", "export", "eval", "finetune", "protect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlrm",
        description="Quantize large reasoning models to 3/4 bits with fine-tuning signals.",
    )
    parser.add_argument("--version", action="version", version=f"quantlrm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"quantlrm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"quantlrm.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except QuantLRMError as e:
        print(f"quantlrm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantlrm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
