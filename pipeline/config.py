"""Job configuration: argparse flags with a YAML file underneath (flags override the file).

Every job parser is built with ``add_config_flag``; ``parse_args`` loads ``--config FILE.yaml``,
checks its keys against the parser's flags (an unknown key is an error naming the key and the
file), uses the file's values as defaults and parses the command line over them. All of it
happens before Ray starts, so a bad flag or config costs nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
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


class JobParser(argparse.ArgumentParser):
    """The jobs' ArgumentParser: it remembers its options as they are added (``options``), so
    that ``parse_args`` merges --config through public API only. Required options are checked
    after parsing, not by argparse: a config file may give them. Parse errors raise
    ArgumentError (``exit_on_error=False``); ``parse_args`` turns them into the usual one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        self.options: dict[str, Option] = {}  # dest -> Option, in the order added (before
        super().__init__(*args, **kwargs)  # argparse's own init adds --help)

    def add_argument(self, *args, **kwargs):
        return self._remember(super().add_argument, args, kwargs)

    def add_argument_group(self, *args, **kwargs):
        return self._remembering(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return self._remembering(super().add_mutually_exclusive_group(**kwargs))

    def _remembering(self, group):
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._remember(add, a, k)
        return group

    def _remember(self, add, args, kwargs):
        required = kwargs.pop("required", False)
        if required:
            kwargs["help"] = f"{kwargs.get('help') or ''} (required)".strip()
        action = add(*args, **kwargs)
        if action.option_strings:
            self.options[action.dest] = Option(max(action.option_strings, key=len), kwargs.get("action", "store"),
                                               action.nargs, required)
        return action


@dataclass(frozen=True)
class Option:
    """flag: its longest spelling; action: argparse's ("store", "store_true", "append", ...);
    nargs: as given to argparse; required: a value must come from the command line or the file."""

    flag: str
    action: str
    nargs: int | str | None
    required: bool


def _tokens(option: Option, key: str, value) -> list[str]:
    """A config value as the command-line tokens that would give it (so argparse checks its
    type and choices exactly as it checks a flag)."""
    if option.action in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return [option.flag] if value == (option.action == "store_true") else []
    many = option.nargs in ("+", "*") or (isinstance(option.nargs, int) and option.nargs > 1)
    values = value if isinstance(value, list) else [value]
    if not (many or option.action == "append") and isinstance(value, list):
        raise ConfigError(f"{key}: expected one value, got a list {value!r}")
    for v in values:
        if isinstance(v, (list, dict)) or v is None:
            raise ConfigError(f"{key}: expected {'values' if many else 'a value'} like the flag takes, got {value!r}")
    text = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    if option.action == "append":
        return [t for v in text for t in (option.flag, v)]
    return [option.flag, *text]


def _typed_config(parser: JobParser, values: dict, where: str) -> dict:
    """{dest: value} from the config mapping, converted and checked by the parser itself."""
    options = {d: o for d, o in parser.options.items() if d not in ("help", "config")}
    tokens: list[str] = []
    given = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in options:
            raise ConfigError(f"{where}: unknown option {key!r} (valid: {', '.join(sorted(options))})")
        if value is None:  # null: the flag's default
            continue
        try:
            tokens += _tokens(options[dest], str(key), value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        given.append(dest)
    try:
        ns, rest = parser.parse_known_args(tokens)
    except argparse.ArgumentError as e:
        raise ConfigError(f"{where}: {e}") from None
    if rest:
        raise ConfigError(f"{where}: cannot read {' '.join(rest)}")
    return {d: getattr(ns, d) for d in given}


def _parse(parser: JobParser, argv: list[str], appended: dict | None = None) -> argparse.Namespace:
    """argv parsed; ``appended``: the file's values of append options, used where argv gives none
    (argparse would append the flags to a list default instead of replacing it)."""
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        parser.error(str(e))
    for dest, value in (appended or {}).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    missing = [o.flag for d, o in parser.options.items() if o.required and getattr(args, d, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def parse_args(parser: JobParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv over the defaults from --config; exits with a clear message on bad input.

    Values from the file go through the parser exactly like flags (types, choices, number of
    values), so ``batch_size: 2.5`` fails here, naming the file and the key."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return _parse(parser, argv)
    try:
        values = _typed_config(parser, load_yaml(known.config), f"--config {known.config}")
    except ConfigError as e:
        parser.error(str(e))
    appended = {d: v for d, v in values.items() if parser.options[d].action == "append"}
    parser.set_defaults(**{d: v for d, v in values.items() if d not in appended})
    return _parse(parser, argv, appended)
