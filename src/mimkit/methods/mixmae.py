"""MixMAE: two images mixed into one input, each reconstructed where the other covered it.

Liu et al., "MixMAE: Mixed and Masked Autoencoder for Efficient Pretraining of Hierarchical Vision
Transformers", CVPR 2023. Image ``i`` is paired with ``N - 1 - i``; one mask per step, shared by the
batch, is drawn on the encoder's last-stage grid (so patch merging never joins the two images) and
upsampled to the pixels. The encoder keeps the images apart (attention within an image on the
Swin, per-image convolutions and attention on the CvT), the decoder runs twice, once with each
image's tokens and mask tokens elsewhere, and every position is scored once, in the run where it
was hidden (dual reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.backbones.layers.cpu_kernels import attention_kernel
from mimkit.backbones.layers.norm import layer_norm
from mimkit.backbones.layers.partial_conv import REWEIGHTS
from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.masking.kinds import MixPairs
from mimkit.masking.mixing import mix_pairs, pair_mask, pair_partner, upsample_labels
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.losses import masked_mse, patch_reconstruction, patchify
from mimkit.schema import check_heads, check_positive


class MixMAE(PretrainMethod):
    """Mixed-input masked autoencoder on a hierarchical encoder that takes :class:`MixPairs` masks.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("swin_tiny_p2", in_chans=1)  # 28 px -> 14x14 -> 7x7 tokens
        >>> out = MixMAE(enc, MixMAE.Config())(torch.randn(4, 1, 28, 28))
        >>> out.pred.shape, out.mask.shape  # [N, L, b*b*C] with b = 28 / 7, [N, L]
        (torch.Size([4, 49, 16]), torch.Size([4, 49]))

    """

    mask_kind = "mix"

    @dataclass
    class Config(MethodConfig):
        """MixMAE's settings (``method:`` in a config).

        Attributes:
            mix_ratio: Fraction of the last-stage grid taken from the partner image (the paper's 0.5).
            mix_embed: Add a learned vector per stage and per image label at each stage's input (the
                paper's mix embedding; the official code has none).
            decoder_dim: Width of the decoder.
            decoder_depth: Decoder transformer blocks.
            decoder_heads: Decoder attention heads.
            norm_pix_loss: Score per-patch normalised pixels.
            norm_pix_eps: Added to each target patch's variance; near-constant patches (an
                image's plain background) blow up with MAE's 1e-6.
            update_mask: On the CvT, the partial-convolution re-weighting of each image, whose holes
                are the other image's pixels (``pre_norm``, ``post_norm``, ``mask_only``).

        """

        mix_ratio: float = 0.5
        mix_embed: bool = True
        decoder_dim: int = 96
        decoder_depth: int = 2
        decoder_heads: int = 4
        norm_pix_loss: bool = True
        norm_pix_eps: float = 1e-4
        update_mask: str = "pre_norm"

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 < self.mix_ratio < 1.0:
                raise ConfigError(f"method.mix_ratio must be in (0, 1), got {self.mix_ratio}")
            check_positive("method", decoder_dim=self.decoder_dim, decoder_heads=self.decoder_heads)
            if self.decoder_depth < 0:
                raise ConfigError(f"method.decoder_depth must be >= 0, got {self.decoder_depth}")
            check_heads("method.decoder_dim", self.decoder_dim, "method.decoder_heads", self.decoder_heads)
            if self.decoder_dim % 4:
                raise ConfigError(f"method.decoder_dim must be divisible by 4 (sin-cos positions), got "
                                  f"{self.decoder_dim}")
            if self.norm_pix_eps <= 0:
                raise ConfigError(f"method.norm_pix_eps must be > 0, got {self.norm_pix_eps}")
            if self.update_mask not in REWEIGHTS:
                raise ConfigError(f"method.update_mask must be one of {', '.join(REWEIGHTS)} for a mixed input "
                                  f"(each image's pixels are the other's holes), got {self.update_mask!r}")

    #: Images are mixed in pairs: every batch holds an even number of them.
    batch_multiple = 2

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """Wrap a mixing-capable hierarchical encoder (``stage_dims``, ``grid_size``) with MixMAE's decoder."""
        super().__init__()
        self.check_encoder(encoder)
        self.encoder, self.cfg = encoder, cfg
        side = encoder.img_size
        grid = encoder.grid_size(side, side)
        if side % grid[0]:
            raise ConfigError(f"{type(encoder).__name__} at {side} px gives a {grid[0]}x{grid[1]} last-stage grid, "
                              "which does not cut the image into equal blocks; use an image size it divides")
        self.block = side // grid[0]
        if self.block % encoder.mix_unit:
            raise ConfigError(
                f"{type(encoder).__name__} at {side} px has {self.block} px last-stage cells, not a multiple of its "
                f"{encoder.mix_unit} px tokens: a patch or merged group would hold both images; use an image side "
                f"that is a multiple of {encoder.mix_unit}")
        self.mix_embeds = nn.ParameterList(
            [nn.Parameter(torch.zeros(2, d)) for d in encoder.stage_dims]) if cfg.mix_embed else None
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(encoder.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_blocks = nn.Sequential(*[
            Block(d, cfg.decoder_heads, 4.0, qkv_bias=True, norm_layer=layer_norm) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = layer_norm(d)
        self.decoder_pred = nn.Linear(d, self.block * self.block * encoder.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.mix_embeds is not None:
            for p in self.mix_embeds:
                nn.init.trunc_normal_(p, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse training images that the last-stage grid does not cut into this decoder's blocks."""
        try:
            grid = self.encoder.grid_size(height, width)
        except ValueError as err:
            raise ConfigError(f"MixMAE cannot take {height}x{width} images: {err}") from None
        if (height, width) != (grid[0] * self.block, grid[1] * self.block):
            raise ConfigError(f"MixMAE's decoder predicts {self.block}x{self.block} px blocks of a {height}x{width} "
                              f"image on a {grid[0]}x{grid[1]} grid; train at the backbone's img_size")

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Mix pairs, encode, un-mix by decoding twice, score every position where it was hidden.

        Args:
            batch: A :class:`~mimkit.data.Batch` of ``N`` (even) normalised images ``[N, C, H, W]``,
                or the images alone.

        Returns:
            ``PretrainOutput`` with ``pred [N, L, b*b*C]`` (each image's dual reconstruction on the
            last-stage grid), ``mask [N, L]`` (1 where the sample's own mixed input showed the
            partner) and ``inputs`` (the mixed images).

        """
        images = Batch.of(batch).images
        n, _, h, w = images.shape
        partner = pair_partner(n).to(images.device)
        grid = self.encoder.grid_size(h, w)
        labels = pair_mask(grid, self.cfg.mix_ratio, images.device)  # [gh, gw], 1 = partner's
        mixed = mix_pairs(images, upsample_labels(labels, (h, w)))
        embeds = None if self.mix_embeds is None else tuple(self.mix_embeds)
        latent = self.encoder.forward_features(mixed, MixPairs(labels, embeds, self.cfg.update_mask))  # [N, L, D]
        x = self.decoder_embed(latent)
        hidden = labels.flatten().bool().view(1, -1, 1)  # [1, L, 1]
        token = self.mask_token.to(x.dtype)
        own, other = torch.where(hidden, token, x), torch.where(hidden, x, token)  # each image's tokens alone
        seq = torch.cat([own, other]) + sincos_2d(*grid, x.shape[-1], x.device).to(x.dtype)
        with attention_kernel(seq, seq.shape[1], seq.shape[1]):
            rec = self.decoder_pred(self.decoder_norm(self.decoder_blocks(seq)))  # [2N, L, b*b*C]
        # image i: where its own sample showed the partner, from that sample's run with i's tokens;
        # elsewhere from its partner's sample, where i was the partner (i covered its hidden cells there)
        pred = torch.where(hidden, rec[:n], rec[n:][partner])
        target = patchify(images, self.block)
        loss = masked_mse(pred, target, torch.ones(pred.shape[:2], device=pred.device), self.cfg.norm_pix_loss,
                          eps=self.cfg.norm_pix_eps)
        mask = hidden.view(1, -1).expand(n, -1).float()
        return PretrainOutput(loss=loss, pred=pred, mask=mask, inputs=mixed)

    def reconstruct(self, images: torch.Tensor, out: PretrainOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's dual reconstruction in the input space, and the cells its own mixed input
        gave to the partner (1 = hidden there).
        """
        return patch_reconstruction(images, out.pred, out.mask, self.block, self.cfg.norm_pix_loss,
                                    self.cfg.norm_pix_eps)
