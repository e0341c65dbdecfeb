"""One typed builder for option dataclasses: training config, evaluation config, method options and
attack parameters all go through `build` (or `convert_values` for a partial mapping, or `check` for an
instance built in code).

The field annotations are the specification: `int`, `float`, `bool`, `str`, `X | None`, `list[X]`,
`tuple[X, ...]`, `dict[K, V]`, `Literal[...]` (a closed set of choices), `Any`, a class (isinstance),
and `Annotated[X, Bound(...)]` for a number with bounds (`PositiveInt`, `PositiveFloat`,
`NonNegativeFloat`, `Fraction`, `Seed`). A mapping with an unknown key, or a value of the wrong type,
raises a ValueError of one line that names the option and lists the valid keys, so a typo in a YAML
file, an `--opt` or an `--attack-param` stops before any work.

`bool` and `int` are kept apart (`true` is not an epoch count, `1` is not a switch); an `int` is
accepted where a `float` is expected and stored as a float. With `strings=True` (values typed on a
command line) text is read as the annotated type: "7" -> 7.0, "true"/"no" -> bool, "none" -> None,
"a,b" -> a list.

Written by hand rather than with pydantic: its lax mode takes 1 and "yes" for True and 1.0 for 1
where we refuse them, its strict mode refuses the strings a command line gives, its messages run to
several lines, and the core package would gain a dependency that only the workflow extra has today.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, Mapping

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_NONE = ("none", "null", "~", "")


@dataclass(frozen=True)
class Bound:
    """Bounds on a number (`Annotated[int, Bound(1)]`, `Bound(0, high=1)`); the value must also be
    finite."""
    low: float
    strict: bool = False
    high: float | None = None

    def holds(self, value: float) -> bool:
        above = value > self.low if self.strict else value >= self.low
        return math.isfinite(value) and above and (self.high is None or value <= self.high)

    def text(self) -> str:
        low = f"{'>' if self.strict else '>='} {_number(self.low)}"
        return low if self.high is None else f"{low} and <= {_number(self.high)}"


def _number(value: float) -> str:
    """A bound as a reader writes it: 2147483647 rather than 2.14748e+09."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


PositiveInt = Annotated[int, Bound(1)]
PositiveFloat = Annotated[float, Bound(0, strict=True)]
NonNegativeFloat = Annotated[float, Bound(0)]
Fraction = Annotated[float, Bound(0, high=1)]
# A seed of torch generators: >= 0 (as the workflow config asks) and within 31 bits, so that the
# seeds derived from it (per epoch, per probe) still fit torch's 64-bit generator seed.
Seed = Annotated[int, Bound(0, high=2**31 - 1)]


class _Mismatch(Exception):
    """A value that does not fit an annotation (turned into one ValueError by the caller)."""


# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (with Annotated extras) of a dataclass, in field order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def describe(tp: Any) -> str:
    """How an annotation reads in an error message: "int >= 1", "float or None", "one of ce, cw"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        bounds = [m.text() for m in args[1:] if isinstance(m, Bound)]
        return " ".join([describe(args[0])] + bounds)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping of key: value"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "anything"
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any, tp: type, strings: bool) -> Any:
    if strings and isinstance(value, str) and tp in (int, float, bool):
        text = value.strip().lower()
        if tp is bool:
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise _Mismatch
        try:
            return tp(text)
        except ValueError:
            raise _Mismatch from None
    if isinstance(value, bool):
        if tp is bool:
            return value
        raise _Mismatch  # a switch is not a number
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is int and isinstance(value, int):
        return value
    if tp in (bool, int, float, str) or isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise TypeError(f"gmr.options cannot check the annotation {tp!r}")


def _union(value: Any, args: tuple, strings: bool) -> Any:
    if type(None) in args and (value is None or strings and isinstance(value, str)
                               and value.strip().lower() in _NONE):
        return None
    for arm in args:
        if arm is type(None):
            continue
        try:
            return _convert(value, arm, strings)
        except _Mismatch:
            pass
    raise _Mismatch


def _convert(value: Any, tp: Any, strings: bool) -> Any:
    """`value` as the annotation `tp` asks for; _Mismatch when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        out = _convert(value, args[0], strings)
        if not all(m.holds(out) for m in args[1:] if isinstance(m, Bound)):
            raise _Mismatch
        return out
    if origin in (typing.Union, types.UnionType):
        return _union(value, args, strings)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):  # exact: True is not 1
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if strings and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        items = [_convert(v, args[0], strings) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_t, value_t = args if args else (Any, Any)
        return {_convert(k, key_t, strings): _convert(v, value_t, strings) for k, v in value.items()}
    return _scalar(value, tp, strings)


def convert(value: Any, tp: Any, label: str, strings: bool = False) -> Any:
    """`value` converted to the annotation `tp`; ValueError "<label> must be <type>, got <value>"."""
    try:
        return _convert(value, tp, strings)
    except _Mismatch:
        raise ValueError(f"{label} must be {describe(tp)}, got {value!r}") from None


def convert_values(cls: type, values: Mapping[str, Any], *, kind: str = "option", owner: str = "",
                   scope: str = "", strings: bool = False) -> dict[str, Any]:
    """The entries of `values` checked and converted against the fields of dataclass `cls`.

    `kind`, `owner` and `scope` name them in messages: "unknown parameter 'stepz' of attack pgd; valid:
    steps, ..." and "parameter pgd.steps must be int >= 1, got 0".
    """
    types_ = field_types(cls)
    unknown = [k for k in values if k not in types_]
    if unknown:
        of = f" of {owner} {scope}" if scope else ""
        raise ValueError(f"unknown {kind} {', '.join(repr(k) for k in unknown)}{of}; "
                         f"valid: {', '.join(types_) or '(none)'}")
    prefix = f"{kind} {scope}." if scope else f"{kind} "
    return {k: convert(v, types_[k], f"{prefix}{k}", strings) for k, v in values.items()}


def build(cls: type, values: Mapping[str, Any], *, kind: str = "option", owner: str = "", scope: str = "",
          strings: bool = False):
    """An instance of dataclass `cls` from `values` (missing fields take their defaults)."""
    converted = convert_values(cls, values, kind=kind, owner=owner, scope=scope, strings=strings)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in converted
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        of = f" of {owner} {scope}" if scope else ""
        raise ValueError(f"missing {kind} {', '.join(missing)}{of}")
    return cls(**converted)


def check(obj: Any, *, kind: str = "option", owner: str = "", scope: str = "") -> None:
    """Check the fields of a dataclass instance built in code against its annotations."""
    convert_values(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)},
                   kind=kind, owner=owner, scope=scope)
