"""The hybrid convolutional-ViT masked autoencoder.

The model of "MAE-based Hybrid Convolutional ViT for Self-Supervised Learning" (its model
architecture section): a CvT encoder sees the whole image with square pixel blocks blanked out,
re-weights every stage's convolutional embedding by the visible count (the inpainting update mask),
and a U-Net decoder with skip connections from the encoder stages predicts the image. The loss is
the inpainting loss of Liu et al. (ECCV 2018) or MAE's masked MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimkit.backbones.cvt import UPDATE_MASKS
from mimkit.backbones.layers.partial_conv import PROPAGATIONS
from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.masking import pixel_block_mask
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.losses import inpainting_loss, masked_mse, patch_norm_stats, patchify, unpatchify
from mimkit.methods.unet_decoder import UNetDecoder
from mimkit.schema import check_positive

LOSSES = ("inpainting", "mae")


class CvTMAE(PretrainMethod):
    """Masked image modelling with a CvT encoder, per-stage update mask and a U-Net decoder.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> m = CvTMAE(create_backbone("cvt_micro_s2", in_chans=1), CvTMAE.Config(mask_size=4))
        >>> out = m(torch.randn(2, 1, 28, 28))
        >>> out.pred.shape, out.mask.shape  # predicted image, pixel mask (1 = masked)
        (torch.Size([2, 1, 28, 28]), torch.Size([2, 1, 28, 28]))

    """

    mask_kind = "pixels"

    @dataclass
    class Config(MethodConfig):
        """CvT-MAE's own settings (``method:`` in a config)."""

        mask_ratio: float = 0.5
        mask_size: int = 4
        mask_mode: str = "random"
        skip: bool = True
        update_mask: str | bool = "pre_norm"
        """none | pre_norm | post_norm | mask_only (see ``backbones.cvt.UPDATE_MASKS``); true and
        false, as older configs wrote it, mean pre_norm and mask_only."""
        decoder_depth: int = 2
        decoder_head_dim: int = 32
        decoder_fuse_kernel: int = 3
        """Side of the convolution fusing each upsampled decoder map with its skip (odd)."""
        loss: str = "inpainting"
        hole_weight: float = 6.0
        tv_weight: float = 0.1
        norm_pix_loss: bool = False
        sparse: bool = False
        """The encoder computes only the tokens whose window holds visible input, each stage's convolutions
        reading the others as empty (``backbones.layers.sparse``); needs a propagated update mask."""
        propagate: str = "window"
        """Which tokens of a stage are visible: window (the partial convolution's update mask, growing at
        every stage) or cell (their own cell holds visible input); see ``partial_conv.PROPAGATIONS``."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if isinstance(self.update_mask, bool):
                self.update_mask = "pre_norm" if self.update_mask else "mask_only"
            if self.update_mask not in UPDATE_MASKS:
                raise ConfigError(f"method.update_mask must be one of {', '.join(UPDATE_MASKS)} (or true / false "
                                  f"for pre_norm / mask_only), got {self.update_mask!r}")
            if self.propagate not in PROPAGATIONS:
                raise ConfigError(f"method.propagate must be one of {', '.join(PROPAGATIONS)}, got {self.propagate!r}")
            for name, asked in (("sparse", self.sparse), ("propagate=cell", self.propagate == "cell")):
                if asked and self.update_mask == "none":
                    raise ConfigError(f"method.{name} works on the propagated mask; it needs method.update_mask "
                                      "pre_norm, post_norm or mask_only, got none")
            if not 0.0 < self.mask_ratio < 1.0:
                raise ConfigError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
            if self.mask_size < 1:
                raise ConfigError(f"method.mask_size must be a positive number of pixels, got {self.mask_size}")
            if self.mask_mode not in ("random", "block"):
                raise ConfigError(f"method.mask_mode must be 'random' or 'block', got {self.mask_mode!r}")
            if self.loss not in LOSSES:
                raise ConfigError(f"method.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
            if self.decoder_depth < 0:
                raise ConfigError(f"method.decoder_depth must be >= 0, got {self.decoder_depth}")
            check_positive("method", decoder_head_dim=self.decoder_head_dim)
            if self.decoder_fuse_kernel < 1 or self.decoder_fuse_kernel % 2 == 0:
                raise ConfigError(f"method.decoder_fuse_kernel must be an odd positive size (1, 3, 5, ...), got "
                                  f"{self.decoder_fuse_kernel}")
            if self.hole_weight < 0 or self.tv_weight < 0:
                raise ConfigError(f"method.hole_weight and method.tv_weight must be >= 0, got "
                                  f"{self.hole_weight} and {self.tv_weight}")
            if self.norm_pix_loss and self.loss != "mae":
                raise ConfigError("method.norm_pix_loss applies to loss 'mae' only; set method.loss=mae")

    def __init__(self, encoder: torch.nn.Module, cfg: Config) -> None:
        """Wrap a hierarchical encoder with ``forward_stages(x, visible, update_mask)`` (and the keyword
        ``sparse`` for ``method.sparse``).
        """
        super().__init__()
        self.check_encoder(encoder)
        self.encoder = encoder
        self.cfg = cfg
        self.decoder = UNetDecoder(encoder.dims, encoder.strides, encoder.in_chans, cfg.decoder_depth,
                                   cfg.decoder_head_dim, cfg.skip, cfg.decoder_fuse_kernel)

    def check_image_size(self, height: int, width: int) -> None:
        """The mask is a grid of ``mask_size`` blocks, so it must tile the image; the decoder predicts
        ``stride`` pixels per first-stage token, so those tokens must cover the image.
        """
        b = self.cfg.mask_size
        if height % b or width % b:
            side = min(height, width)
            valid = [s for s in range(2, side + 1) if height % s == 0 and width % s == 0]
            raise ConfigError(f"method.mask_size {b} does not tile {height}x{width} training images; "
                              f"valid mask sizes: {', '.join(map(str, valid)) or 'none (change data.img_size)'}")
        grids = getattr(self.encoder, "stage_grids", None)
        if grids is None:
            return
        stride = self.encoder.strides[0]
        rows, cols = grids(height, width)[0]
        if rows * stride < height or cols * stride < width:
            near = [s for s in range(max(stride, min(height, width) - 2 * stride), min(height, width) + 2 * stride)
                    if grids(s, s)[0][0] * stride >= s and s % b == 0]
            raise ConfigError(
                f"{height}x{width} training images (data.img_size, or a view's size) leave pixels outside every "
                f"first-stage window of the encoder "
                f"({rows}x{cols} tokens of {stride} px cover {rows * stride}x{cols * stride}), so the decoder "
                f"cannot predict them; sizes near it that work with method.mask_size {b}: "
                f"{', '.join(map(str, near)) or 'none'}")

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Blank pixel blocks, encode the whole image, decode through the skips, score.

        Args:
            batch: A :class:`~mimkit.data.Batch` of normalised images ``[N, C, H, W]`` (H, W divisible
                by ``mask_size``; labels are not used), or the images alone.

        Returns:
            ``PretrainOutput`` with ``pred [N, C, H, W]`` and ``mask [N, 1, H, W]`` (1 = masked).

        """
        images = Batch.of(batch).images
        n, _, h, w = images.shape
        hole = pixel_block_mask(n, h, w, self.cfg.mask_size, self.cfg.mask_ratio, self.cfg.mask_mode,
                                images.device)  # [N, 1, H, W] float32, 1 = masked
        visible = 1.0 - hole
        # The keywords only when asked for: an encoder without these modes keeps working as it did.
        modes = {**({"sparse": True} if self.cfg.sparse else {}),
                 **({"propagate": self.cfg.propagate} if self.cfg.propagate != "window" else {})}
        maps = self.encoder.forward_stages(images, visible, self.cfg.update_mask, **modes)  # [N, D_i, H_i, W_i]
        pred = self.decoder(maps, (h, w))  # [N, C, H, W]
        if self.cfg.loss == "inpainting":
            loss, logs = inpainting_loss(pred, images, hole, self.cfg.hole_weight, self.cfg.tv_weight)
        else:
            b = self.cfg.mask_size
            block_mask = patchify(hole, b).amax(dim=-1)  # [N, L]
            loss = masked_mse(patchify(pred, b), patchify(images, b), block_mask, self.cfg.norm_pix_loss)
            logs = {}
        return PretrainOutput(loss=loss, logs=logs, pred=pred, mask=hole)

    def reconstruct(
        self, images: torch.Tensor, out: PretrainOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted image; with a per-block normalised target, mapped back by the true block stats."""
        pred = out.pred.float()
        if self.cfg.norm_pix_loss:
            b = self.cfg.mask_size
            grid = (images.shape[-2] // b, images.shape[-1] // b)
            mean, std = patch_norm_stats(patchify(images, b))
            pred = unpatchify(patchify(pred, b) * std + mean, b, images.shape[1], grid)
        return pred, out.mask.float()
