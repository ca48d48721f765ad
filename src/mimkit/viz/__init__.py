"""Figures: reconstructions, the views a method trains on, and curves."""

from mimkit.viz.curves import first_minutes_at, save_accuracy_curves, save_loss_curve
from mimkit.viz.feature_maps import attention_maps, pca_maps, save_feature_maps
from mimkit.viz.reconstructions import reconstruction_panels, save_reconstructions, save_views

__all__ = [
    "attention_maps",
    "first_minutes_at",
    "pca_maps",
    "reconstruction_panels",
    "save_accuracy_curves",
    "save_feature_maps",
    "save_loss_curve",
    "save_reconstructions",
    "save_views",
]
