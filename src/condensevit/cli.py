"""The command line: ``condensevit {bench, models, train, eval, demo, viz, caption}``.

Each subcommand module exposes ``add_parser(subparsers)`` that registers its parser with
``set_defaults(func=handler)``; the handler takes the parsed namespace and returns an exit code.
User errors (``UsageError``, ``ValueError``, ``FileNotFoundError``) become a one-line message and
exit code 2, without a traceback; set ``CONDENSEVIT_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "UsageError"]


class UsageError(ValueError):
    """A problem with what the user asked for; printed as one line, exit code 2."""


# (module, attribute) of each subcommand's add_parser; modules are imported lazily
_SUBCOMMANDS = (
    ("condensevit.bench", "add_parser"),      # bench, models
    ("condensevit.train.cli", "add_parser"),  # train, eval
    ("condensevit.demo", "add_parser"),       # demo
    ("condensevit.viz", "add_parser"),        # viz
    ("condensevit.caption.cli", "add_parser"),  # caption train|eval|predict
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condensevit",
        description="Vision Transformers that condense many image tokens into a few (STViT, STViT-R, LookupViT).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, attr in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # that subcommand is not installed
                continue
            raise
        getattr(mod, attr)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("condensevit: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("CONDENSEVIT_DEBUG") or (isinstance(e, RuntimeError) and not _is_user_runtime_error(e)):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"condensevit {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _is_user_runtime_error(e: RuntimeError) -> bool:
    text = str(e)
    return "no CUDA GPU" in text or "CUDA" in text and "available" in text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
