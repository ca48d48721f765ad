"""The one contract between a pre-training method and the training engine.

The engine calls ``method(images)`` and reads ``out.loss`` (and ``out.logs`` for logging); it never
runs a method's backward, never passes it method settings, and never reaches into its submodules.
Evaluation only uses ``method.encoder`` through the backbone interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mimkit.config import ConfigError


@dataclass
class PretrainOutput:
    """What a method's forward returns.

    Attributes:
        loss: Scalar training loss.
        logs: Extra scalars to log (detached floats or 0-d tensors).
        pred: The method's prediction, e.g. ``[N, L, p*p*C]`` patch pixels for MAE.
        mask: The mask the prediction was made under, e.g. ``[N, L]`` with 1 = masked.

    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class PretrainMethod(nn.Module):
    """Base of every method: an ``encoder`` plus whatever the method needs to train it.

    A method defines a nested ``Config`` dataclass with its settings; ``METHODS[name](encoder,
    cfg)`` builds it. Subclasses implement :meth:`forward` and, for visualisation,
    :meth:`reconstruct`.
    """

    encoder: nn.Module
    #: How the encoder must take the mask: ``keep_idx`` (drops tokens, ViT) or ``pixels`` (a dense
    #: visible-pixel mask, CvT). Backbones declare the same attribute.
    mask_input: str = "keep_idx"

    def check_encoder(self, encoder: nn.Module) -> None:
        """Refuse an encoder that cannot take this method's kind of mask, naming the ones that can."""
        kind = getattr(encoder, "mask_input", None)
        if kind != self.mask_input:
            from mimkit.backbones import backbones_taking

            raise ConfigError(
                f"{type(self).__name__} needs a backbone taking mask_input={self.mask_input!r}; "
                f"{type(encoder).__name__} takes {kind!r}. Valid backbones: "
                f"{', '.join(backbones_taking(self.mask_input))}"
            )

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse (with a :class:`ConfigError`) training images this method cannot mask; all sizes by default."""

    def forward(self, images: torch.Tensor) -> PretrainOutput:  # pragma: no cover - abstract
        """Compute the pre-training loss on a batch of normalised images ``[N, C, H, W]``."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Per-optimizer-step hook (e.g. an EMA teacher update); a no-op by default."""

    def reconstruct(
        self, images: torch.Tensor, out: PretrainOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``out.pred``/``out.mask`` back to image space for visualisation.

        Args:
            images: The normalised input ``[N, C, H, W]``.
            out: This method's output on ``images``.

        Returns:
            ``(reconstruction [N, C, H, W], pixel mask [N, 1, H, W] with 1 = masked)``, both in
            the normalised input space.

        """
        raise NotImplementedError(f"{type(self).__name__} has no pixel reconstruction")
