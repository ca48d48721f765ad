"""Figures: reconstructions and curves."""

from mimkit.viz.curves import save_loss_curve
from mimkit.viz.reconstructions import reconstruction_panels, save_reconstructions

__all__ = ["reconstruction_panels", "save_loss_curve", "save_reconstructions"]
