"""Dataclass configs <-> command-line flags <-> YAML files.

Each CLI verb is described by one dataclass: its fields become `--flags` (help text lives in the
field's metadata), `--config FILE.yaml` supplies values by the same names, and flags given on
the command line override the file. A run's full config is saved as YAML next to its outputs,
so `--config run/train_config.yaml` reproduces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import LMForgeError
from .fileio import atomic_write


def arg(default: Any = None, help: str = "", *, positional: bool = False, choices=None,
        short: str | None = None, cli: bool = True, nargs=None, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field that knows its flag: `x: int = arg(3, "what x does", ge=1)`.

    `ge`/`gt`/`le`/`lt` bound a numeric value (each element of a list); `check` enforces them for
    flags, YAML and Python callers alike, with a one-line error naming the flag.
    """
    meta = {"help": help, "positional": positional, "choices": choices, "short": short, "cli": cli,
            "nargs": nargs, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                                       if v is not None}}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp) -> tuple[type, bool]:
    """(element type, is_list) for annotations like `int`, `int | None`, `list[str] | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _int(text: str) -> int:
    """An integer flag that also accepts 1e6-style notation (handy for token budgets)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        return int(value)


def flag(name: str) -> str:
    """The command-line flag of a field: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


def _field_groups(cls) -> list[tuple[str, list[dataclasses.Field]]]:
    """Fields grouped by the dataclass that declares them, the most specific class first."""
    groups, seen = [], set()
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        own = [f for f in dataclasses.fields(klass) if f.name not in seen and f.name in klass.__annotations__]
        seen.update(f.name for f in own)
        title = (klass.__doc__ or klass.__name__).strip().splitlines()[0].rstrip(".")
        if own:
            groups.append((title, own))
    return groups


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    groups = _field_groups(cls)
    for i, (title, group_fields) in enumerate(groups):
        target = parser if len(groups) == 1 or i == 0 else parser.add_argument_group(title)
        _add_fields(target, group_fields, hints)
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read options from a YAML file (keys are the flag names; flags given here win)")


def _add_fields(parser, fields_: list[dataclasses.Field], hints: dict) -> None:
    for f in fields_:
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta.get("help", "")
        if not (default is None or default is False or default == []) and not meta.get("positional"):
            help_text += f" (default: {default})"  # 0 is a default worth showing, False is not
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if meta.get("positional"):
            # Optional for argparse so that --config may supply it; from_namespace checks it is there.
            parser.add_argument(f.name, type=tp, nargs="*" if is_list else "?", default=argparse.SUPPRESS,
                                help=meta.get("help", ""), metavar=f.name.upper())
            continue
        names = ([meta["short"]] if meta.get("short") else []) + [flag(f.name)]  # usage shows the short one
        if tp is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if is_list:  # repeatable: `--data a b --data c` gives [a, b, c]
            kw["nargs"], kw["action"] = meta.get("nargs") or "+", _Extend
        if tp in (dict, typing.Any):
            tp = yaml.safe_load
        elif tp is int:
            tp = _int
        parser.add_argument(*names, type=tp, choices=meta.get("choices"), metavar=f.name.upper(), **kw)


def load_yaml(path: str | Path, cls) -> dict:
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"no such config file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LMForgeError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LMForgeError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(cls)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LMForgeError(f"{path}: unknown config key(s) {', '.join(unknown)} "
                           f"(valid: {', '.join(sorted(known))})")
    return data


def _coerce(cls, values: dict) -> dict:
    """Type-check values from YAML (flags are already typed by argparse)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        tp, is_list = _base_type(hints[name])
        if value is None or tp in (dict, typing.Any):
            out[name] = value
            continue
        items = value if isinstance(value, list) else [value]
        if is_list and not isinstance(value, list):
            value = items
        try:
            conv = [tp(v) if not (tp is float and isinstance(v, int)) else float(v) for v in items]
            if tp is bool and not all(isinstance(v, bool) for v in items):
                raise ValueError
            if tp is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                raise ValueError
        except (TypeError, ValueError):
            raise LMForgeError(f"config key {name!r}: expected {tp.__name__}, got {value!r}") from None
        out[name] = conv if is_list else conv[0]
    return out


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def check(obj) -> None:
    """Enforce every field's declared bounds: one mechanism for every verb's numbers."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("bounds") or {}
        value = getattr(obj, f.name)
        if not bounds or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v) or not all(_BOUND_OK[k](v, b) for k, b in bounds.items()):
                want = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())
                finite = "" if math.isfinite(v) else "a finite number "
                raise LMForgeError(f"{flag(f.name)} must be {finite}{want} (got {v:g})")


def recover_positionals(cls, values: dict, order: list[str]) -> None:
    """`evaluate --data a b MODEL`: a list flag swallowed the positional that followed it. When a
    required positional is missing, take it back from the end of the list flag given last."""
    missing = [f.name for f in dataclasses.fields(cls)
               if f.metadata.get("positional") and values.get(f.name) in (None, [])]
    lists = [name for name in reversed(order) if isinstance(values.get(name), list) and len(values[name]) > 1]
    for name in missing:
        if not lists:
            return
        values[name] = values[lists[0]].pop()


class _Extend(argparse._ExtendAction):
    """`--data a b --data c` gives [a, b, c], and remembers the order list flags were given in."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        order = getattr(namespace, "_list_order", [])
        namespace._list_order = [*order, self.dest]


def from_namespace(cls, ns: argparse.Namespace):
    """Build `cls` from parsed flags, filling in values from `--config` underneath them."""
    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "func", "sub", "_list_order")}
    values = {}
    if getattr(ns, "config", None):
        values.update(_coerce(cls, load_yaml(ns.config, cls)))
    known = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in given.items() if k in known})
    recover_positionals(cls, values, getattr(ns, "_list_order", []))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.metadata.get("positional") and values.get(f.name) in (None, [])]
    if missing:
        raise LMForgeError(f"missing required argument(s): {', '.join(m.upper() for m in missing)}")
    try:
        obj = cls(**values)
    except TypeError as e:
        raise LMForgeError(str(e)) from None
    check(obj)
    obj.__dict__["_explicit"] = set(values)  # what the user set (resume checks only those)
    return obj


def explicit_keys(obj) -> set[str] | None:
    """Names the user set by flag or --config; None when the object was built in Python."""
    return obj.__dict__.get("_explicit")


def to_yaml(obj) -> str:
    return yaml.safe_dump(dataclasses.asdict(obj), sort_keys=False, allow_unicode=True)


def save_yaml(obj, path: str | Path) -> None:
    atomic_write(path, to_yaml(obj))
