"""Reading user files and mapping them onto typed dataclasses, safely.

Every config (model, training, dataset, evaluation data) goes through these functions, so each
hostile input fails the same way: a `UserError` naming the file and field, never a traceback.

- `read_text`: a user-named file as text, with a size cap; a missing, unreadable or non-UTF-8
  file raises a UserError naming it.
- `load_structured`: a YAML or JSON file (or text) parsed with the size capped, nesting depth
  capped (no RecursionError) and YAML aliases expanded to at most `MAX_NODES` values (no
  "billion laughs"); parse errors are one line with file:line:column.
- `fields_from_dict`: a mapping checked against a dataclass's field annotations (str, int,
  float, bool, Literal, unions, lists, tuples, dicts, nested dataclasses); unknown keys and
  wrong types name the field.
- `short`: a bounded repr for echoing user values in messages.
"""

from __future__ import annotations

import dataclasses
import json
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from flamingo.errors import UserError

MAX_CONFIG_BYTES = 4 << 20  # config files are a few KiB; anything this large is a mistake
MAX_DEPTH = 64  # nesting of mappings/lists in a config
MAX_NODES = 1_000_000  # values after expanding YAML aliases
MAX_ECHO = 160  # characters of a user value quoted in a message
MAX_SEED = 2**32 - 1  # accepted by every RNG we seed (random, numpy, torch)

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def short(value: Any) -> str:
    """repr(value), cut to at most MAX_ECHO characters (messages never echo unbounded values)."""
    try:
        text = _repr.repr(value)
    except RecursionError:  # a self-referencing structure
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 3] + "..."


def field_checker(what: str, error: type[UserError] = UserError) -> Callable[[bool, str, str, Any], None]:
    """A `check(ok, name, expected, got)` for config validators: raises
    `error("{what} field {name}: expected {expected}, got {short(got)}")` when not ok."""
    def check(ok: bool, name: str, expected: str, got: Any) -> None:
        if not ok:
            raise error(f"{what} field {name}: expected {expected}, got {short(got)}")
    return check


