"""Build the encoder and method a config describes (shared by training and evaluation)."""

from __future__ import annotations

from typing import Any

from torch import nn

from mimkit.backbones import check_backbone_cfg, check_backbone_input, create_backbone
from mimkit.config import PretrainConfig
from mimkit.methods import METHODS, PretrainMethod, check_method_cfg, create_method


def check_model_config(cfg: PretrainConfig) -> None:
    """Check ``backbone:`` and ``method:`` against their registries, and the image size against both.

    Raises:
        ConfigError: An unknown name or setting (the valid ones listed), or an image size the
            backbone's patch does not divide.

    """
    check_backbone_cfg(cfg.backbone)
    method = check_method_cfg(cfg.method)
    check_backbone_input(cfg.backbone, cfg.data.img_size)
    for i, view in enumerate(getattr(method, "view_specs", [])):
        if view.size:  # a view of its own size (DINO's local crops)
            check_backbone_input(cfg.backbone, view.size, f"method.views[{i}].size")


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
    return f"{METHODS[cfg.method['name']].eval_module_name}."


def method_from_config(cfg: PretrainConfig) -> PretrainMethod:
    """The pre-training method of ``cfg`` around a fresh encoder."""
    return create_method(cfg.method, encoder_from_config(cfg))
