"""The argument parser of every entry point: YAML configs, typed values with one-line errors."""
from __future__ import annotations

import argparse
import math
from typing import Any, NoReturn
from collections.abc import Callable, Sequence

from .errors import UserError


def at_least(minimum: float, kind: type = int, strict: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that reads ``kind`` and refuses values below ``minimum`` (or equal to
    it with ``strict``) with argparse's own one-line error and exit code 2."""
    return in_range(kind, above=minimum) if strict else in_range(kind, minimum=minimum)


def in_range(kind: type = float, minimum: float | None = None, maximum: float | None = None,
             above: float | None = None, below: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` reading ``kind`` within [minimum, maximum] and (above, below), any bound
    optional; anything else (NaN included) is argparse's one-line error with exit code 2."""
    bounds = [f">= {minimum}" if minimum is not None else None, f"> {above}" if above is not None else None,
              f"<= {maximum}" if maximum is not None else None, f"< {below}" if below is not None else None]
    wanted = " and ".join(b for b in bounds if b)
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and not (kind is float and not math.isfinite(value)) and \
            (minimum is None or value >= minimum) and (above is None or value > above) and \
            (maximum is None or value <= maximum) and (below is None or value < below)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + wanted if wanted else ''}, got {text!r}")
        return value
    return parse


def check_device(device: str | None) -> None:
    """Refuse ``--device cuda...`` on a machine (or a torch build) without CUDA, in one line."""
    import torch
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; pass --device cpu "
                        f"or leave --device out")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows each flag's default once: not where the help
    text already speaks of its default, and not for a default that says nothing (None, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: argument --lr: must be ...``; --help shows the
    usage) and exit code 2, like every other refusal of ours; defaults shown in --help; every long
    flag accepted with hyphens and with underscores (the released command lines mix them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        """argparse's add_argument; a long flag also under its other spelling (hyphens / underscores)."""
        spellings = list(names)
        for name in names:
            if name.startswith("--"):
                for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                    if other not in spellings and other not in self._option_string_actions:
                        spellings.append(other)
        return super().add_argument(*spellings, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """With ``-c/--config FILE`` (when the parser has it): the file's keys (flag names, with
        hyphens or underscores) become the defaults, so the command line still overrides them."""
        if "--config" in self._option_string_actions:
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("-c", "--config", default=None)
            known, _ = pre.parse_known_args(args)
            if known.config:
                self.set_defaults(**self._read_config(known.config))
        return super().parse_known_args(args, namespace)

    def _read_config(self, path):
        import yaml
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
            self.error(f"cannot read the config file {path!r} ({type(e).__name__}: {e})")
        if not isinstance(values, dict):
            self.error(f"the config file {path!r} holds a {type(values).__name__}; it must map flag names to values")
        defaults = {}
        for key, value in values.items():
            action = self._option_string_actions.get("--" + str(key).lstrip("-")) if isinstance(key, str) else None
            if action is None or action.dest in ("help", "config"):
                self.error(f"{path}: {str(key)[:80]!r} is not a flag of {self.prog}")
            defaults[action.dest] = self._config_value(path, key, action, value)
        return defaults

    def _config_value(self, path, key, action, value):
        """A config value through the flag's own conversion and checks (``type``, ``choices``, the
        number of values), as if it had been typed on the command line; what a command line cannot
        say (a YAML string or number for a switch, null, a list for one value) is refused by name."""
        where = f"{path}: {key}:"
        if action.nargs == 0:  # a switch (store_true / store_false): only YAML's true or false
            if not isinstance(value, bool):
                self.error(f"{where} {_shown(value)} is not a boolean; write true or false (unquoted)")
            return action.const if value else (not action.const)
        if value is None:
            if action.default is None:
                return None  # the flag's own default
            self.error(f"{where} is empty (YAML null); give a value, or remove the line to keep the default "
                       f"{action.default!r}")
        appends = isinstance(action, argparse._AppendAction)  # repeatable: one value or a list, kept as a list
        many = action.nargs not in (None, "?") or appends
        if isinstance(value, list) and not many:
            self.error(f"{where} a list ({_shown(value)}) where one value belongs")
        values = value if isinstance(value, list) else [value]
        if many and isinstance(action.nargs, int) and len(values) != action.nargs:
            self.error(f"{where} needs {action.nargs} values, got {len(values)} ({_shown(value)})")
        if many and not values:
            self.error(f"{where} an empty list; give at least one value")
        for v in values:
            if isinstance(v, (bool, list, dict)) or v is None:
                self.error(f"{where} {_shown(v)} is not a {_kind(action)}")
        try:
            converted = [self._get_value(action, str(v)) for v in values]
            for v in converted:
                self._check_value(action, v)
        except argparse.ArgumentError as e:
            self.error(f"{where} {e.message}")
        return converted if many else converted[0]

    def format_help(self) -> str:
        """--help with one spelling per flag (the other is accepted all the same)."""
        hidden = {}
        for action in self._actions:
            shown = [s for s in action.option_strings if not _alternate(s, action.option_strings)]
            hidden[action] = action.option_strings
            action.option_strings = shown
        try:
            return super().format_help()
        finally:
            for action, strings in hidden.items():
                action.option_strings = strings

    def error(self, message: str) -> NoReturn:
        """argparse's error on one line, exit code 2."""
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _shown(value):
    """A YAML value as the user wrote it, short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(action):
    kind = getattr(action.type, "__name__", None)
    return {"int": "whole number", "float": "number"}.get(kind, "value") if action.type else "string"


def _alternate(option, options):
    """True for a spelling we added: its other form (the one given) comes first among ``options``."""
    if not option.startswith("--"):
        return False
    for other in options:
        if other == option:
            return False
        if other.startswith("--") and other[2:].replace("_", "-") == option[2:].replace("_", "-"):
            return True
    return False
