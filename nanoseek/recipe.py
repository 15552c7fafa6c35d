"""Recipes: nested config dataclasses read from TOML and overridden with `--set section.key=value`.

Every command's configuration is a tree of dataclasses whose defaults are the tiny CPU recipe. A TOML
file (`recipes/*.toml`) overrides some fields; `--set` overrides more; the resolved tree is saved in the
run directory as `config.toml` so a run can always be reproduced. Unknown keys and badly typed values
are `UserError`s that name the key, never silently ignored.

A config class may also accept other names for some of its knobs (`ALIASES`, e.g. TRL's `num_generations`
for `rl.group_size`): an alias is rewritten to its canonical key as the recipe is read, so each knob keeps
one definition and `config.toml` holds canonical keys only.
"""

from __future__ import annotations

import dataclasses
import math
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
    except ValueError:                          # an integer past Python's 4,300-digit conversion limit
        raise UserError(f"--set value {_show(text)} is not a usable number; use at most {_MAX_DIGITS} digits") from None


_MAX_DIGITS = 4300


def _show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: error messages stay one readable line (and repr of an
    integer past 4,300 digits would itself raise)."""
    try:
        text = repr(value)
    except ValueError:
        return "<an integer of more than 4300 digits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Range:
    """A number's allowed interval, declared next to a config's fields in its `CHECKS` class attribute
    (`CHECKS: ClassVar[dict] = {"lr": Range(0)}`) and checked by `from_dict` / `validate`. `open_hi`
    excludes the upper bound (Adam's betas live in [0, 1))."""
    lo: float | None = None
    hi: float | None = None
    open_hi: bool = False

    def error(self, value: Any) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        if (self.lo is not None and value < self.lo) or (self.hi is not None and (
                value >= self.hi if self.open_hi else value > self.hi)):
            if self.hi is None:
                return f"must be >= {self.lo}"
            return f"must be in [{self.lo}, {self.hi}{')' if self.open_hi else ']'}"
        return None


@dataclasses.dataclass(frozen=True)
class Alias:
    """Another name for a knob, declared in a config class's `ALIASES` class attribute ({name: Alias}) and
    resolved by `resolve_aliases` before the recipe is merged. `to`: the canonical key's dotted path below that
    class ("rl.group_size"). `values`: the alias's values mapped to the canonical ones when the two vocabularies
    differ (TRL's loss_type "dr_grpo" is rl.aggregation "drgrpo"); None = the value as is. `hint`: appended to
    the error for a value outside `values` (why a value that looks alike is not offered)."""
    to: str
    values: dict | None = None
    hint: str = ""

    def canonical(self, name: str, value: Any) -> Any:
        if self.values is None:
            return value
        try:
            return self.values[value]
        except (KeyError, TypeError):           # TypeError: an unhashable value (a list)
            choices = ", ".join(_show(v) for v in self.values)
            raise UserError(f"{name} = {_show(value)} (another name for {self.to}): choose one of {choices}"
                            + (f"; {self.hint}" if self.hint else "")) from None


def resolve_aliases(cls: type, data: dict, where: str = "config") -> dict:
    """A copy of the (partial) recipe tree `data` for dataclass `cls` with every alias of `cls.ALIASES` (and of
    the nested config classes) replaced by its canonical key. An alias and its canonical key (or two aliases of
    one key) set together in `data` is a UserError: the recipe would say two things about one knob."""
    out = {k: v for k, v in data.items() if k not in getattr(cls, "ALIASES", {})}
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for key, value in out.items():              # nested sections may declare aliases of their own
        if isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key)):
            out[key] = resolve_aliases(hints[key], value, f"{where}.{key}" if where != "config" else key)
    seen: dict[str, str] = {}
    for name, alias in getattr(cls, "ALIASES", {}).items():
        if name not in data:
            continue
        shown = f"{where}.{name}" if where != "config" else name
        *path, last = alias.to.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"{shown}: {p!r} is a value in this recipe, not a section")
        if last in node:
            other = seen.get(alias.to, alias.to)
            raise UserError(f"{shown} and {other} are the same knob ({shown} is another name for {alias.to}); "
                            "set only one of them")
        node[last] = alias.canonical(shown, data[name])
        seen[alias.to] = shown
    return out


def validate(obj: Any, where: str = "config") -> None:
    """Run the `CHECKS` ranges of dataclass `obj` (not recursive: `from_dict` calls it at every level).
    Every float of a recipe is also finite and every integer >= 0 (checked by the coercion)."""
    for name, rule in getattr(type(obj), "CHECKS", {}).items():
        value = getattr(obj, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if (msg := rule.error(v)) is not None:
                key = f"{where}.{name}" if where != "config" else name
                raise UserError(f"{key} = {_show(value)} {msg}")


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
    """"a=1,b.c=[1, 2],d={x = 1, y = 2}" -> its assignments: a comma splits only outside quotes, brackets and
    braces and only where `key=` follows."""
    parts, depth, start, quote, escaped = [], 0, 0, None, False
    for i, ch in enumerate(text):
        if quote:                               # inside "..." or '...': nothing splits (--init "a,v=2")
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
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
            raise UserError(f"{where}: expected a section (table), got {_show(value)}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[]") for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {_show(value)}")
    if tp is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value):
            raise UserError(f"{where}: expected an integer, got {_show(value)}")
        if value < 0:                           # counts, sizes, seeds, threads, intervals: none is negative
            raise UserError(f"{where}: expected an integer >= 0, got {_show(value)}")
        if abs(value) >= 1 << 63:
            raise UserError(f"{where}: {_show(value)} is too large; use a value below 2**63")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:                   # an int past float's range
            value = math.inf
        if not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {_show(value)}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise UserError(f"{where}: expected a string, got {_show(value)}")
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
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    validate(obj, where)
    return obj


def merge(base: Any, data: dict, where: str = "config") -> Any:
    """Return a copy of dataclass instance `base` with the fields in `data` replaced (recursively); aliases in
    `data` name their canonical fields."""
    tree = to_dict(base)
    _deep_update(tree, resolve_aliases(type(base), data, where))
    return from_dict(type(base), tree, where)


def _deep_update(dst: dict, src: dict) -> None:
    """Merge `src` into `dst` table by table. A model table that names its preset starts over from it: `[model]
    preset = "small"` over a recipe's tiny model with `num_hidden_layers = 3` is the small model, not a 3-layer one."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and "preset" not in v:
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_recipe(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None,
                base: T | None = None) -> T:
    """Defaults (or `base`) ← TOML file at `path` ← `--set` overrides. Aliases (`ALIASES`) are resolved in
    the file and in the overrides separately, so `--set` overrides the file's value under either name."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"recipe {path} not found; pass an existing TOML file, e.g. recipes/tiny.toml")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"recipe {path} is not valid TOML: {e}") from None
        except ValueError:                      # an integer past Python's 4,300-digit conversion limit
            raise UserError(f"recipe {path} holds a number of more than {_MAX_DIGITS} digits; fix it") from None
    data = resolve_aliases(cls, data)
    sets_tree = resolve_aliases(cls, apply_overrides({}, sets))
    _deep_update(data, sets_tree)
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

