"""The training engine: one loop, optimizer and schedule, checkpoints, logging, DDP."""

from mimkit.engine.run_folder import CONFIG_FILE
from mimkit.engine.trainer import NonFiniteLossError, pretrain

__all__ = ["CONFIG_FILE", "NonFiniteLossError", "pretrain"]
