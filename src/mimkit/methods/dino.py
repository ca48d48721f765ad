"""DINO: self-distillation with no labels, a student against an EMA teacher over multi-crop views.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.

The student sees every view (two global crops and several small local ones), the teacher only the
global crops. The loss is the cross-entropy between the teacher's centred, sharpened distribution
over ``out_dim`` prototypes and the student's, for every pair of a teacher global crop and a
different student view. The teacher is an exponential moving average of the student (momentum on a
cosine to 1); the centre is a moving average of the teacher's logits. Every schedule is a function
of the progress ``step / total_steps`` the engine reports, and every piece of state (centre, step,
progress) is a buffer, so a resumed run continues bit for bit.

The optional KoLeo term spreads the student's pooled features of each global crop over the batch
(Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019; as in Oquab et al.,
"DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024); iBOT inherits it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.data.views import expand_views
from mimkit.methods.base import MethodConfig, PretrainOutput
from mimkit.methods.centering import CENTERINGS, make_centering
from mimkit.methods.heads import DINOHead
from mimkit.methods.losses import koleo_loss
from mimkit.methods.teacher import Pair, TeacherStudent, cosine_momentum, frozen_copy
from mimkit.schema import check_positive, require

log = logging.getLogger(__name__)


def dino_views(global_size: int = 0, local_size: int = 12, local_count: int = 6) -> list[dict[str, Any]]:
    """DINO's multi-crop views scaled to small grey images (``0``: ``data.img_size``).

    Two global crops of 40-100 % of the image and ``local_count`` local crops of 10-40 %, all with
    flips and brightness/contrast jitter (p 0.8); grey conversion p 0.2 (it does nothing to grey
    images); solarisation p 0.2 on the second global crop only. Blur is off: at 28 px a sigma of
    0.1-2 px removes most of the image, and the small-image recipes (lightly, solo-learn) drop it.
    """
    colour = {"hflip": 0.5, "jitter": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1,
              "grayscale": 0.2}
    return [{"size": global_size, "scale": [0.4, 1.0], **colour},
            {"size": global_size, "scale": [0.4, 1.0], **colour, "solarize": 0.2},
            {"size": local_size, "scale": [0.1, 0.4], "count": local_count, **colour}]


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """DINO's cross-entropy, averaged over every (teacher global ``i``, student view ``v != i``) pair.

    Args:
        student: One ``[N, K]`` logit tensor per view, the global views first.
        teacher: One ``[N, K]`` probability tensor per global view (centred and sharpened).
        student_temp: The student's softmax temperature.

    Returns:
        The scalar loss (float32).

    Example:
        >>> t = [torch.full((2, 4), 0.25)] * 2
        >>> round(float(dino_loss([torch.zeros(2, 4)] * 3, t, 0.1)), 4)  # log 4
        1.3863

    """
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    terms = [-(t * log_p[v]).sum(-1).mean() for i, t in enumerate(teacher) for v in range(len(log_p)) if v != i]
    return torch.stack(terms).mean()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


class DINO(TeacherStudent):
    """Student encoder + DINO head against an EMA teacher copy; evaluation reads the teacher's encoder.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
        >>> dino = DINO(enc, DINO.Config(out_dim=64, hidden_dim=32, bottleneck_dim=16))
        >>> views = [torch.randn(2, 1, 28, 28)] * 2 + [torch.randn(2, 1, 12, 12)] * 6
        >>> out = dino(Batch(views[0], None, tuple(views)))
        >>> out.loss.ndim, sorted(out.logs)[:3]
        (0, ['center_norm', 'kl', 'momentum'])

    """

    @dataclass
    class Config(MethodConfig):
        """DINO's settings (``method:`` in a config); the defaults are for 28-32 px images on a CPU."""

        views: list[dict[str, Any]] = field(default_factory=dino_views)
        global_views: int = 2
        """How many of the first views are global crops (the teacher's inputs)."""
        out_dim: int = 1024
        """Prototypes K (DINO: 65536 at ImageNet scale; 1024-4096 for small datasets)."""
        hidden_dim: int = 512
        bottleneck_dim: int = 128
        norm_last_layer: bool = True
        """Fix the last layer's weight-norm gain to 1 (cosine logits)."""
        student_temp: float = 0.1
        teacher_temp: float = 0.04
        """The teacher's temperature at the start; it rises linearly to ``teacher_temp_final``."""
        teacher_temp_final: float = 0.07
        teacher_temp_warmup: float = 0.1
        """Fraction of the schedule over which the teacher temperature rises."""
        center_momentum: float = 0.9
        centering: str = "center"
        """How the teacher's logits become targets: ``center`` (DINO's moving centre) or ``sinkhorn_knopp``
        (DINOv2's balanced assignments over the batch)."""
        sinkhorn_iterations: int = 3
        momentum: float = 0.996
        """Teacher EMA momentum at the start; it follows a cosine to 1 over the schedule."""
        freeze_last_layer: float = 0.05
        """Fraction of the schedule during which the head's last layer is not updated (DINO: its first
        epoch, 1 % of 100 epochs; more for the few epochs of a CPU run)."""
        weight_decay_end: float = 0.4
        """Weight decay at the end of a cosine from ``optim.weight_decay`` (DINO: 0.04 to 0.4)."""
        collapse_check_every: int = 100
        """Steps between collapse checks (after the temperature warm-up; at most ``total_steps / 20``); a
        collapse is logged as a warning."""
        koleo_weight: float = 0.0
        """Weight of KoLeo on the student's pooled global-crop features (DINOv2: 0.1; 0 = off)."""

        num_views: ClassVar[int | None] = None

        def __post_init__(self) -> None:
            super().__post_init__()
            check_positive("method", out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                           bottleneck_dim=self.bottleneck_dim, student_temp=self.student_temp,
                           teacher_temp=self.teacher_temp, teacher_temp_final=self.teacher_temp_final,
                           collapse_check_every=self.collapse_check_every,
                           sinkhorn_iterations=self.sinkhorn_iterations)
            require(self.centering in CENTERINGS, "method.centering", f"one of {', '.join(CENTERINGS)}",
                    self.centering)
            views = expand_views(self.view_specs)
            n = len(views)
            require(1 <= self.global_views < n, "method.global_views",
                    f"at least 1 and fewer than the {n} views of method.views (the student needs another view)",
                    self.global_views)
            sizes = {s.size for s in views[: self.global_views]}
            require(len(sizes) == 1, "method.views", "global views (the first method.global_views) of one size",
                    sorted(sizes))
            require(0.0 <= self.teacher_temp_warmup <= 1.0, "method.teacher_temp_warmup", "in [0, 1]",
                    self.teacher_temp_warmup)
            require(0.0 <= self.center_momentum < 1.0, "method.center_momentum", "in [0, 1)", self.center_momentum)
            require(0.0 <= self.momentum <= 1.0, "method.momentum", "in [0, 1]", self.momentum)
            require(0.0 <= self.freeze_last_layer <= 1.0, "method.freeze_last_layer", "in [0, 1]",
                    self.freeze_last_layer)
            require(self.weight_decay_end >= 0, "method.weight_decay_end", ">= 0", self.weight_decay_end)
            require(self.koleo_weight >= 0, "method.koleo_weight", ">= 0 (0 = off)", self.koleo_weight)

    mask_kind = None
    eval_module_name = "teacher_encoder"

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """Student ``encoder`` + head, and a teacher copy of both that never takes a gradient."""
        super().__init__()
        self.check_encoder(encoder)
        self.cfg = cfg
        self.encoder = encoder
        self.head = DINOHead(encoder.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                             cfg.norm_last_layer)
        self.teacher_encoder = frozen_copy(encoder)
        self.teacher_head = frozen_copy(self.head)
        self.center = make_centering(cfg.centering, cfg.out_dim, cfg.center_momentum,
                                     iterations=cfg.sinkhorn_iterations)
        self.add_schedule_state()
        # The teacher's entropies on the last micro-batch, which the collapse check after the step reads.
        self._entropies: tuple[float, float] | None = None

    def teacher_pairs(self) -> list[Pair]:
        """The ``(student, teacher)`` modules the EMA moves: the encoder and the head."""
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    # ---- schedules: pure functions of the progress ----

    def teacher_temp(self, progress: float) -> float:
        """The teacher's temperature: linear from ``teacher_temp`` to ``teacher_temp_final`` over the warm-up."""
        c = self.cfg
        if c.teacher_temp_warmup <= 0 or progress >= c.teacher_temp_warmup:
            return c.teacher_temp_final
        return c.teacher_temp + (c.teacher_temp_final - c.teacher_temp) * progress / c.teacher_temp_warmup

    def momentum(self, progress: float) -> float:
        """The teacher's EMA momentum: a cosine from ``momentum`` to 1."""
        return cosine_momentum(progress, self.cfg.momentum)

    # ---- the forward pass ----

    @staticmethod
    def _by_size(views: tuple[torch.Tensor, ...]) -> list[list[int]]:
        """Indices of consecutive views of one resolution, so that each group is one forward pass."""
        groups: list[list[int]] = []
        for i, v in enumerate(views):
            if groups and views[groups[-1][0]].shape[-2:] == v.shape[-2:]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, D]``: the backbone's own pooling (the ViT's as configured, the CvT's mean)."""
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)

    def student_outputs(self, views: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The student's pooled features ``[N, D]`` and logits ``[N, K]`` for every view, one forward pass
        per resolution.
        """
        feats: list[torch.Tensor] = [torch.empty(0)] * len(views)
        logits: list[torch.Tensor] = [torch.empty(0)] * len(views)
        for group in self._by_size(views):
            f = self._features(self.encoder, torch.cat([views[i] for i in group]))
            out = self.head(f)
            for i, f_i, out_i in zip(group, f.chunk(len(group)), out.chunk(len(group)), strict=True):
                feats[i], logits[i] = f_i, out_i
        return feats, logits

    def student_logits(self, views: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The student's ``[N, K]`` logits for every view, one forward pass per resolution."""
        return self.student_outputs(views)[1]

    @torch.no_grad()
    def teacher_logits(self, global_views: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The teacher's float32 logits ``[G * N, K]`` of the global views (in view order)."""
        feats = self._features(self.teacher_encoder, torch.cat(global_views))
        return self.teacher_head(feats).float()

    def multi_crop_views(self, batch: Batch | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch's views, checked: ``global_views`` global crops first and at least one more."""
        views = Batch.of(batch).all_views
        g = self.cfg.global_views
        if len(views) <= g:
            raise ValueError(f"{type(self).__name__} needs {g} global views and at least one more, got "
                             f"{len(views)} (the loader builds them from method.views)")
        return views

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """The DINO loss of a batch of multi-crop views (``batch.views``; the global ones first)."""
        views = self.multi_crop_views(batch)
        g = self.cfg.global_views
        t_logits = self.teacher_logits(views[:g])  # [G*N, K]
        temp = self.teacher_temp(float(self.progress))
        t_probs = self.center.probs(t_logits, temp)
        s_feats, s_logits = self.student_outputs(views)
        loss = dino_loss(s_logits, list(t_probs.chunk(g)), self.cfg.student_temp)
        if self.training:
            self.center.add(t_logits)
        logs = self._logs(loss, t_probs, temp)
        return PretrainOutput(self.add_koleo(loss, logs, s_feats[:g]), logs)

    def add_koleo(self, loss: torch.Tensor, logs: dict[str, float], global_feats: Sequence[torch.Tensor]
                  ) -> torch.Tensor:
        """``loss`` plus ``koleo_weight`` x the KoLeo term of the student's global crops (``loss`` itself at 0).

        The term is one :func:`~mimkit.methods.losses.koleo_loss` per global crop over the batch, summed
        (DINOv2's ``KoLeoLoss``, here on each crop's pooled feature: the class token or the token mean);
        it is logged as ``loss_koleo``.

        Args:
            loss: The method's loss so far.
            logs: The step's logs, to which ``loss_koleo`` is added.
            global_feats: One ``[N, D]`` tensor of the student's pooled features per global crop.

        Returns:
            The loss with the weighted KoLeo term.

        """
        if self.cfg.koleo_weight <= 0:
            return loss
        loss_koleo = torch.stack([koleo_loss(f) for f in global_feats]).sum()
        logs["loss_koleo"] = float(loss_koleo.detach())
        return loss + self.cfg.koleo_weight * loss_koleo

    @torch.no_grad()
    def _logs(self, loss: torch.Tensor, t_probs: torch.Tensor, temp: float) -> dict[str, float]:
        """Teacher entropy (per image and of the batch mean) as fractions of log K, KL, centre and schedules."""
        log_k = math.log(self.cfg.out_dim)
        entropy = float(_entropy(t_probs).mean())
        logs = {
            "teacher_entropy": entropy / log_k,
            "teacher_marginal_entropy": float(_entropy(t_probs.mean(0))) / log_k,
            "kl": float(loss.detach()) - entropy,
            **{f"center_{k}": v for k, v in self.center.log_norm().items()},
            "teacher_temp": temp,
            "momentum": self.momentum(float(self.progress)),
        }
        if self.training:
            self._entropies = (logs["teacher_entropy"], logs["teacher_marginal_entropy"])
        return logs

    # ---- the per-step hooks ----

    def frozen_heads(self) -> list[DINOHead]:
        """The student heads whose last layer the freeze holds (iBOT adds its patch head)."""
        return [self.head]

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """While the last layer is frozen, drop its gradients: AdamW then leaves it alone entirely
        (DINO's ``cancel_gradients_last_layer``; the gradients were all-reduced already).
        """
        if step < self.cfg.freeze_last_layer * total_steps:
            for head in self.frozen_heads():
                for p in head.last_layer_params():
                    p.grad = None

    def centers(self) -> list[nn.Module]:
        """The centrings of the teacher's outputs (iBOT adds its patch centre)."""
        return [self.center]

    def discard_step(self) -> None:
        """A skipped step's teacher outputs never reach a centre."""
        for center in self.centers():
            center.discard()

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Apply the centre updates, move the teacher towards the student, advance the schedules."""
        for center in self.centers():
            center.update()
        self.advance_teacher(step, total_steps)
        self._check_collapse(step, total_steps)

    def _check_collapse(self, step: int, total_steps: int) -> None:
        """Warn, with what to change, when the teacher's outputs have collapsed (after the warm-up).

        The check runs every ``collapse_check_every`` steps, or twenty times in a shorter run.
        """
        every = max(1, min(self.cfg.collapse_check_every, total_steps // 20))
        if self._entropies is None or (step + 1) % every or float(self.progress) < self.cfg.teacher_temp_warmup:
            return
        h, marginal = self._entropies
        if h > 0.98:
            log.warning("step %d: DINO collapse: the teacher's outputs are uniform (entropy %.3f of log K); "
                        "centring dominates sharpening: lower method.teacher_temp_final, or raise "
                        "method.center_momentum", step + 1, h)
        elif marginal < 0.1:
            log.warning("step %d: DINO collapse: one prototype takes every image (entropy of the batch mean "
                        "%.3f of log K); sharpening dominates centring: lower method.center_momentum, raise "
                        "method.teacher_temp_final, or lower optim.base_lr", step + 1, marginal)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The base split of the student's parameters; the decayed group follows DINO's cosine to
        ``weight_decay_end``.
        """
        groups = super().param_groups(weight_decay)
        for group in groups:
            if group["weight_decay"] > 0:
                group["weight_decay_end"] = self.cfg.weight_decay_end
        return groups


__all__ = ["DINO", "dino_loss", "dino_views"]
