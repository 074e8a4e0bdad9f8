"""Typed dataclass configs on the command line: ``--help`` from field metadata, a YAML file via
``--config``, and ``--field value`` overrides on top (command line > YAML > defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

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
        values.update(load_yaml(cls, path, parser))
    values.update(args)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def load_yaml(cls: type, path: Path, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """A YAML file's options for ``cls``; unknown keys are an error, not silently ignored."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        message = f"{path}: unknown option(s) {', '.join(unknown)} for {cls.__name__}"
        if parser is None:
            raise ValueError(message)
        parser.error(message)
    return data


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
