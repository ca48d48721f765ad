"""MixedAE: groups of images mixed into one token sequence, homologous attention, homologous contrast.

Chen et al., "Mixed Autoencoder for Self-supervised Visual Representation Learning", CVPR 2023. With
mixing ratio ``r`` (``G = 1 / r`` images per mixed sample), each image of a group holds exactly
``r * L`` of the ``L`` positions of one mixed sample, so the encoder processes as many tokens as
MAE at mask ratio ``1 - r``. A segment embedding tells the images apart; homologous attention keeps,
per head and query, only the ``K = r * L + 1`` largest attention logits (its image's tokens and the
class token, if it recognises them); a supervised-contrastive loss on the encoder's tokens rewards
recognising the own image's tokens. Each image is decoded on its own, as MAE decodes, and scored on
its hidden positions only. The paper leaves most details open; the choices here follow the
project's design notes and are settings.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.masking.kinds import MixGroups
from mimkit.masking.mixing import GroupMix, group_assignment, unmix_groups
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.decoders import MaskTokenDecoder
from mimkit.methods.losses import masked_mse, patch_reconstruction, patchify
from mimkit.schema import check_heads, check_positive

log = logging.getLogger(__name__)


def homologous_contrastive_loss(z: torch.Tensor, source: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixedAE's homologous contrastive loss: supervised-contrastive within each mixed sample.

    For an anchor token, positives are the other tokens of its image, negatives the tokens of the
    other images of the sample (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020, with
    the source image as the label).

    Args:
        z: ``[B, L, E]`` L2-normalised projections of the patch tokens.
        source: ``[B, L]`` image index of each token.
        temperature: Softmax temperature.

    Returns:
        Scalar float32 loss.

    """
    with torch.autocast(z.device.type, enabled=False):  # float32: at temperature 0.1 a bf16 step is 0.06
        z = z.float()
        sim = z @ z.transpose(1, 2) / temperature  # [B, L, L]
        self_pair = torch.eye(sim.shape[-1], dtype=torch.bool, device=z.device)
        log_prob = sim - sim.masked_fill(self_pair, float("-inf")).logsumexp(dim=-1, keepdim=True)
        positive = (source.unsqueeze(-1) == source.unsqueeze(-2)) & ~self_pair
        per_anchor = (log_prob * positive).sum(-1) / positive.sum(-1).clamp_min(1)
        return -per_anchor.mean()


@functools.cache
def _warn_segment_shortcut() -> None:
    """Say once per process that the contrastive loss can be solved from the segment embedding.

    Nothing computed from the residual stream can hide the segment embedding, so the loss reaches
    its floor (the log of the positives' count) from it alone and teaches nothing.
    """
    log.warning("MixedAE: the segment embedding is added to every token, so the contrastive projector "
                "can read each token's image from it and solve the homologous contrastive loss from it "
                "alone; set method.seg_embed=false (as the config mixedae_noseg_fmnist does) for a "
                "contrastive loss that must recognise image content")


