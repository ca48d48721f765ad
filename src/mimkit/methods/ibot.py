"""iBOT: DINO's cross-view self-distillation plus masked image modeling with an online tokenizer.

Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022; the optional KoLeo
regulariser is DINOv2's (Oquab et al., "DINOv2: Learning Robust Visual Features without
Supervision", TMLR 2024; Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019).

The student's global crops are block-masked (each image masked with probability ``mask_prob``, at a
ratio drawn from ``mask_ratio``); its masked patch tokens are replaced by a learned mask token. The
teacher sees the crops unmasked. Beside DINO's loss on the pooled features, the patch loss asks
each masked student token to predict the teacher's distribution for the same token of the same
view, centred by a second centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.masking import TokenMask, block_masks
from mimkit.methods.base import PretrainOutput
from mimkit.methods.centering import make_centering
from mimkit.methods.dino import DINO, dino_loss
from mimkit.methods.heads import DINOHead
from mimkit.methods.teacher import Pair, frozen_copy
from mimkit.schema import require


def ibot_patch_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], masks: list[torch.Tensor],
                    student_temp: float) -> torch.Tensor:
    """IBOT's masked-token loss: per view, the cross-entropy summed over masked tokens over their count,
    averaged over images (an unmasked image counts as 0) and views.

    Args:
        student: Per global view, ``[N, L, K]`` logits of the student's (masked) patch tokens.
        teacher: Per global view, ``[N, L, K]`` probabilities of the teacher's (unmasked) patch tokens.
        masks: Per global view, ``[N, L]`` bool, True = masked.
        student_temp: The student's softmax temperature.

    Returns:
        The scalar loss (float32).

    """
    terms = []
    for s, t, m in zip(student, teacher, masks, strict=True):
        ce = -(t * F.log_softmax(s.float() / student_temp, dim=-1)).sum(-1)  # [N, L]
        m = m.float()
        terms.append(((ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean())
    return torch.stack(terms).mean()


class IBOT(DINO):
    """DINO plus iBOT's masked patch-token distillation (a shared or separate patch head), KoLeo optional.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
        >>> ibot = IBOT(enc, IBOT.Config(out_dim=64, hidden_dim=32, bottleneck_dim=16))
        >>> views = [torch.randn(2, 1, 28, 28)] * 2 + [torch.randn(2, 1, 12, 12)] * 6
        >>> out = ibot(Batch(views[0], None, tuple(views)))
        >>> out.mask.shape  # the first global crop's patch mask, [N, L]
        torch.Size([2, 49])

    """

    @dataclass
    class Config(DINO.Config):
        """iBOT's settings: DINO's, and those of the masked-token loss."""

        mask_prob: float = 0.5
        """Probability that a global crop of an image is masked at all."""
        mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
        """Range of the masked fraction of a masked crop, drawn uniformly per image (iBOT: [0.1, 0.5])."""
        mask_min_block: int = 4
        """Smallest block of the block masks, in tokens (BEiT's 16 is for a 14 x 14 grid)."""
        patch_weight: float = 1.0
        """Weight of the patch loss beside the DINO loss."""
        shared_head: bool = True
        """One head for the pooled features and the patch tokens (iBOT's default), or a second one."""
        center_momentum2: float = 0.9

        def __post_init__(self) -> None:
            super().__post_init__()
            require(0.0 <= self.mask_prob <= 1.0, "method.mask_prob", "in [0, 1]", self.mask_prob)
            require(len(self.mask_ratio) == 2 and 0.0 < self.mask_ratio[0] <= self.mask_ratio[1] < 1.0,
                    "method.mask_ratio", "[lo, hi] with 0 < lo <= hi < 1", self.mask_ratio)
            require(self.mask_min_block >= 1, "method.mask_min_block", ">= 1", self.mask_min_block)
            require(self.patch_weight >= 0, "method.patch_weight", ">= 0", self.patch_weight)
            require(0.0 <= self.center_momentum2 < 1.0, "method.center_momentum2", "in [0, 1)",
                    self.center_momentum2)

    mask_kind = "token_mask"

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """DINO's student and teacher, a learned mask token, and a patch head (shared by default)."""
        super().__init__(encoder, cfg)
        # Only a backbone that puts the token in place of patch embeddings (the ViT) gets one; the
        # CvT hides the pixels instead, and an unused parameter would stall DDP.
        self.mask_token = None
        if getattr(encoder, "uses_mask_token", False):
            self.mask_token = nn.Parameter(torch.zeros(encoder.num_features))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        if not cfg.shared_head:
            self.patch_head = DINOHead(encoder.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                                       cfg.norm_last_layer)
            self.teacher_patch_head = frozen_copy(self.patch_head)
        self.center2 = make_centering(cfg.centering, cfg.out_dim, cfg.center_momentum2, ndim=3,
                                      iterations=cfg.sinkhorn_iterations)

    def teacher_pairs(self) -> list[Pair]:
        """DINO's pairs and, when there is one, the separate patch head's."""
        extra = [] if self.cfg.shared_head else [(self.patch_head, self.teacher_patch_head)]
        return super().teacher_pairs() + extra

    def centers(self) -> list[nn.Module]:
        """DINO's centre of the pooled logits and the centre of the patch tokens' logits."""
        return [self.center, self.center2]

    def _heads(self, teacher: bool) -> tuple[DINOHead, DINOHead]:
        """The (pooled, patch) heads of the student or of the teacher."""
        if teacher:
            return self.teacher_head, self.teacher_head if self.cfg.shared_head else self.teacher_patch_head
        return self.head, self.head if self.cfg.shared_head else self.patch_head

    def draw_masks(self, n: int, height: int, width: int) -> torch.Tensor:
        """``[n, height * width]`` bool block masks: each image masked with probability ``mask_prob``,
        at a ratio uniform in ``mask_ratio``, from the global RNG (checkpointed by the engine).
        """
        return block_masks(n, height, width, self.cfg.mask_ratio, mask_prob=self.cfg.mask_prob,
                           min_block=self.cfg.mask_min_block)

    def _encode(self, encoder: nn.Module, x: torch.Tensor, mask: TokenMask | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled [N, D], patch tokens [N, L, D])`` of images through ``encoder``."""
        tokens = encoder.forward_features(x, mask)
        return encoder.forward_head(tokens, pre_logits=True), tokens[:, encoder.num_prefix_tokens:]

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """DINO's loss over every view plus the patch loss over the masked global crops."""
        views = self.multi_crop_views(batch)
        g, c = self.cfg.global_views, self.cfg
        n = views[0].shape[0]
        grid = self.encoder.grid_size(*views[0].shape[-2:])
        masks = self.draw_masks(g * n, *grid).to(views[0].device)  # [G*N, L]
        global_x = torch.cat(views[:g])
        # the teacher: unmasked global crops, pooled and patch logits
        with torch.no_grad():
            t_pooled, t_tokens = self._encode(self.teacher_encoder, global_x)
            head, patch_head = self._heads(teacher=True)
            t_logits = head(t_pooled).float()  # [G*N, K]
            t_patch = patch_head(t_tokens).float()  # [G*N, L, K]
        temp = self.teacher_temp(float(self.progress))
        t_probs = self.center.probs(t_logits, temp)
        t_patch_probs = self.center2.probs(t_patch, temp)
        # the student: masked global crops (pooled and patch logits), unmasked local crops (pooled)
        head, patch_head = self._heads(teacher=False)
        s_pooled, s_tokens = self._encode(self.encoder, global_x, TokenMask(masks, self.mask_token))
        s_global = head(s_pooled)
        s_patch = patch_head(s_tokens)
        s_logits = list(s_global.chunk(g)) + self.student_logits(views[g:])
        loss_cls = dino_loss(s_logits, list(t_probs.chunk(g)), c.student_temp)
        loss_patch = ibot_patch_loss(list(s_patch.chunk(g)), list(t_patch_probs.chunk(g)), list(masks.chunk(g)),
                                     c.student_temp)
        loss = loss_cls + c.patch_weight * loss_patch
        logs = self._logs(loss_cls, t_probs, temp)
        logs.update(loss_cls=float(loss_cls.detach()), loss_patch=float(loss_patch.detach()),
                    masked=float(masks.float().mean()),
                    **{f"center2_{k}": v for k, v in self.center2.log_norm().items()})
        loss = self.add_koleo(loss, logs, s_pooled.chunk(g))
        if self.training:
            self.center.add(t_logits)
            self.center2.add(t_patch.mean(1))  # [G*N, K]: per-image means of the patch logits
        return PretrainOutput(loss, logs, None, masks[:n].float())

    def frozen_heads(self) -> list[DINOHead]:
        """DINO's head and, when there is one, the separate patch head."""
        return [self.head] + ([] if self.cfg.shared_head else [self.patch_head])


__all__ = ["IBOT", "ibot_patch_loss"]
