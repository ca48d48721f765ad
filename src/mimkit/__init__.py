"""mimkit: self-supervised visual pre-training by masked image modeling."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``import mimkit`` stays light; the encoder loader pulls in torch only when asked for.
    if name == "load_encoder":
        from mimkit.export import load_encoder

        return load_encoder
    if name in ("load_config", "pretrain"):
        from mimkit import engine, models

        return models.load_config if name == "load_config" else engine.pretrain
    raise AttributeError(f"module 'mimkit' has no attribute {name!r}")


__all__ = ["__version__", "load_config", "load_encoder", "pretrain"]