# ------------------------------------------------------------------------------------ files
def read_text(path: str | Path, what: str = "file", error: type[UserError] = UserError,
              max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a user-named file; every way it can fail is an `error` naming it."""
    path = Path(path)
    try:
        if not path.exists():
            raise error(f"{what} {path} does not exist")
        if path.is_dir():
            raise error(f"{what} {path} is a directory, expected a file")
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {path} is {size} bytes; expected at most {max_bytes}")
        data = path.read_bytes()
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


class _CheckedLoader(yaml.SafeLoader):
    """A SafeLoader whose documents are checked for depth and expanded size before construction."""


def _check_tree(node: yaml.Node, where: str, error: type[UserError]) -> None:
    """Refuse trees nested deeper than MAX_DEPTH or holding more than MAX_NODES values once the
    aliases are expanded (an alias is a reference to an earlier node: counted once per use)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if id(node) in sizes:
            return sizes[id(node)]
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if total > MAX_NODES:
            raise error(f"{where}: more than {MAX_NODES} values once its YAML aliases are expanded")
        sizes[id(node)] = total
        return total

    size(node, 0)


def safe_yaml(text: str, where: str, error: type[UserError] = UserError) -> Any:
    """yaml.safe_load, refusing (with `error`) documents nested deeper than MAX_DEPTH or larger
    than MAX_NODES values once aliases are expanded; syntax errors stay yaml.YAMLError."""
    if not _bracket_depth_ok(text, yaml_syntax=True):
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
    loader = _CheckedLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise error(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _check_tree(node, where, error)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_error(err: yaml.YAMLError, where: str, error: type[UserError]) -> UserError:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or type(err).__name__
    position = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return error(f"{where}{position}: invalid YAML: {' '.join(str(problem).split())}")


def _bracket_depth_ok(text: str, yaml_syntax: bool) -> bool:
    """Whether the [ ] / { } nesting of JSON or YAML flow text stays within MAX_DEPTH (brackets in
    quoted strings and YAML comments do not count). A cheap linear guard: the parsers take
    quadratic time, or recurse without bound, on deeply nested input."""
    depth = 0
    quote = None
    escaped = False
    previous = "\n"
    for char in text:
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\" and quote == '"':
                escaped = True
            elif char == quote:
                quote = None
        elif yaml_syntax and char == "#" and previous in " \t\n":
            quote = "\n"  # a comment runs to the end of the line
        elif char == '"' or (yaml_syntax and char == "'"):
            quote = char
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif char in "]}":
            depth -= 1
        previous = char
    return True


def parse_structured(text: str, where: str, json_format: bool = False, error: type[UserError] = UserError) -> Any:
    """Parse the YAML (or, with json_format, JSON) text of a config; errors are `error`s naming
    `where` (with :line:column for syntax errors)."""
    if json_format:
        if not _bracket_depth_ok(text, yaml_syntax=False):
            raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise error(f"{where}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    try:
        return safe_yaml(text, where, error)
    except yaml.YAMLError as err:
        raise _yaml_error(err, where, error) from None


def load_structured(path: str | Path, what: str = "config file", error: type[UserError] = UserError,
                    max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """A YAML or JSON (by the .json suffix) file, read and parsed safely (see module docstring)."""
    path = Path(path)
    return parse_structured(read_text(path, what, error, max_bytes), f"{what} {path}",
                            json_format=path.suffix == ".json", error=error)


# --------------------------------------------------------------------------- typed mapping
def _label(source: str, field: str) -> str:
    return f"{source}: {field}" if field else source


def _child(field: str, key: Any) -> str:
    return f"{field}.{key}" if field else str(key)


def fields_from_dict(cls: type, data: Any, source: str, field: str = "", skip: frozenset[str] | set[str] = frozenset(),
                     error: type[UserError] = UserError) -> dict[str, Any]:
    """The keyword arguments of `cls(...)` from a mapping, each value checked (and where lossless
    converted: 3.0 -> 3 for an int, 3 -> 3.0 for a float, a list -> a tuple) against its
    annotation. Nested dataclass fields are built recursively. Errors are `error`s saying
    `SOURCE: FIELD.PATH: expected ..., got ...`."""
    if not isinstance(data, dict):
        raise error(f"{_label(source, field)}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    unknown = sorted(set(map(str, data)) - set(names))
    if unknown:
        raise error(f"{_label(source, field)}: unknown field(s) {short(unknown)}; expected some of {sorted(names)}")
    return {key: coerce(value, hints[key], source, _child(field, key), error) for key, value in data.items()}


def check_fields(obj: Any, source: str, field: str = "", error: type[UserError] = UserError) -> None:
    """Check every field of a dataclass instance against its annotation (for instances built in
    code rather than read from a file: the values must already have the right types)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, source, _child(field, f.name), error)
        else:
            coerce(value, hints[f.name], source, _child(field, f.name), error)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             Path: "a path", Any: "any value"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(map(repr, args)) if len(args) <= 2 else "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, source: str, field: str = "", error: type[UserError] = UserError) -> Any:
    """`value` checked against the annotation `tp` (see fields_from_dict)."""
    def fail() -> UserError:
        return error(f"{_label(source, field)}: expected {_type_name(tp)}, got {short(value)}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return tp(**fields_from_dict(tp, {} if value is None else value, source, field, error=error))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, source, field, error)
            except UserError:
                continue
        raise fail()
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise fail()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; a number is what is meant
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise fail()
        return Path(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise error(f"{_label(source, field)}: expected {len(args)} values, got {short(value)}")
            return tuple(coerce(v, a, source, _child(field, i), error) for i, (v, a) in enumerate(zip(value, args)))
        items = [coerce(v, args[0], source, _child(field, i), error) for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        if not args:
            return dict(value)
        return {coerce(k, args[0], source, _child(field, "key"), error):
                coerce(v, args[1], source, _child(field, k), error) for k, v in value.items()}
    return value
