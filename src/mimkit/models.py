"""The composition root: a config is loaded, its backbone and method checked against each other, and built.

Every cross-check between the parts (method against backbone, the batch against the method's
mixing sets, each view's size against both) is made here, once; the trainer, the CLI, ``resources``
and the loader call these functions rather than repeating them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from mimkit.backbones import check_backbone_cfg, check_backbone_input, create_backbone
from mimkit.config import (
    DataConfig,
    PretrainConfig,
    load_yaml,
    merge_layer,
    merge_trees,
    on_other_data,
    parse_overrides,
    resolve_config_path,
    validate,
)
from mimkit.data.batch import whole_sets
from mimkit.errors import ConfigError
from mimkit.methods import METHODS, PretrainMethod, check_method_cfg, create_method
from mimkit.methods.helpers import fill_helper_settings
from mimkit.schema import coerce, from_dict

log = logging.getLogger(__name__)

#: ``data`` settings that became settings of a method's view (run folders from before still hold them).
MOVED_TO_VIEWS = {"crop_scale": "scale", "hflip": "hflip"}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides; validated, the method typed.

    A config pointed at other data than its own (``data.name`` or ``data.root`` overridden) runs in
    a folder named after both, ``<run_dir>-<data>`` (:func:`data_tag`), unless ``run_dir`` is given
    too: the same config on two folders of images makes two runs, not a refusal or a mix. A
    normalisation the config stores (a run's ``config.yaml``) is dropped then, to be computed from
    the new data (:func:`~mimkit.config.on_other_data`).

    Args:
        path: A YAML file, the name of a packaged config (``mae_vits_rgb64``), or None for the defaults.
        overrides: ``key=value`` strings with dotted keys.

    Returns:
        The resolved :class:`~mimkit.config.PretrainConfig`; ``cfg.method`` is the method's ``Config``.

    """
    layers = [load_yaml(resolve_config_path(path))] if path is not None else []
    cfg = compose_config(layers, overrides)
    own = {**asdict(DataConfig()), **(layers[0].get("data") or {} if layers else {})}
    if (cfg.data.name, cfg.data.root) != (own["name"], own["root"]):
        # A run's config.yaml reused on other data: its stored normalisation is not this data's.
        cfg.data = on_other_data(cfg.data, own["name"], own["root"], overrides)
        if "run_dir" not in parse_overrides(overrides or []):
            cfg.run_dir = f"{cfg.run_dir.rstrip('/')}-{data_tag(cfg.data)}"
    return cfg


def data_tag(data: DataConfig) -> str:
    """A folder-name-safe name for the data of ``data``: its root folder's name, else the dataset's."""
    name = Path(data.root).resolve().name if data.root else data.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-") or data.name


