"""An algorithm's own settings from text (``--set KEY=VALUE``): one typed way to reach every scalar
field of every options dataclass (particle filtering's resampling, debate's rounds, ToT's
breadth...) without a command-line flag per field.

A value is parsed by the field's declared type (int, float, bool, str, or one of them or None);
the options' own ``__post_init__`` then checks it as it checks any value. Nested settings
(sampling, steps) have their own flags and are not reachable here; an unknown key, a key given
twice, or a value of the wrong type is a ``ConfigError`` that names it and lists what is known.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from apportion.errors import ConfigError

T = TypeVar("T")
_SCALARS = (int, float, bool, str)
_NONE = ("none", "null", "")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a mapping (keys with "-" read as "_"); each key once."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ConfigError(f"a setting is KEY=VALUE, got {item!r}")
        if key in out:
            raise ConfigError(f"setting {key!r} given twice")
        out[key] = value.strip()
    return out


def settable(options: Any) -> dict[str, tuple[type, ...]]:
    """The fields of ``options`` a setting can reach, with the types each accepts (``type(None)`` for None)."""
    hints = typing.get_type_hints(type(options))
    out: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(options):
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        if f.init and kinds and all(k in _SCALARS or k is type(None) for k in kinds):
            out[f.name] = tuple(kinds)
    return out


def configure(options: T, settings: Mapping[str, str], *, owner: str) -> T:
    """``options`` with ``settings`` applied (``owner`` names the algorithm in errors)."""
    if not settings:
        return options
    known = settable(options)
    unknown = [k for k in settings if k not in known]
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{owner} has no setting {', '.join(map(repr, unknown))}; its settings: {listed}")
    values = {k: _parse(owner, k, v, known[k]) for k, v in settings.items()}
    return dataclasses.replace(options, **values)  # type: ignore[type-var]


def _parse(owner: str, key: str, text: str, kinds: tuple[type, ...]) -> object:
    if type(None) in kinds and text.lower() in _NONE:
        return None
    if bool in kinds:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
    if str in kinds:
        return text
    wanted = " or ".join("none" if k is type(None) else k.__name__ for k in kinds)
    raise ConfigError(f"{owner} setting {key} must be {wanted}, got {text!r}")
