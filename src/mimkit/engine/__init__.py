"""The training engine: one loop, optimizer and schedule, checkpoints, logging, DDP."""

from mimkit.engine.trainer import CONFIG_FILE, NonFiniteLossError, pretrain

__all__ = ["CONFIG_FILE", "NonFiniteLossError", "pretrain"]
