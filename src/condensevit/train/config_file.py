"""``condensevit train --config FILE.yaml``: training options from a YAML file.

Every option of ``condensevit train`` is a key, spelled as the flag without its dashes, with ``_``
or ``-`` (``batch_size: 128`` or ``batch-size: 128``); values are what the flag takes, in YAML
(``scale: [0.08, 1.0]``, ``model_kwargs: {compressed_grid: [5, 5]}``, ``model_ema: true``). Flags
given on the command line override the file (``model_kwargs`` key by key). A run writes its
resolved config (learning rates scaled, every default filled in) as ``OUTPUT/config.yaml``, which
this command takes back as it is. Unknown keys and values of the wrong type are a one-line error.

The file's values take the place of the defaults (as in timm's ``train.py``), and only of them: the
flags the command line gave are found by parsing it again with the defaults suppressed, so a given
flag wins even when it equals its default.
"""
from __future__ import annotations

import argparse
import difflib
import os

__all__ = ["RecordingParser", "given_dests", "load_config_file", "dump_config", "RECIPES_DIR"]

# recipes/ at the root of a source checkout
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "recipes")


def _usage_error(msg: str):
    from ..cli import UsageError
    return UsageError(msg)


class RecordingParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the arguments it parsed (``namespace.given_argv``), so that the
    flags the command line really gave can be told from defaults (:func:`given_dests`)."""

    def parse_known_args(self, args=None, namespace=None):
        import sys
        ns, extras = super().parse_known_args(args, namespace)
        ns.given_argv = list(sys.argv[1:] if args is None else args)
        return ns, extras


def given_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options ``argv`` gives explicitly (even when equal to their default): ``argv`` parsed
    again with every default suppressed."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        ns, _ = argparse.ArgumentParser.parse_known_args(parser, list(argv), argparse.Namespace())
    finally:
        for a, d in saved:
            a.default = d
        parser._defaults.update(saved_defaults)
    return set(vars(ns))


def _aliases(parser: argparse.ArgumentParser) -> dict:
    """key -> (action, negate): each option's dest and each of its flag names, dashes as ``_``."""
    out = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or action.help == argparse.SUPPRESS and action.dest.startswith("debug"):
            continue
        out[action.dest] = (action, False)
        for opt in action.option_strings:
            if opt.startswith("--"):
                name = opt[2:].replace("-", "_")
                # --no-measure (store_false into measure), --no-model-ema (BooleanOptionalAction)
                negate = name != action.dest and name.startswith("no_") and name[3:] == action.dest
                out.setdefault(name, (action, negate))
    return out


def _convert(key: str, value, action: argparse.Action, negate: bool, source: str):
    """A YAML value as the option would have parsed it."""
    def bad(why):
        return _usage_error(f"{source}: {key}: {value!r} {why}")

    if value is None:
        return None
    flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                               argparse.BooleanOptionalAction))
    if flag:
        if not isinstance(value, bool):
            raise bad("must be true or false")
        if key.replace("-", "_") == action.dest:  # the setting itself: measure, progress, model_ema
            return value
        if isinstance(action, argparse.BooleanOptionalAction):  # no_model_ema
            return not value if negate else value
        # a flag named differently from its dest (--no-measure, --no-progress): true sets its const
        if not value:
            raise bad(f"can only be true (it sets {action.dest} to {action.const}); leave it out instead")
        return action.const
    if action.nargs == "+":  # --model-kwargs, --teacher-kwargs: a mapping
        from .cli import parse_model_kwargs
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, (str, list)):
            return parse_model_kwargs(value if isinstance(value, list) else [value])
        raise bad("must be a mapping such as {compressed_grid: [5, 5]}")
    conv = action.type
    if isinstance(value, (list, tuple)):
        if getattr(conv, "__name__", "") == "_scale" and len(value) == 2:
            try:
                return tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise bad("must be two numbers") from None
        raise bad("must be a single value")
    if isinstance(value, dict):
        raise bad("must be a single value")
    if conv is not None:
        if isinstance(value, bool):
            raise bad(f"must be a {getattr(conv, '__name__', 'value')}, not true/false")
        if conv is float and isinstance(value, int):
            value = float(value)
        elif conv is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif not (conv in (int, float) and isinstance(value, conv)):
            try:  # strings (YAML reads 5e-4 as one), or a conversion of the option's own
                value = conv(str(value))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise bad(f"is not valid ({e})") from None
    elif not isinstance(value, str):
        if isinstance(value, bool):
            raise bad("must be a string")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise bad(f"must be one of {', '.join(map(str, action.choices))}")
    return value


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """The options in the YAML file at ``path`` as ``{dest: value}``, checked against ``parser``."""
    import yaml

    if not os.path.isfile(path):
        hint = ""
        if not os.path.isabs(path) and os.path.isdir(RECIPES_DIR):
            names = sorted(f for f in os.listdir(RECIPES_DIR) if f.endswith((".yaml", ".yml")))
            close = difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.5)
            hint = f"; did you mean recipes/{close[0]}?" if close else ""
        raise _usage_error(f"--config {path}: no such file{hint}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise _usage_error(f"--config {path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _usage_error(f"--config {path}: cannot be read ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _usage_error(f"--config {path}: must be a mapping of option: value, not a {type(data).__name__}")
    aliases = _aliases(parser)
    out, seen = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in aliases:
            close = difflib.get_close_matches(name, list(aliases), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; the keys are `condensevit train` options"
            raise _usage_error(f"--config {path}: unknown option {key!r}{hint}")
        action, negate = aliases[name]
        if action.dest in seen:
            raise _usage_error(f"--config {path}: {key!r} and {seen[action.dest]!r} set the same option")
        seen[action.dest] = key
        out[action.dest] = _convert(str(key), value, action, negate, f"--config {path}")
    return out


def dump_config(cfg) -> str:
    """``cfg`` (a TrainConfig) as a YAML file ``--config`` takes back (test hooks left out)."""
    import yaml

    d = cfg.to_json()
    for k in [k for k in d if k.startswith("debug_")]:
        d.pop(k)
    d["quiet"] = not d.pop("verbose")  # the flag's spelling
    head = ("# the resolved config of this run (learning rates as they ran, every default filled in);\n"
            "# `condensevit train --config THIS_FILE` runs it again, flags given after it override\n")
    return head + yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
