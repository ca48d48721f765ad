"""Method registry: ``METHODS[name](encoder, METHODS[name].Config(...))`` builds a method."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from mimkit.errors import ConfigError
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.beit import BEiT
from mimkit.methods.cvt_mae import CvTMAE
from mimkit.methods.data2vec import Data2Vec
from mimkit.methods.data2vec2 import Data2Vec2
from mimkit.methods.dino import DINO
from mimkit.methods.finetune import FineTune
from mimkit.methods.ibot import IBOT
from mimkit.methods.mae import MAE
from mimkit.methods.mixedae import MixedAE
from mimkit.methods.mixmae import MixMAE
from mimkit.methods.vqvae import VQTokenizer
from mimkit.schema import from_dict

METHODS: dict[str, type[PretrainMethod]] = {
    "mae": MAE, "cvt_mae": CvTMAE, "dino": DINO, "ibot": IBOT, "data2vec": Data2Vec, "data2vec2": Data2Vec2,
    "mixmae": MixMAE, "mixedae": MixedAE, "beit": BEiT,
    "vqvae": VQTokenizer,  # a visual tokenizer (BEiT's targets), trained as a run of its own
    "finetune": FineTune,
}


def check_method_cfg(cfg: dict[str, Any] | MethodConfig) -> MethodConfig:
    """The method's typed ``Config`` of ``{"name": ..., **settings}``.

    A ``Config`` built by hand (``DINO.Config(out_dim=64)``) gets its registry name filled in; one
    whose ``name`` is another method's is refused.

    Raises:
        ConfigError: An unknown name or setting (the valid ones listed), a value out of range, or a
            ``Config`` of one method named as another.

    """
    if isinstance(cfg, MethodConfig):
        owners = [n for n, m in METHODS.items() if type(cfg) is m.Config]
        if not owners:
            raise ConfigError(f"{type(cfg).__qualname__} is no registered method's Config; valid methods: "
                              f"{', '.join(sorted(METHODS))}")
        if not cfg.name:
            return dataclasses.replace(cfg, name=owners[0])
        if cfg.name not in owners:
            raise ConfigError(f"method.name {cfg.name!r} does not match its settings, a {type(cfg).__qualname__} "
                              f"(method {owners[0]})")
        return cfg
    name = cfg.get("name")
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is unknown; valid: {', '.join(sorted(METHODS))}")
    try:
        return from_dict(METHODS[name].Config, dict(cfg), prefix="method.")
    except ConfigError as err:
        if "valid keys" in str(err):
            raise
        valid = [f.name for f in dataclasses.fields(METHODS[name].Config)]
        raise ConfigError(f"{err} (method {name} settings: {', '.join(valid)})") from None


def create_method(cfg: dict[str, Any] | MethodConfig, encoder: nn.Module) -> PretrainMethod:
    """Build the method named in ``cfg`` around ``encoder``."""
    settings = check_method_cfg(cfg)
    return METHODS[settings.name](encoder, settings)


__all__ = ["METHODS", "MethodConfig", "PretrainMethod", "PretrainOutput", "check_method_cfg", "create_method"]
