"""Supervised fine-tuning: the encoder plus a linear head, trained with cross-entropy on the labels.

The recipe of He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022, App. A.3)
and Bao et al., "BEiT: BERT Pre-Training of Image Transformers" (ICLR 2022): layer-wise lr decay
(timm's ``param_groups_layer_decay``, by the backbone's ``group_matcher``), label smoothing, Mixup
(Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) through timm's ``Mixup``, and drop path
set on the backbone. Partial fine-tuning trains only the last ``trainable_blocks`` parameter groups
of the backbone (0 = a linear head on the frozen encoder), as He et al. (Sec. 4.3) do. An optional
exponential moving average of the weights (timm's ``ModelEmaV3``; Polyak and Juditsky, "Acceleration
of stochastic approximation by averaging", 1992) is kept in the checkpoint and scored beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.models import group_parameters
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn

from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.schema import require


class FineTune(PretrainMethod):
    """An encoder and a linear classifier on its pooled features.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=2, num_heads=2)
        >>> model = FineTune(enc, FineTune.Config(num_classes=10))
        >>> out = model(Batch(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])))
        >>> out.pred.shape  # logits
        torch.Size([4, 10])

    """

    #: Any backbone: the classifier reads ``forward_features`` / ``forward_head`` only.
    mask_kind = None

    @dataclass
    class Config(MethodConfig):
        """Fine-tuning settings (``method:`` in a fine-tuning config)."""

        num_classes: int = 0
        """Classes of the head; 0 = taken from the labelled dataset when the run is set up."""
        layer_decay: float = 0.75
        """lr of a parameter group = lr x layer_decay^(groups above it, the head counted); 1 = no decay."""
        trainable_blocks: int = -1
        """Train only the last k parameter groups of the backbone (-1 = all, 0 = the head alone)."""
        label_smoothing: float = 0.1
        mixup: float = 0.0
        """Mixup alpha; 0 = off."""
        cutmix: float = 0.0
        """CutMix alpha; 0 = off."""
        head_init_std: float = 2e-5
        """Std of the head's initial weights (MAE's fine-tuning uses 2e-5: the head starts near 0)."""
        ema_decay: float = 0.0
        """Decay of an exponential moving average of the weights, per step (0 = off); the first two
        steps copy the weights. Pick it by the run's length: the average spans about 1/(1-decay) steps."""

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.num_classes >= 0, "method.num_classes", ">= 0 (0 = from the dataset)", self.num_classes)
            require(0.0 < self.layer_decay <= 1.0, "method.layer_decay", "in (0, 1]", self.layer_decay)
            require(self.trainable_blocks >= -1, "method.trainable_blocks", ">= -1 (-1 = all)",
                    self.trainable_blocks)
            require(0.0 <= self.label_smoothing < 1.0, "method.label_smoothing", "in [0, 1)", self.label_smoothing)
            require(self.mixup >= 0 and self.cutmix >= 0, "method.mixup and method.cutmix", ">= 0",
                    (self.mixup, self.cutmix))
            require(self.head_init_std > 0, "method.head_init_std", "positive", self.head_init_std)
            require(0.0 <= self.ema_decay < 1.0, "method.ema_decay", "in [0, 1) (0 = off)", self.ema_decay)

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """Put a linear head on ``encoder``'s pooled features and freeze what ``trainable_blocks`` leaves out."""
        super().__init__()
        if cfg.num_classes < 1:
            raise ConfigError("method.num_classes must be set (>= 1) before the classifier is built; "
                              "mimkit finetune takes it from the dataset")
        self.encoder, self.cfg = encoder, cfg
        self.head = nn.Linear(encoder.num_features, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(self.head.bias)
        self.groups = group_parameters(encoder, encoder.group_matcher())
        if cfg.trainable_blocks > len(self.groups):
            raise ConfigError(f"method.trainable_blocks {cfg.trainable_blocks} is more than the "
                              f"{len(self.groups)} parameter groups of this backbone; use -1 for all, or "
                              f"0 to {len(self.groups)}")
        if cfg.trainable_blocks >= 0:
            frozen_ids = sorted(self.groups)[: len(self.groups) - cfg.trainable_blocks]
            frozen = {name for i in frozen_ids for name in self.groups[i]}
            for name, p in encoder.named_parameters():
                p.requires_grad_(name not in frozen)
        # A copy of encoder and head; the live weights are averaged into it after every step.
        self.ema = ModelEmaV3(self._live(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        if self.ema is not None:
            # timm's copy keeps requires_grad; DDP would then wait for gradients that never come.
            self.ema.requires_grad_(False)
        self.mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                            num_classes=cfg.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)

    def train(self, mode: bool = True) -> FineTune:
        """Train mode, except that a frozen BatchNorm keeps its statistics (frozen means frozen)."""
        super().train(mode)
        for m in self.encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        if self.ema is not None:
            self.ema.module.eval()
        return self

    def _live(self) -> nn.ModuleDict:
        return nn.ModuleDict({"encoder": self.encoder, "head": self.head})

    def logits(self, images: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """Class scores ``[N, num_classes]`` of normalised images ``[N, C, H, W]``.

        Args:
            images: ``[N, C, H, W]``.
            ema: Score with the moving average of the weights (``method.ema_decay`` > 0) instead.

        """
        if ema and self.ema is None:
            raise ConfigError("this fine-tuning keeps no weight average: set method.ema_decay > 0")
        encoder, head = (self.ema.module["encoder"], self.ema.module["head"]) if ema else (self.encoder, self.head)
        return head(encoder.forward_head(encoder.forward_features(images), pre_logits=True))

    def after_step(self, step: int, total_steps: int) -> None:
        """Fold the weights just updated into their moving average (when one is kept)."""
        if self.ema is not None:
            self.ema.update(self._live(), step=step)

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Cross-entropy of the head's logits against the labels (mixed, in training, when asked).

        Args:
            batch: A :class:`~mimkit.data.Batch` with ``labels [N]`` in ``[0, num_classes)``.

        Returns:
            ``PretrainOutput`` with ``pred`` the logits ``[N, num_classes]`` and ``logs["acc"]``, the
            batch's top-1 against the unmixed labels.

        """
        batch = Batch.of(batch)
        if batch.labels is None or bool((batch.labels < 0).any()):
            raise ConfigError("fine-tuning needs labels: the dataset has unlabelled images")
        images, labels = batch.images, batch.labels
        # timm's Mixup pairs image i with image N-1-i: an odd batch (a streamed one that lost an
        # unreadable image) is trained unmixed.
        if self.training and self.mixup is not None and images.shape[0] % 2 == 0:
            images, target = self.mixup(images, labels)  # soft targets [N, num_classes], smoothed
            logits = self.logits(images)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self.logits(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return PretrainOutput(loss=loss, logs={"acc": acc}, pred=logits)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Timm's layer-wise decay groups for the encoder (``lr_scale`` per group), the head at scale 1."""
        skip = set(self.encoder.no_weight_decay()) if hasattr(self.encoder, "no_weight_decay") else set()
        groups = param_groups_layer_decay(self.encoder, weight_decay, no_weight_decay_list=skip,
                                          layer_decay=self.cfg.layer_decay)
        for g in groups:
            g.pop("param_names", None)  # names are not needed, and keep the optimizer state small
            # timm puts the top encoder group at scale 1; in MAE's and BEiT's recipe the head is the
            # top layer, so every encoder group sits one decay step below it.
            g["lr_scale"] *= self.cfg.layer_decay
        head = [{"params": [self.head.weight], "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": [self.head.bias], "weight_decay": 0.0, "lr_scale": 1.0}]
        return [g for g in groups if g["params"]] + head


__all__ = ["FineTune"]