class MixedAE(PretrainMethod):
    """Mixed autoencoder on a ViT: one mixed sequence per group of ``1 / r`` images.

    The ViT encodes the mixed sequences through its masked forward (a
    :class:`~mimkit.masking.MixGroups` mask); evaluation and fine-tuning use the plain ViT with
    vanilla attention (homologous attention has no parameters).

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> vit = create_backbone("vit_tiny_p4", img_size=32, in_chans=1, depth=2)
        >>> out = MixedAE(vit, MixedAE.Config())(torch.randn(8, 1, 32, 32))  # 2 groups of 4
        >>> out.pred.shape, out.mask.sum(1)  # 64 tokens, each image visible at 16
        (torch.Size([8, 64, 16]), tensor([48., 48., 48., 48., 48., 48., 48., 48.]))

    """

    mask_kind = "groups"

    @dataclass
    class Config(MethodConfig):
        """MixedAE's settings (``method:`` in a config).

        Attributes:
            mix_ratio: ``r``: each image's share of a mixed sample; ``1 / r`` must be an integer >= 2.
            seg_embed: Add a learned segment embedding per image index of the group. It reaches every
                token of the residual stream, so with the contrastive loss on, the projector can read
                a token's image from it and solve that loss without recognising any content.
            homologous_attention: TopK attention with ``K = r * L + 1`` in pre-training (off: vanilla).
            homologous_blocks: Use it in the last this many blocks only (0: every block).
            contrastive_weight: Weight of the homologous contrastive loss (0: off).
            contrastive_temperature: Its temperature.
            projector_dim: Output width of its projector (MLP D -> D -> this).
            decoder_dim: Width of the decoder.
            decoder_depth: Decoder transformer blocks.
            decoder_heads: Decoder attention heads.
            norm_pix_loss: Score per-patch normalised pixels.
            norm_pix_eps: Added to each target patch's variance (MAE's 1e-6).

        """

        mix_ratio: float = 0.25
        seg_embed: bool = True
        homologous_attention: bool = True
        homologous_blocks: int = 0
        contrastive_weight: float = 0.5
        contrastive_temperature: float = 0.1
        projector_dim: int = 128
        decoder_dim: int = 128
        decoder_depth: int = 2
        decoder_heads: int = 4
        norm_pix_loss: bool = True
        norm_pix_eps: float = 1e-6

        def __post_init__(self) -> None:
            super().__post_init__()
            group = round(1 / self.mix_ratio) if 0 < self.mix_ratio <= 0.5 else 0
            if group < 2 or abs(group * self.mix_ratio - 1) > 1e-6:
                raise ConfigError(f"method.mix_ratio must be 1/G for an integer G >= 2 (0.5, 0.25, 0.2, ...), "
                                  f"got {self.mix_ratio}")
            if self.homologous_blocks < 0:
                raise ConfigError(
                    f"method.homologous_blocks must be >= 0 (0: every block), got {self.homologous_blocks}")
            if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
                raise ConfigError("method.contrastive_weight must be >= 0 and method.contrastive_temperature > 0, "
                                  f"got {self.contrastive_weight} and {self.contrastive_temperature}")
            check_positive("method", projector_dim=self.projector_dim, decoder_dim=self.decoder_dim,
                           decoder_heads=self.decoder_heads, norm_pix_eps=self.norm_pix_eps)
            if self.decoder_depth < 0:
                raise ConfigError(f"method.decoder_depth must be >= 0, got {self.decoder_depth}")
            check_heads("method.decoder_dim", self.decoder_dim, "method.decoder_heads", self.decoder_heads)

        @property
        def group(self) -> int:
            """``G = 1 / r``: images per mixed sample."""
            return round(1 / self.mix_ratio)

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """Wrap an encoder taking :class:`~mimkit.masking.MixGroups` masks (the ViT) with MixedAE's parts."""
        super().__init__()
        self.check_encoder(encoder)
        depth = len(encoder.blocks)
        if cfg.homologous_blocks > depth:
            raise ConfigError(f"method.homologous_blocks {cfg.homologous_blocks} is more than the encoder's {depth} "
                              f"blocks; use 0 (every block) to {depth}")
        self.encoder, self.cfg = encoder, cfg
        dim, p, c = encoder.embed_dim, encoder.patch_size, encoder.in_chans
        self.seg_embed = nn.Parameter(torch.zeros(cfg.group, dim)) if cfg.seg_embed else None
        if self.seg_embed is not None:
            nn.init.trunc_normal_(self.seg_embed, std=0.02)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.projector_dim)) \
            if cfg.contrastive_weight > 0 else None
        if cfg.seg_embed and cfg.contrastive_weight > 0:
            _warn_segment_shortcut()
        self.decoder = MaskTokenDecoder(dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, p * p * c)

    @property
    def batch_multiple(self) -> int:  # type: ignore[override]
        """Each mixed sample holds ``G`` images, so a batch holds a multiple of ``G``."""
        return self.cfg.group

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse images whose token count the ``G`` images of a group cannot share equally."""
        gh, gw = self.encoder.grid_size(height, width)
        if (gh * gw) % self.cfg.group:
            raise ConfigError(f"MixedAE with mix_ratio {self.cfg.mix_ratio} shares each sample's {gh * gw} tokens "
                              f"({height}x{width} px, patch {self.encoder.patch_size}) among {self.cfg.group} images, "
                              f"which needs a multiple of {self.cfg.group}; e.g. data.img_size 32 with patch 4")

    def encode_mixed(self, images: torch.Tensor, mix: GroupMix) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder on the mixed sequences: ``[N, C, H, W]`` to ``[N / G, 1 + L, D]`` and per-block recognition."""
        depth = len(self.encoder.blocks)
        first = depth - self.cfg.homologous_blocks if self.cfg.homologous_blocks else 0
        groups = MixGroups(mix.source, self.seg_embed,
                           topk_from=first if self.cfg.homologous_attention else depth, stats={})
        latent = self.encoder.forward_features(images, groups)
        return latent, {f"homologous_recognition/{i}": v for i, v in groups.stats.items()}

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Mix groups, encode, decode each image from its own tokens, score its hidden positions.

        Args:
            batch: A :class:`~mimkit.data.Batch` of ``N`` normalised images ``[N, C, H, W]`` (a
                multiple of ``G``), or the images alone.

        Returns:
            ``PretrainOutput`` with ``pred [N, L, p*p*C]`` and ``mask [N, L]`` (1 = another image's
            token sat there).

        """
        images = Batch.of(batch).images
        n, _, h, w = images.shape
        grid = self.encoder.grid_size(h, w)
        mix = group_assignment(n, self.cfg.group, grid[0] * grid[1], images.device)
        latent, logs = self.encode_mixed(images, mix)  # [N/G, 1 + L, D]
        own = unmix_groups(latent[:, 1:], mix)  # [N, r L, D]
        pred = self.decoder(own, mix.restore_idx, grid, prefix_tokens=0)  # [N, L, p*p*C]
        target = patchify(images, self.encoder.patch_size)
        loss = masked_mse(pred, target, mix.mask, self.cfg.norm_pix_loss, eps=self.cfg.norm_pix_eps)
        logs["loss_rec"] = loss.detach()
        if self.projector is not None:
            z = F.normalize(self.projector(latent[:, 1:]).float(), dim=-1)
            contrast = homologous_contrastive_loss(z, mix.source, self.cfg.contrastive_temperature)
            logs["loss_homologous"] = contrast.detach()
            loss = loss + self.cfg.contrastive_weight * contrast
        return PretrainOutput(loss=loss, logs=logs, pred=pred, mask=mix.mask)

    def reconstruct(self, images: torch.Tensor, out: PretrainOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted pixels in the input space (the per-patch normalisation undone) and the hidden positions."""
        return patch_reconstruction(images, out.pred, out.mask, self.encoder.patch_size, self.cfg.norm_pix_loss,
                                    self.cfg.norm_pix_eps)
