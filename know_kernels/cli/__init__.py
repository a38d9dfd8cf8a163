"""The ``know`` command.  Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser with ``set_defaults(func=...)``;
``func(args)`` returns the exit code."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = ("info", "selftest", "predict", "collect", "meta_train", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="know", description="KNOW prediction with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # A warning reads like the errors below, without Python's file and line (for this
    # command only: main() also runs inside other programs and tests).
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: (
        f"know {args.command}: warning: {message}\n")
    try:
        return int(args.func(args) or 0)
    # OSError: a full disk, a read-only or unwritable place (named by the write layer), a
    # missing or existing file.
    except (ValueError, OSError, TypeError, KeyError, RuntimeError) as exc:
        print(f"know {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous
