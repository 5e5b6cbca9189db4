"""`sam-blocked` command line.

Every module in this package that defines `add_parser(subparsers)` is a subcommand; its
parser sets `main`, which takes the parsed args and returns the exit code. Modules hold
argument handling and printing only: the work is done by the library.

The library's refusals name settings (max_pixels); here they are spelled as flags
(--max-pixels) through FLAGS, never by rewriting a message.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

from sam_blocked.errors import FlagNames, spell

# Each setting's flag: its name with dashes, but for these (setting -> flag name).
FLAGS = FlagNames({"formats": "format", "tiling": "tile"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-blocked",
        description="Exact blocked attention for Segment Anything on large images with little memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:  # --threads, for every command that has it (add_model_args)
            from sam_blocked.cli.common import apply_threads

            apply_threads(args)
        return int(args.main(args) or 0)
    except (ValueError, OSError) as error:
        # Bad input gets a message naming it, never a traceback.
        print(f"sam-blocked {args.command}: error: {spell(error, FLAGS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sam-blocked {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
