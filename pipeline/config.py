"""Job configuration: argparse flags with a YAML file underneath (flags override the file).

Every job parser is built with ``add_config_flag``; ``parse_args`` loads ``--config FILE.yaml``,
checks its keys against the parser's flags (an unknown key is an error naming the key and the
file), uses the file's values as defaults and parses the command line over them. All of it
happens before Ray starts, so a bad flag or config costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message names it."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of option values (keys are flag names, '-' or '_'); flags given on the "
                             "command line override it")


def load_yaml(path: str) -> dict:
    from pipeline import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return data


class _TokenError(Exception):
    pass


def _tokens(action: argparse.Action, key: str, value) -> list[str]:
    """A config value as the command-line tokens that would give it (so argparse checks its
    type and choices exactly as it checks a flag)."""
    flag = max(action.option_strings, key=len)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise _TokenError(f"{key}: expected true or false, got {value!r}")
        return [flag] if value == isinstance(action, argparse._StoreTrueAction) else []
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    values = value if isinstance(value, list) else [value]
    if not (many or isinstance(action, argparse._AppendAction)) and isinstance(value, list):
        raise _TokenError(f"{key}: expected one value, got a list {value!r}")
    for v in values:
        if isinstance(v, (list, dict)) or v is None:
            raise _TokenError(f"{key}: expected {'values' if many else 'a value'} like the flag takes, got {value!r}")
    text = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    if isinstance(action, argparse._AppendAction):
        return [t for v in text for t in (flag, v)]
    return [flag, *text]


def _typed_config(parser: argparse.ArgumentParser, values: dict, where: str) -> dict:
    """{dest: value} from the config mapping, converted and checked by the parser itself."""
    dests = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    tokens: list[str] = []
    given = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in dests:
            raise ConfigError(f"{where}: unknown option {key!r} (valid: {', '.join(sorted(dests))})")
        if value is None:  # null: the flag's default
            continue
        try:
            tokens += _tokens(dests[dest], str(key), value)
        except _TokenError as e:
            raise ConfigError(f"{where}: {e}") from None
        given.append(dest)
    required = [(a, a.required) for a in parser._actions]
    def fail(message):
        raise _TokenError(message)
    parser.error = fail  # only while the file's tokens are parsed: its errors name the file
    try:
        for a, _ in required:
            a.required = False
        ns = parser.parse_args(tokens)
    except _TokenError as e:
        raise ConfigError(f"{where}: {e}") from None
    finally:
        del parser.error
        for a, req in required:
            a.required = req
    return {d: getattr(ns, d) for d in given}


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv over the defaults from --config; exits with a clear message on bad input.

    Values from the file go through the parser exactly like flags (types, choices, number of
    values), so ``batch_size: 2.5`` fails here, naming the file and the key."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    try:
        values = _typed_config(parser, load_yaml(known.config), f"--config {known.config}")
    except ConfigError as e:
        parser.error(str(e))
    appended = {d: v for d, v in values.items()
                if isinstance(next(a for a in parser._actions if a.dest == d), argparse._AppendAction)}
    # argparse appends to a list default; keep those aside so flags replace, not extend, the file.
    parser.set_defaults(**{d: v for d, v in values.items() if d not in appended})
    for a in parser._actions:  # options the file gives are no longer required on the command line
        if a.dest in values:
            a.required = False
    args = parser.parse_args(argv)
    for dest, value in appended.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return args
