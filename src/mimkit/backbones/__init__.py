"""Backbone registry: ``BACKBONES[name]`` builds an encoder with the timm backbone interface.

Every backbone provides ``forward_features(x)``, ``forward_head(x, pre_logits=True)``,
``no_weight_decay()`` and ``group_matcher()``, so evaluation works with any of them.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from mimkit.backbones.cvt import CVT_PRESETS, ConvVisionTransformer
from mimkit.backbones.swin import SWIN_PRESETS, SwinTransformer
from mimkit.backbones.vit import VIT_PRESETS, VisionTransformer
from mimkit.errors import ConfigError
from mimkit.masking.kinds import as_kinds
from mimkit.schema import coerce

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(VisionTransformer, **preset) for name, preset in VIT_PRESETS.items()},
    **{name: functools.partial(ConvVisionTransformer, **preset) for name, preset in CVT_PRESETS.items()},
    **{name: functools.partial(SwinTransformer, **preset) for name, preset in SWIN_PRESETS.items()},
}


def _valid_keys(name: str) -> list[str]:
    builder = BACKBONES[name]
    target = builder.func if isinstance(builder, functools.partial) else builder
    return sorted(inspect.signature(target).parameters)


def backbone_defaults(name: str) -> dict[str, Any]:
    """Every setting of a registered backbone with the value it is built with when not given (its preset's)."""
    builder = BACKBONES[name]
    target = builder.func if isinstance(builder, functools.partial) else builder
    params = inspect.signature(target).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    defaults.update(getattr(builder, "keywords", {}))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


def backbones_taking(mask_kind: str | tuple[str, ...] | None) -> list[str]:
    """Names of the registered backbones whose ``mask_kinds`` include ``mask_kind`` (or one of a
    tuple of kinds, as a method that can hand several declares); all for None.
    """
    wanted = as_kinds(mask_kind)
    return sorted(name for name, b in BACKBONES.items()
                  if wanted is None or set(wanted) & set(getattr(getattr(b, "func", b), "mask_kinds", ())))


def check_backbone_cfg(cfg: dict[str, Any]) -> None:
    """Refuse an unknown backbone name or setting, listing what is valid.

    Args:
        cfg: ``{"name": ..., **settings}`` as written under ``backbone:`` in a config.

    """
    name = cfg.get("name")
    if name not in BACKBONES:
        raise ConfigError(f"backbone.name {name!r} is unknown; valid: {', '.join(sorted(BACKBONES))}")
    valid = _valid_keys(name)
    unknown = sorted(set(cfg) - set(valid) - {"name"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join('backbone.' + k for k in unknown)} for backbone {name}; "
            f"valid keys: name, {', '.join(valid)}"
        )
    hints = _type_hints(name)
    for key, value in cfg.items():
        if key in hints:
            _check_type(value, hints[key], f"backbone.{key}")


def _type_hints(name: str) -> dict[str, Any]:
    builder = BACKBONES[name]
    target = builder.func if isinstance(builder, functools.partial) else builder
    try:
        return typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except (NameError, TypeError):  # an annotation that cannot be resolved is not checked
        return {}


def _check_type(value: Any, typ: Any, key: str) -> None:
    """Refuse ``value`` unless it fits one member of ``typ`` (a union is tried member by member)."""
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    first: ConfigError | None = None
    for option in typing.get_args(typ) if union else (typ,):
        if option is type(None):
            if value is None:
                return
            continue
        if typing.get_origin(option) in (collections.abc.Sequence, tuple):
            option = list[typing.get_args(option)[0]]  # a YAML list of the same items
        try:
            coerce(value, option, key)
            return
        except ConfigError as err:
            first = first or err
    if first is not None:
        raise first


def check_backbone_input(cfg: dict[str, Any], img_size: int, key: str = "data.img_size") -> None:
    """Refuse an image size the backbone's patch size does not divide, naming the nearest valid ones.

    Args:
        cfg: ``{"name": ..., **settings}`` as written under ``backbone:``.
        img_size: ``data.img_size``, or the size of one of the method's views.
        key: The setting ``img_size`` comes from, for the message.

    """
    builder = BACKBONES[cfg["name"]]
    settings = {**getattr(builder, "keywords", {}), **cfg}
    patch = settings.get("patch_size")
    if patch and img_size % patch:
        lower, upper = img_size - img_size % patch, img_size - img_size % patch + patch
        raise ConfigError(
            f"{key} {img_size} is not divisible by backbone.patch_size {patch} ({cfg['name']}); "
            f"use a multiple of {patch} such as {', '.join(str(v) for v in (lower, upper) if v > 0)}"
        )


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone, overriding its preset with ``kwargs``.

    Example:
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1)

    """
    check_backbone_cfg({"name": name, **kwargs})
    return BACKBONES[name](**kwargs)


__all__ = [
    "BACKBONES", "ConvVisionTransformer", "SwinTransformer", "VisionTransformer", "backbone_defaults",
    "backbones_taking", "check_backbone_cfg", "check_backbone_input",
    "create_backbone",
]
