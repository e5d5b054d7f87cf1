"""Config dataclasses define their own CLI flags: a field made with opt() carries its
default, its help and (optionally) its flag name, so each is written once. The CLI
adds the flags (add_flags), builds the config (from_args), and the launcher turns a
config back into the flags that rebuild it (to_argv)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any


def opt(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, off: str | None = None,
        choices: tuple | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with a CLI flag. flag: the name when it is not --field-name; off: the
    flag that turns a default-True bool off (default --no-field-name)."""
    meta = {"help": help, "flag": flag, "off": off, "choices": choices}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def _flags(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
            out.append((f, args[0] if args else hints[f.name]))
    return out


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    if f.metadata["flag"]:
        return f.metadata["flag"]
    return "--" + (prefix + f.name).replace("_", "-")


def _off_name(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata["off"] or "--no-" + (prefix + f.name).replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: tuple[str, ...] = (),
              prefix: str = "", note: Callable[[dataclasses.Field], str] | None = None) -> None:
    """One flag per opt() field of cls, dest = prefix + the field's name. With a prefix
    (options of one of several backends) an unset flag parses as None, and a flag another
    class added already is left as it is."""
    for f, kind in _flags(cls):
        if f.name in skip or (prefix and flag_name(f, prefix) in getattr(p, "_option_string_actions", {})):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else _default(f)
        text, dest = (note(f) if note else "") + f.metadata["help"], prefix + f.name
        if kind is bool:
            unset = None if prefix else default  # a backend's option not given is None, as for other kinds
            if default:
                p.add_argument(_off_name(f, prefix), dest=dest, action="store_false", default=unset, help=text)
            else:
                p.add_argument(flag_name(f, prefix), dest=dest, action="store_true", default=unset, help=text)
            continue
        if default not in (None, "", ()):
            text += f" (default: {default})".replace("%", "%%")
        if prefix:
            default = None
        if kind in (list, tuple) or typing.get_origin(kind) in (list, tuple):
            p.add_argument(flag_name(f, prefix), dest=dest, action="append", default=None,
                           help=text + " (repeatable)")
            continue
        p.add_argument(flag_name(f, prefix), dest=dest, type=kind, default=default, required=required,
                       choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else kind.__name__.upper(),
                       help=text)


def from_args(cls, a: argparse.Namespace, prefix: str = "", **given: Any):
    """cls built from the parsed flags of its opt() fields (plus `given`)."""
    values = {f.name: getattr(a, prefix + f.name) for f, _ in _flags(cls) if hasattr(a, prefix + f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
    return cls(**{**values, **given})


def to_argv(cfg: Any, prefix: str = "") -> list[str]:
    """The flags that rebuild cfg's opt() fields, for those that differ from their defaults."""
    argv: list[str] = []
    for f, kind in _flags(type(cfg)):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            if value == _default(f):
                continue
        if kind is bool:
            argv.append(flag_name(f, prefix) if value else _off_name(f, prefix))
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag_name(f, prefix), str(item)]
        elif value is not None:
            argv += [flag_name(f, prefix), str(value)]
    return argv
