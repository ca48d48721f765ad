"""The config schema machinery, a leaf module: YAML 1.2 reading, typed coercion, range-check helpers.

It imports nothing of mimkit but :mod:`mimkit.errors`, so that the registries (backbones, methods)
can check their own settings without importing the config that names them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from mimkit.errors import ConfigError


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans and floats.

    YAML 1.1 reads ``no``, ``off`` and ``yes`` as booleans (so ``data.cache=no`` arrived as False)
    and ``1e-3`` as a string; YAML 1.2, and every user, reads them as a word and a number.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse ``text`` as YAML 1.2 (``no`` is a word, ``1e-3`` a number), safely."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against a field type, converting where the YAML reading is unambiguous.

    Raises:
        ConfigError: A value of another type, named by ``key``.

    """
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, str):
        try:  # "nan" or "inf" written without YAML's leading dot
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if typ is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys.

    Args:
        cls: A dataclass type.
        data: Values to set; missing keys keep their defaults.
        prefix: Dotted path used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: On an unknown key (the valid keys are listed) or a value of the wrong type.

    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join(sorted(types))}"
        )
    kwargs = {}
    for key, value in data.items():
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, typ, prefix + key)
    return cls(**kwargs)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool): the test for numbers read from files."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Refuse ``value`` of setting ``key`` unless ``ok``, saying what ``rule`` it must follow."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def check_positive(section: str, **values: float | Sequence[float]) -> None:
    """Refuse a zero or negative size (a depth, a width, a head count) as ``section.key``.

    Raises:
        ConfigError: Naming the first setting (or list entry) that is not positive.

    """
    for key, value in values.items():
        items = list(value) if isinstance(value, list | tuple) else [value]
        require(bool(items) and all(v > 0 for v in items), f"{section}.{key}",
                 "positive" if not isinstance(value, list | tuple) else "a non-empty list of positive values", value)


def check_heads(dim_key: str, dim: int, heads_key: str, heads: int) -> None:
    """Refuse a head count that does not divide the token width, naming the counts that would."""
    if dim % heads:
        valid = [h for h in range(1, min(dim, 16) + 1) if dim % h == 0]
        raise ConfigError(f"{heads_key} {heads} does not divide {dim_key} {dim}; valid head counts include "
                          f"{', '.join(map(str, valid))}")


__all__ = ["check_heads", "check_positive", "from_dict", "is_number", "require", "yaml_load"]
