"""One checker for loosely typed settings: the fields of a dataclass given as JSON, YAML,
papermill parameters or command-line text.

Used by :class:`egeunet.engine.TrainConfig` (and so by study files and the 03_train
notebook, which build one), by ``egeunet train``'s options and by the study runner's check
of notebook parameters. Lists count as tuples, ints as floats, bools as nothing but
bools; other classes are checked where they are built.
"""

from __future__ import annotations

import dataclasses
import types
import typing

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


def field_types(cls: type) -> dict[str, typing.Any]:
    """Resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def field_default(cls: type, name: str) -> typing.Any:
    """The default of the dataclass field ``name`` (calling its factory)."""
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            return item.default_factory()
    raise KeyError(name)


def has_type(value: typing.Any, annotation: typing.Any) -> bool:
    """Whether a loosely typed ``value`` fits ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, a) for a in typing.get_args(annotation))
    if origin in (tuple, list):
        items = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            return False
        if origin is list or (len(items) == 2 and items[1] is Ellipsis):
            return all(has_type(v, items[0]) for v in value) if items else True
        return len(value) == len(items) and all(map(has_type, value, items))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if isinstance(annotation, type) and issubclass(annotation, str):  # str and string enums
        return isinstance(value, str)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        numbers = int if annotation is int else int | float
        return isinstance(value, numbers) and not isinstance(value, bool)
    return True


def type_name(annotation: typing.Any) -> str:
    """``int | None`` -> "int or null", ``tuple[int, ...]`` -> "a list of int values"."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in typing.get_args(annotation)]
        return " or ".join("null" if n == "NoneType" else n for n in names)
    if origin in (tuple, list):
        items = typing.get_args(annotation)
        count = "" if origin is list or items[-1] is Ellipsis else f"{len(items)} "
        return f"a list of {count}{type_name(items[0])} values"
    if isinstance(annotation, type) and issubclass(annotation, str):
        return "str"
    return getattr(annotation, "__name__", str(annotation))


def check_fields(cls: type, values: dict[str, typing.Any], prefix: str = "") -> None:
    """ValueError naming the field (``prefix`` + name) whose value in ``values`` does not
    fit its annotation on the dataclass ``cls``."""
    annotations = field_types(cls)
    for name, value in values.items():
        if not has_type(value, annotations[name]):
            raise ValueError(
                f"{prefix}{name}: expected {type_name(annotations[name])}, got {value!r}"
            )


def parse_text(text: str, annotation: typing.Any, name: str) -> typing.Any:
    """Command-line ``text`` as a value of type ``annotation``; ValueError naming
    ``--name``. Lists are comma-separated; none/null is None where allowed."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if text.strip().lower() in _NONE:
            return None
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (tuple, list):
        return tuple(
            parse_text(part.strip(), args[0], name) for part in text.split(",") if part.strip()
        )
    try:
        if annotation is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError
        if annotation in (int, float):
            return annotation(text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[annotation]
        raise ValueError(f"--{name}: expected {kind}, got {text!r}") from None
    return text


PARAMETER_TYPES: dict[str, typing.Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "dict": dict,
    "list[str]": list[str],
    "list[int]": list[int],
}
"""Annotations of the notebook parameter types papermill reports (``inferred_type_name``)."""
