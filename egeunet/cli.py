"""The ``egeunet`` command line. Each subcommand lives beside the code it drives: a
module listed in COMMAND_MODULES exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed arguments, returning an exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "egeunet.app",
    "egeunet.complexity",
    "egeunet.data.commands",
    "egeunet.engine_commands",
    "egeunet.export",
    "egeunet.evidence",
    "egeunet.shipped",
    "egeunet.study",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egeunet",
        description="EGE-UNet reproducibility kit: data, training, evaluation, reports.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as error:
        # Bad input: a clear one-line message, no traceback. KeyError's str() adds quotes.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"egeunet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"egeunet {args.command}: interrupted; finished work is kept, rerun to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