def compose_config(layers: list[dict[str, Any]], overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then each mapping of ``layers`` merged over the last, then ``key=value`` overrides; validated.

    A layer replaces a whole ``method`` or ``backbone`` section when it names another ``name``: the
    settings of one method mean nothing to another. Overrides are merged key by key. The method's
    settings are parsed here, once, into its typed ``Config``.
    """
    tree: dict[str, Any] = asdict(PretrainConfig())
    for layer in layers:
        tree = _move_view_keys(merge_layer(tree, layer))
    tree = _move_view_keys(merge_trees(tree, parse_overrides(overrides or [])))
    cfg = from_dict(PretrainConfig, tree)
    validate(cfg)
    cfg.method = check_method_cfg(cfg.method)  # parsed here, once; everything after reads the typed Config
    cfg.method = fill_helper_settings(cfg.method)  # a helper run's settings recorded with the method's
    check_model_config(cfg)
    return cfg


def _default_views(method_name: Any) -> list[dict[str, Any]]:
    """The views a registered method declares by default (one plain view for an unknown name)."""
    cls = METHODS.get(method_name) if isinstance(method_name, str) else None
    return list(getattr(cls.Config(), "views", [{}])) if cls is not None else [{}]


def _move_view_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """Read ``data.crop_scale`` / ``data.hflip`` as the crop and flip of the method's single view.

    They were data settings before methods declared their views (``method.views``). A method with
    several kinds of view has no single crop for them to mean, so there they are refused.
    """
    data = tree.get("data")
    if not isinstance(data, dict) or not set(MOVED_TO_VIEWS) & set(data):
        return tree
    data = dict(data)
    moved = {k: data.pop(k) for k in MOVED_TO_VIEWS if k in data}
    method = dict(tree.get("method") or {})
    views = method.get("views", _default_views(method.get("name")))
    names = ", ".join(f"data.{k}" for k in moved)
    if not (isinstance(views, list) and len(views) == 1 and isinstance(views[0], dict)
            and views[0].get("count", 1) == 1):
        raise ConfigError(f"{names}: the crop and flip of a training image are set per view in method.views "
                          f"(this method declares {views!r}); set scale / hflip there")
    view = dict(views[0])
    if "crop_scale" in moved:
        view["scale"] = moved["crop_scale"]
    if "hflip" in moved:
        view["hflip"] = 0.5 if coerce(moved["hflip"], bool, "data.hflip") else 0.0
    method["views"] = [view]
    log.info("%s read as method.views[0] %s (where a view's crop and flip are set now)", names,
             ", ".join(f"{MOVED_TO_VIEWS[k]}" for k in moved))
    return {**tree, "data": data, "method": method}


def check_model_config(cfg: PretrainConfig) -> None:
    """Check ``backbone:`` and ``method:`` against their registries, and the image size against both.

    Raises:
        ConfigError: An unknown name or setting (the valid ones listed), or an image size the
            backbone's patch does not divide.

    """
    check_backbone_cfg(cfg.backbone)
    method = check_method_cfg(cfg.method)
    check_backbone_input(cfg.backbone, cfg.data.img_size)
    for i, view in enumerate(method.view_specs):
        if view.size:  # a view of its own size (DINO's local crops)
            check_backbone_input(cfg.backbone, view.size, f"method.views[{i}].size")


def check_method_input(cfg: PretrainConfig, method: PretrainMethod, batch: int | None = None) -> None:
    """Check the training input against the built method: the batch holds whole mixing sets, and the
    method can mask every view at its size.

    Args:
        cfg: The config ``method`` was built from.
        method: The built method (the sets and the sizes it can mask depend on its encoder).
        batch: The batch to check (default ``optim.batch_size``).

    Raises:
        ConfigError: A batch that is not a multiple of ``method.batch_multiple`` (the nearest valid
            ones named), or a view size the method cannot mask.

    """
    batch = cfg.optim.batch_size if batch is None else batch
    multiple = method.batch_multiple
    if whole_sets(batch, multiple) != batch:
        lower = whole_sets(batch, multiple)
        raise ConfigError(
            f"optim.batch_size {batch} is not a multiple of {multiple}: method {cfg.method.name} mixes images "
            f"in sets of {multiple}; use {', '.join(str(v) for v in (lower, lower + multiple) if v > 0)}")
    for view in method.views:
        side = view.resolved_size(cfg.data.img_size)
        method.check_image_size(side, side)


def backbone_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """The settings ``cfg``'s backbone is built with: ``backbone:``, image size and channels from ``data:``."""
    settings = {k: v for k, v in cfg.backbone.items() if k != "name"}
    settings.setdefault("img_size", cfg.data.img_size)
    settings.setdefault("in_chans", cfg.data.channels)
    return settings


def encoder_from_config(cfg: PretrainConfig) -> nn.Module:
    """The backbone of ``cfg``; image size and channels default to the data section's."""
    return create_backbone(cfg.backbone["name"], **backbone_settings(cfg))


def eval_prefix(cfg: PretrainConfig) -> str:
    """Where the evaluated module's weights sit in a checkpoint of ``cfg``'s method, e.g. ``encoder.``."""
    return f"{METHODS[cfg.method.name].eval_module_name}."


def method_from_config(cfg: PretrainConfig) -> PretrainMethod:
    """The pre-training method of ``cfg`` around a fresh encoder."""
    return create_method(cfg.method, encoder_from_config(cfg))


__all__ = ["backbone_settings", "check_method_input", "check_model_config", "compose_config", "data_tag",
           "encoder_from_config", "eval_prefix", "load_config", "method_from_config"]
