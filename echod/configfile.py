"""The config file: TOML, one key per option, under the command line's flags.

Design
------
A config file (``--config PATH``) is a TOML document of top-level keys, one
per option of :data:`~echod.config.OPTIONS`, named as the option's field
(the long flag without ``--``, ``_`` for ``-``): ``max_clients = 500``,
``log_level = "debug"``. Nothing is declared here: the keys, their types and
their checks all come from the :class:`~echod.config.Settings` fields, so an
option added there is a key here, and ``systemd/echod.toml``
(:func:`example`, checked by tests/unit/test_configfile.py) lists it.

Values are typed as TOML types them: a number for a number (an ``int``
where the option wants a whole number, an ``int`` or a ``float`` for
seconds), ``true``/``false`` for a switch, a string for anything else (text,
paths, networks, rates such as ``"10/60"``), and an array for a repeatable
option (``allow = ["10.0.0.0/8"]``). Strings go through the option's parser,
exactly as the flag's text does; numbers go through its check. A key the
file leaves out has its default.

Precedence: default, then the file, then the flags given on the command
line (:class:`Source`). A flag wins at every reload too: a key set by a flag
cannot be changed by editing the file. A repeatable option given on the
command line replaces the file's list rather than adding to it.

Error handling
--------------
:class:`ConfigError` (a :class:`~echod.errors.UsageError`, exit status 2)
holds every problem found, each one sentence naming the file and the key:
``config file /etc/echod/echod.toml, key max_clients: 0 is out of range
(must be at least 1)``. ``str(err)`` is all of them joined by ``; ``;
``echod check-config`` prints one a line. A file that cannot be read or is
not TOML is one problem.
"""

from __future__ import annotations

import difflib
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echod.config import OPTIONS, InvalidValue, Option, Settings
from echod.errors import UsageError

# What TOML type a value of each Python type takes; any other type (a path, a
# network, a rate) is written as a string, which the option's parser reads.
_TOML_TYPES: dict[Any, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),  # 5 seconds is fine
    str: (str,),
}
SIMILAR = 0.85  # difflib ratio for "did you mean": max_client yes, server -> user no
_TOML_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


class ConfigError(UsageError):
    """Problems with a config file; ``problems`` has one sentence each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _value_type(opt: Option) -> Any:
    """The key in _TOML_TYPES of one value of ``opt`` (an item, for a repeatable one)."""
    hint = _HINTS[opt.name]
    if opt.repeatable:  # tuple[X, ...]
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in _TOML_TYPES else str


_HINTS = typing.get_type_hints(Settings)


def _convert(opt: Option, value: Any) -> Any:
    """One TOML value as the option's value; raises InvalidValue with the reason."""
    kind = _value_type(opt)
    accepted = _TOML_TYPES[kind]
    # bool is an int in Python, but true is not a number in TOML.
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        raise InvalidValue(f"must be {_TOML_NAMES[kind]}")
    if opt.kind is None:  # a switch
        return value
    if isinstance(value, str):
        return opt.kind.parse(value)  # the flag's parser: paths expanded, names lowered
    number: Any = float(typing.cast(float, value)) if kind is float else value
    opt.kind.check(number)
    return number


def _convert_key(opt: Option, value: Any) -> Any:
    if not opt.repeatable:
        return _convert(opt, value)
    if not isinstance(value, list):
        raise InvalidValue('must be an array, such as ["a", "b"]')
    return tuple(_convert(opt, item) for item in value)


def read(path: Path) -> dict[str, Any]:
    """The options a config file sets, converted and checked; raises :class:`ConfigError`."""
    where = f"config file {path}"
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as err:
        raise ConfigError([f"cannot read {where}: {err.strerror or err}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{where} is not valid TOML: {err}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{where} is not valid TOML: it is not UTF-8 text"]) from None
    options = {opt.name: opt for opt in OPTIONS}
    values: dict[str, Any] = {}
    problems = []
    for key, value in document.items():
        opt = options.get(key)
        if opt is None:
            near = difflib.get_close_matches(key.replace("-", "_"), options, 1, SIMILAR)
            if near:
                hint = f" (did you mean {near[0]}?)"
            elif isinstance(value, dict):
                hint = " (every key is at the top level: no [tables])"
            else:
                hint = ""
            problems.append(f"{where}: unknown key {key!r}{hint}")
            continue
        try:
            values[key] = _convert_key(opt, value)
        except InvalidValue as err:
            problems.append(f"{where}, key {key}: {err}")
    if problems:
        raise ConfigError(problems)
    return values


@dataclass(frozen=True)
class Source:
    """Where settings come from: an optional config file, then the command line's flags.

    :meth:`load` reads the file anew each time, so the same :class:`Source`
    serves start-up and every reload.
    """

    path: Path | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)  # only the flags given

    def load(self) -> Settings:
        """Validated settings; raises :class:`ConfigError` or :class:`UsageError`."""
        values = read(self.path) if self.path is not None else {}
        values.update(self.flags)
        try:
            return Settings(**values)
        except UsageError as err:
            if self.path is None:
                raise
            # Settings speaks of flags; say that the file may be where it came from.
            raise ConfigError([f"{err} (with config file {self.path})"]) from None


# -- the example file, systemd/echod.toml ----------------------------------------

EXAMPLE_HEADER = """\
# /etc/echod/echod.toml -- echod's settings (`echod --config PATH`).
#
# Generated from echod/config.py by `python -m echod.configfile`: every key,
# commented out at its default. Keys are the long flags without `--` and with
# `_` for `-` (`--max-clients 500` is `max_clients = 500`); see `echod --help`.
#
# Flags on the command line win over this file, also at a reload. The unit
# (echod.service) gives --foreground and --control-socket itself.
#
# Check a change with `echod check-config --config /etc/echod/echod.toml`,
# apply it with `systemctl reload echod` (or `echod ctl reload`, or SIGHUP).
# Keys marked "needs restart" keep their running value until a restart.
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _example_value(opt: Option) -> str:
    """The example file's value of ``opt``: its default, or the form of a value."""
    form = (opt.metavar or "VALUE").split("|")[0]
    if opt.repeatable:
        return f'[]  # for example ["{form}"]'
    if opt.shown is not None and opt.shown.startswith("`"):  # the default, as text
        return _toml(opt.shown.strip("`"))
    if opt.shown is None and opt.default is not None:
        return _toml(opt.default)
    example = "true" if _value_type(opt) is bool else f'"{form}"'
    unset = "" if "default" in opt.help else "  # not set by default"
    return example + unset


def example() -> str:
    """The text of systemd/echod.toml: each option's help, and its key at its default."""
    out = [EXAMPLE_HEADER.rstrip("\n")]
    for opt in OPTIONS:
        out.append("")
        note = "" if opt.reloadable else " (needs restart)"
        out.extend(
            textwrap.wrap(f"{opt.help}.{note}", 78, initial_indent="# ", subsequent_indent="# ")
        )
        out.append(f"#{opt.name} = {_example_value(opt)}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(example())
