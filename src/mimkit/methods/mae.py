"""MAE: masked autoencoder with a token-dropping ViT encoder.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.masking import KeepTokens, random_masking
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.decoders import MaskTokenDecoder
from mimkit.methods.losses import masked_mse, patch_reconstruction, patchify
from mimkit.schema import check_heads, check_positive


class MAE(PretrainMethod):
    """The encoder sees only the visible patches; a light decoder predicts the masked pixels.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> mae = MAE(create_backbone("vit_tiny_p4", img_size=28, in_chans=1), MAE.Config())
        >>> out = mae(torch.randn(2, 1, 28, 28))
        >>> out.pred.shape, out.mask.shape  # [N, L, p*p*C], [N, L]
        (torch.Size([2, 49, 16]), torch.Size([2, 49]))

    """

    @dataclass
    class Config(MethodConfig):
        """MAE's own settings (``method:`` in a config)."""

        mask_ratio: float = 0.75
        decoder_dim: int = 128
        decoder_depth: int = 2
        decoder_heads: int = 4
        norm_pix_loss: bool = True

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 < self.mask_ratio < 1.0:
                raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
            check_positive("method", decoder_dim=self.decoder_dim, decoder_heads=self.decoder_heads)
            if self.decoder_depth < 0:
                raise ConfigError(f"method.decoder_depth must be >= 0, got {self.decoder_depth}")
            check_heads("method.decoder_dim", self.decoder_dim, "method.decoder_heads", self.decoder_heads)

    def __init__(self, encoder: torch.nn.Module, cfg: Config) -> None:
        """Wrap a token-dropping encoder (``forward_features(x, KeepTokens(idx))``) with a decoder."""
        super().__init__()
        self.check_encoder(encoder)
        self.encoder = encoder
        self.cfg = cfg
        p, c = encoder.patch_size, encoder.in_chans
        self.decoder = MaskTokenDecoder(
            encoder.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, p * p * c
        )

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Mask, encode the visible patches, decode all, score the masked ones.

        Args:
            batch: A :class:`~mimkit.data.Batch` of normalised images ``[N, C, H, W]`` (labels are
                not used), or the images alone.

        Returns:
            ``PretrainOutput`` with ``pred [N, L, p*p*C]`` and ``mask [N, L]`` (1 = masked).

        """
        images = Batch.of(batch).images
        n, _, h, w = images.shape
        grid = self.encoder.grid_size(h, w)
        m = random_masking(n, grid[0] * grid[1], self.cfg.mask_ratio, images.device)
        latent = self.encoder.forward_features(images, KeepTokens(m.keep_idx))  # [N, 1+K, D]
        pred = self.decoder(latent, m.restore_idx, grid)  # [N, L, p*p*C]
        target = patchify(images, self.encoder.patch_size)  # [N, L, p*p*C]
        loss = masked_mse(pred, target, m.mask, norm_pix=self.cfg.norm_pix_loss)
        return PretrainOutput(loss=loss, pred=pred, mask=m.mask)

    def reconstruct(
        self, images: torch.Tensor, out: PretrainOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted pixels in the input space; undoes the per-patch normalisation of the target.

        With ``norm_pix_loss`` the decoder predicts each patch standardised by its own statistics,
        so the prediction is mapped back with the true patch's mean and std (as MAE's demo does).
        """
        return patch_reconstruction(images, out.pred, out.mask, self.encoder.patch_size, self.cfg.norm_pix_loss)
