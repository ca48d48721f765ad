"""Figures: reconstructions, the views a method trains on, and curves."""

from mimkit.viz.curves import first_minutes_at, save_accuracy_curves, save_loss_curve
from mimkit.viz.reconstructions import reconstruction_panels, save_reconstructions, save_views

__all__ = [
    "first_minutes_at",
    "reconstruction_panels",
    "save_accuracy_curves",
    "save_loss_curve",
    "save_reconstructions",
    "save_views",
]
