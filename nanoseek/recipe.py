"""Recipes: nested config dataclasses read from TOML and overridden with `--set section.key=value`.

Every command's configuration is a tree of dataclasses whose defaults are the tiny CPU recipe. A TOML
file (`recipes/*.toml`) overrides some fields; `--set` overrides more; the resolved tree is saved in the
run directory as `config.toml` so a run can always be reproduced. Unknown keys and badly typed values
are `UserError`s that name the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from nanoseek.errors import UserError

T = TypeVar("T")


def _parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value (1, 0.5, true, "s", [1, 2]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict, sets: list[str] | None) -> dict:
    """Apply `key.sub=value` strings to a nested dict (in place) and return it. One string may hold several
    assignments separated by commas (`parallel.dp=2,parallel.ep=2`); a comma inside a value such as a
    list (`[1, 2]`) is not followed by `key=` and stays part of the value."""
    items = [part for s in (sets or []) for part in _split_assignments(s)]
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=3e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return tree


def _split_assignments(text: str) -> list[str]:
    """"a=1,b.c=[1, 2],d={x = 1, y = 2}" -> its assignments: a comma splits only outside brackets and braces
    and only where `key=` follows."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0 and re.match(r"\s*[A-Za-z_][\w.]*=", text[i + 1:]):
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for arg in args[:-1]:                   # the first type that takes the value (int | dict: a table is a dict)
            try:
                return _coerce(value, arg, where)
            except UserError:
                pass
        return _coerce(value, args[-1], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a section (table), got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[]") for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly partial) nested dict; missing fields keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def merge(base: Any, data: dict, where: str = "config") -> Any:
    """Return a copy of dataclass instance `base` with the fields in `data` replaced (recursively)."""
    tree = to_dict(base)

    def deep_update(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep_update(dst[k], v)
            else:
                dst[k] = v

    deep_update(tree, data)
    return from_dict(type(base), tree, where)


def load_recipe(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None,
                base: T | None = None) -> T:
    """Defaults (or `base`) ← TOML file at `path` ← `--set` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe {path} not found; pass an existing TOML file, e.g. recipes/tiny.toml")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    apply_overrides(data, sets)
    return merge(base if base is not None else cls(), data)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def to_toml(obj: Any) -> str:
    """Serialise a dataclass tree to TOML (None values are omitted: TOML has no null)."""
    tree = to_dict(obj)
    lines: list[str] = []

    def emit(table: dict, prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        sections = {k: v for k, v in table.items() if k not in scalars}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        if scalars:
            lines.append("")
        for k, v in sections.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(tree, "")
    return "\n".join(lines).rstrip() + "\n"

