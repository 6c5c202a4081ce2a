"""The command line: ``condensevit {bench, models, train, eval, demo, viz, caption, export}``.

Each subcommand module exposes ``add_parser(subparsers)`` that registers its parser with
``set_defaults(func=handler)``; the handler takes the parsed namespace and returns an exit code.
User errors (``UsageError``, ``ValueError``, ``FileNotFoundError``, files that cannot be written or a
full disk) become a one-line message and exit code 2, without a traceback (an error raised in a data
loader worker shows its own message, naming the file); set ``CONDENSEVIT_DEBUG=1`` to see the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "UsageError", "HelpFormatter"]


class UsageError(ValueError):
    """A problem with what the user asked for; printed as one line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows an option's default once: appended when the help text does not already
    say it, and only for a real value (not for None, whose meaning the help text gives, nor for
    on/off flags)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


# (module, attribute) of each subcommand's add_parser; modules are imported lazily
_SUBCOMMANDS = (
    ("condensevit.bench", "add_parser"),      # bench, models
    ("condensevit.train.cli", "add_parser"),  # train, eval
    ("condensevit.demo", "add_parser"),       # demo
    ("condensevit.viz", "add_parser"),        # viz
    ("condensevit.caption.cli", "add_parser"),  # caption train|eval|predict
    ("condensevit.deploy", "add_parser"),     # export
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


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that ``args`` went through, for errors in its own usage."""
    for dest in ("command", "caption_command"):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, dest, None)
        if not subs or name is None or name not in subs[0].choices:
            break
        parser = subs[0].choices[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:   # the error from the command's own parser: its usage, not the top level's
        chosen = _chosen_parser(parser, args)
        chosen.error(f"unrecognized arguments: {' '.join(extra)} (see {chosen.prog} --help)")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("condensevit: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if os.environ.get("CONDENSEVIT_DEBUG") or (isinstance(e, RuntimeError) and not _is_user_runtime_error(e)) \
                or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and not _is_user_os_error(e)):
            raise
        print(f"condensevit {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


def _is_user_runtime_error(e: RuntimeError) -> bool:
    text = str(e)
    return "no CUDA GPU" in text or "CUDA" in text and "available" in text


def _is_user_os_error(e: OSError) -> bool:
    """Files that cannot be written or read (a folder made read-only mid-run, a full disk): the
    commands check their outputs before starting, this is the net for what changes later."""
    import errno
    return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _worker_error(text: str) -> str | None:
    """The original message of an error raised in a DataLoader worker process, which PyTorch
    re-raises as "Caught ValueError in DataLoader worker process 1.\nOriginal Traceback ...": its
    last line, so that the one line shown names the file, not the worker."""
    if not text.startswith("Caught ") or "DataLoader worker process" not in text.splitlines()[0]:
        return None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    return last.split(": ", 1)[1] if ": " in last else last or None


def _message(e: BaseException) -> str:
    """The one line shown for a user error."""
    text = str(e).strip()
    inner = _worker_error(text)
    if inner:
        return inner
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"cannot write or read {e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
