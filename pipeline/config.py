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


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv over the defaults from --config; exits with a clear message on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = load_yaml(known.config)
        except ConfigError as e:
            parser.error(str(e))
        dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        defaults, appended = {}, {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests:
                parser.error(f"--config {known.config}: unknown option {key!r} (valid: {', '.join(sorted(dests))})")
            action = dests[dest]
            many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
            if many:
                value = value if isinstance(value, list) else [value]
            for v in value if many else [value]:
                if action.choices is not None and v not in action.choices:
                    parser.error(f"--config {known.config}: {key}={v!r} is not one of {list(action.choices)}")
            # argparse appends to a list default; keep those aside so flags replace, not extend, the file.
            (appended if isinstance(action, argparse._AppendAction) else defaults)[dest] = value
        parser.set_defaults(**defaults)
        # Options satisfied by the file are no longer required on the command line.
        for a in parser._actions:
            if a.dest in defaults or a.dest in appended:
                a.required = False
        args = parser.parse_args(argv)
        for dest, value in appended.items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)
        return args
    return parser.parse_args(argv)
