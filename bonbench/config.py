"""Typed dataclass configs on the command line: ``--help`` from field metadata, a YAML file via
``--config``, and ``--field value`` overrides on top (command line > YAML > defaults).

A bad option on the command line is argparse's usage error; a bad ``--config`` file (missing,
unreadable, not YAML, an unknown option, a value of the wrong type) is a ``UserError``, which
``bonbench.cli.run_command`` reports in one sentence."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from bonbench.errors import UserError

C = TypeVar("C")


def option(default: Any = dataclasses.MISSING, help: str = "", flag: str | None = None, **kw) -> Any:
    """A dataclass field with a ``--help`` line; ``flag`` replaces the option's name (``--from`` for
    a field that cannot be called ``from``)."""
    metadata = {"help": help, "flag": flag}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _base_type(tp) -> tuple[type, bool]:
    """(element type, is a list) of a field's annotation, Optional stripped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(cls: type[C], argv: Sequence[str] | None = None, *, prog: str | None = None,
                 description: str | None = None) -> C:
    """Build ``cls`` from the command line; ``__post_init__`` errors become usage errors."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below")
    for f in dataclasses.fields(cls):
        base, many = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if base is bool:
            kwargs.update(type=_bool, metavar="BOOL")
        else:
            kwargs["type"] = base if base in (int, float, str) else str
        if many:
            kwargs["nargs"] = "+"
        kwargs["help"] = f"{kwargs['help']} (default: {default})"
        parser.add_argument(f.metadata.get("flag") or f"--{f.name.replace('_', '-')}", dest=f.name, **kwargs)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    path = args.pop("config", None)
    if path is not None:
        values.update(load_yaml(cls, path))
    values.update(args)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def load_yaml(cls: type, path: Path) -> dict[str, Any]:
    """A YAML file's options for ``cls``, each checked against its field's type (a float field also
    takes an integer, and text such as ``1e-3``, which YAML reads as a string). A file that is
    missing, unreadable, not YAML or not a mapping, an option ``cls`` does not have and a value of
    the wrong type are each a ``UserError`` that says which."""
    path = Path(path)
    where = f"the config file {path}"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where} does not exist.") from None
    except IsADirectoryError:
        raise UserError(f"{where} is a folder, not a YAML file.") from None
    except OSError as exc:
        raise UserError(f"{where} cannot be read: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not text: {exc.reason} at byte {exc.start}.") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {_yaml_problem(exc)}.") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} holds a {type(data).__name__}, not a mapping of option names to values.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [str(key) for key in data if key not in fields]
    if unknown:
        named = ", ".join(_with_suggestion(key, fields) for key in unknown)
        raise UserError(f"{where} has option(s) that {cls.__name__} does not have: {named}.")
    hints = typing.get_type_hints(cls)
    return {name: _typed(value, hints[name], fields[name], f"{where} gives {name}") for name, value in data.items()}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _with_suggestion(key: str, fields: dict) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(fields), n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


_EXPECTED = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings")}  # what a value of each type is called, one and many


def _typed(value: Any, annotation: Any, field: dataclasses.Field, what: str) -> Any:
    """``value`` as ``annotation`` wants it (a float field's integer or text becomes a float); else ``UserError``."""
    base, many = _base_type(annotation)
    if value is None and (field.default is None or type(None) in typing.get_args(annotation)):
        return None
    if base not in _EXPECTED:
        return value  # a type the command line takes as text: checked where the config is used
    expected = f"a list of {_EXPECTED[base][1]}" if many else _EXPECTED[base][0]
    items = value if many and isinstance(value, list) else [value]
    if (many and not isinstance(value, list)) or not all(_is(item, base) for item in items):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise UserError(f"{what} the value {shown}, which is not {expected}.")
    items = [float(item) if base is float else item for item in items]
    return items if many else items[0]


def _is(value: Any, base: type) -> bool:
    """Whether ``value`` (as YAML read it) is one of ``base``; True is not an integer here."""
    if isinstance(value, bool) or base is bool:
        return isinstance(value, bool) and base is bool
    if base is float and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return isinstance(value, (int, float) if base is float else base)


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
