"""Method registry: ``METHODS[name](encoder, METHODS[name].Config(...))`` builds a method."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from mimkit.errors import ConfigError
from mimkit.methods.base import PretrainMethod, PretrainOutput
from mimkit.methods.cvt_mae import CvTMAE
from mimkit.methods.dino import DINO
from mimkit.methods.finetune import FineTune
from mimkit.methods.ibot import IBOT
from mimkit.methods.mae import MAE
from mimkit.methods.mixedae import MixedAE
from mimkit.methods.mixmae import MixMAE
from mimkit.schema import from_dict

METHODS: dict[str, type[PretrainMethod]] = {
    "mae": MAE, "cvt_mae": CvTMAE, "dino": DINO, "ibot": IBOT, "mixmae": MixMAE, "mixedae": MixedAE,
    "finetune": FineTune,
}


def check_method_cfg(cfg: dict[str, Any]) -> Any:
    """Validate ``{"name": ..., **settings}`` and return the method's ``Config`` instance."""
    name = cfg.get("name")
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is unknown; valid: {', '.join(sorted(METHODS))}")
    settings = {k: v for k, v in cfg.items() if k != "name"}
    try:
        return from_dict(METHODS[name].Config, settings, prefix="method.", also_valid=("name",))
    except ConfigError as err:
        if "valid keys" in str(err):
            raise
        valid = [f.name for f in dataclasses.fields(METHODS[name].Config)]
        raise ConfigError(f"{err} (method {name} settings: {', '.join(valid)})") from None


def create_method(cfg: dict[str, Any], encoder: nn.Module) -> PretrainMethod:
    """Build the method named in ``cfg`` around ``encoder``."""
    return METHODS[cfg["name"]](encoder, check_method_cfg(cfg))


__all__ = ["METHODS", "PretrainMethod", "PretrainOutput", "check_method_cfg", "create_method"]
