"""data2vec 2.0: several inverse-block-masked clones per image regress one teacher pass, through a conv decoder.

Baevski et al., "Efficient Self-supervised Learning with Contextualized Target Representations for
Vision, Speech and Language", ICML 2023 (fairseq's ``examples/data2vec/models/data2vec2.py`` with
``config/v2/base_images_only_task.yaml``).

Each image is cloned ``clones`` times; each clone gets its own inverse block mask (square blocks
stay visible, about 80 % of the patches are hidden) and the student encodes only its visible
tokens, as MAE's encoder does. A light convolutional decoder sees the encoded tokens at their
places, small noise at the hidden ones, and predicts every token. The teacher, an exponential
moving average of the student's encoder (the decoder has none), encodes each image once, unmasked;
its top K block outputs (``method.target_layer=ffn``: their feed-forward outputs before the residual
connection, data2vec 2.0's own choice, which in its post-LN blocks is the same place), each
instance-normed over the tokens, are averaged and layer-normed into the target of all the clones.
The loss is the squared error on the hidden tokens scaled by ``1 / sqrt(D)``, plus the class token
regressing the mean of the image's targets.

On a backbone that cannot drop tokens (the CvT) the student sees the whole clone with the hidden
cells' pixels removed (its pixel masks and update mask, as CvT-MAE and data2vec on the CvT), the
masks are drawn on its last-stage grid, the targets are the teacher's last stage (stages differ in
width and resolution; with ``ffn``, its top K blocks' feed-forward outputs), and the mean of the
visible output tokens stands in for the class token. No public implementation runs data2vec 2.0 on
a hierarchical convolutional encoder: this is mimkit's reading of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.masking import KeepTokens, TokenMask, inverse_block_masks
from mimkit.methods.base import PretrainOutput
from mimkit.methods.data2vec import EncoderTeacher, RegressionConfig, feature_std
from mimkit.methods.decoders import ConvDecoder
from mimkit.schema import check_positive, require


def instance_normed_targets(blocks: list[torch.Tensor]) -> torch.Tensor:
    """data2vec 2.0's target: each block output ``[N, L, D]`` instance-normed over its ``L`` tokens,
    averaged over the blocks, then a parameter-free LayerNorm; float32 ``[N, L, D]``.
    """
    normed = [F.instance_norm(b.float().transpose(1, 2)).transpose(1, 2) for b in blocks]
    average = torch.stack(normed).mean(0)
    return F.layer_norm(average, average.shape[-1:])


class Data2Vec2(EncoderTeacher):
    """Student encoder on masked clones (the visible tokens alone on the ViT) + conv decoder, against an
    EMA teacher's instance-normed targets.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=2, num_heads=2)
        >>> d2v2 = Data2Vec2(enc, Data2Vec2.Config(decoder_dim=16, clones=2))
        >>> out = d2v2(torch.randn(3, 1, 28, 28))
        >>> out.loss.ndim, out.mask.shape  # the first clone of each image
        (0, torch.Size([3, 49]))

    """

    @dataclass
    class Config(RegressionConfig):
        """data2vec 2.0's settings (``method:`` in a config); the defaults are for 28-32 px images on a CPU."""

        mask_ratio: float = 0.8
        block_size: int = 3
        """Side of a visible block, in tokens (data2vec 2.0: 3 on 14 x 14; on a 7 x 7 grid the formula
        gives a single block and the rest of the visible tokens are scattered); cut to the side of a
        smaller grid."""
        mask_adjust: float = 0.07
        clones: int = 4
        """Masks per image sharing one teacher pass (data2vec 2.0: 16 at ImageNet scale)."""
        decoder_dim: int = 128
        decoder_depth: int = 3
        decoder_kernel: int = 3
        decoder_groups: int = 16
        noise_std: float = 0.01
        """Std of the noise the decoder sees at the hidden tokens (data2vec 2.0 has no mask token)."""
        cls_weight: float = 0.01
        """Weight of the class token's loss per clone, summed over an image's clones."""

        def __post_init__(self) -> None:
            super().__post_init__()
            require(0.0 < self.mask_ratio < 1.0, "method.mask_ratio", "in (0, 1)", self.mask_ratio)
            require(self.decoder_depth >= 0, "method.decoder_depth", ">= 0", self.decoder_depth)
            require(self.decoder_kernel % 2 == 1, "method.decoder_kernel", "odd", self.decoder_kernel)
            check_positive("method", block_size=self.block_size, clones=self.clones, decoder_dim=self.decoder_dim,
                           decoder_kernel=self.decoder_kernel, decoder_groups=self.decoder_groups)
            for key in ("mask_adjust", "noise_std", "cls_weight"):
                require(getattr(self, key) >= 0, f"method.{key}", ">= 0", getattr(self, key))

    mask_kind = ("keep_idx", "token_mask")
    title = "data2vec 2.0"

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """The student ``encoder``, the conv decoder, and a teacher copy of the encoder without gradients."""
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        # The ViT encodes the visible tokens only; the CvT sees the hidden cells' pixels removed.
        self.sparse = self.pick_mask_kind(encoder) == "keep_idx"
        if not self.sparse and getattr(encoder, "uses_mask_token", False):
            raise ConfigError(f"data2vec 2.0 has no mask token: {type(encoder).__name__} must drop tokens "
                              "(keep_idx) or hide pixels, as the ViT and the CvT do")
        d = encoder.num_features
        self.decoder = ConvDecoder(d, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_kernel, cfg.decoder_groups)
        self.add_teacher()

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 targets ``[N, L, D]`` of the unmasked ``images``, one pass per image."""
        return instance_normed_targets(self.teacher_layers(images))

    def encode_clones(self, clones: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student on masked clones: its class token and the decoder's input.

        Args:
            clones: ``[B, C, H, W]`` images (each image repeated ``clones`` times).
            masks: ``[B, L]`` bool, True = hidden; on the ViT every row hides the same number of tokens.

        Returns:
            ``(cls [B, D], slots [B, L, D])``: the class token (on a backbone without one, the mean of
            the visible output tokens) and the output tokens at the visible places with small noise
            at the hidden ones.

        """
        b, length = masks.shape
        std = self.cfg.noise_std
        if not self.sparse:
            tokens = self.encoder.forward_features(clones, TokenMask(masks))  # [B, L, D]
            visible = (~masks).unsqueeze(-1)
            # float32: a bf16 sum over the tokens would round the class-token stand-in
            cls = (tokens.float() * visible).sum(1) / visible.sum(1).clamp_min(1)
            noise = torch.randn(tokens.shape, device=tokens.device, dtype=tokens.dtype) * std
            return cls, torch.where(visible, tokens, noise)
        seen_count = length - int(masks[0].sum())
        # Every clone shows the same number of tokens, so their indices form one tensor (ascending).
        keep = torch.sort((~masks).float().argsort(dim=1, descending=True, stable=True)[:, :seen_count], dim=1).values
        tokens = self.encoder.forward_features(clones, KeepTokens(keep))
        seen = tokens[:, self.encoder.num_prefix_tokens:]  # [B, V, D]
        d = seen.shape[-1]
        slots = torch.randn(b, length, d, device=seen.device, dtype=seen.dtype) * std
        slots = slots.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), seen)
        return tokens[:, 0], slots

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """The regression loss of every clone's hidden tokens, and of its class token."""
        c = self.cfg
        images = Batch.of(batch).images
        n = images.shape[0]
        grid = self.encoder.grid_size(*images.shape[-2:])
        target = self.targets(images)  # [N, L, D], once per image
        length, d = target.shape[1:]
        block = min(c.block_size, *grid)
        masks = inverse_block_masks(n * c.clones, *grid, c.mask_ratio, block_size=block,
                                    adjust=c.mask_adjust).to(images.device)  # [N*M, L], True = hidden
        cls, slots = self.encode_clones(images.repeat_interleave(c.clones, 0), masks)
        pred = self.decoder(slots, grid)  # [N*M, L, D]
        clone_target = target.repeat_interleave(c.clones, 0)
        hidden_pred, hidden_target = pred[masks].float(), clone_target[masks]
        loss_patch = (hidden_pred - hidden_target).pow(2).sum(-1).mean() / math.sqrt(d)
        cls_target = target.mean(1).repeat_interleave(c.clones, 0)  # [N*M, D]
        loss_cls = (cls.float() - cls_target).pow(2).sum(-1).mean() / math.sqrt(d)
        loss = loss_patch + c.cls_weight * c.clones * loss_cls
        with torch.no_grad():
            target_std, pred_std = float(feature_std(hidden_target)), float(feature_std(hidden_pred))
        if self.training:
            self._stds = (target_std, pred_std)
        logs = {"loss_patch": float(loss_patch.detach()), "loss_cls": float(loss_cls.detach()),
                "target_var": target_std, "pred_var": pred_std, "masked": float(masks.float().mean()),
                "momentum": self.momentum(float(self.progress))}
        return PretrainOutput(loss, logs, None, masks[:: c.clones].float())


__all__ = ["ConvDecoder", "Data2Vec2", "instance_normed_targets"]
