"""data2vec: a masked student regresses the EMA teacher's averaged top-block representations.

Baevski et al., "data2vec: A General Framework for Self-supervised Learning in Speech, Vision and
Language", ICML 2022 (its vision recipe, as in facebookresearch/data2vec_vision).

The student sees the image with BEiT block masks (about 60 % of the patches; a masked patch
embedding is replaced by a learned mask token on the ViT, its pixels hidden on the CvT); the teacher,
an exponential moving average of the student's encoder, sees the whole image. The target of each
patch is the average of the teacher's top K block outputs, each through a parameter-free LayerNorm
(the vision default), then a parameter-free LayerNorm of the average. A linear head on the student's
masked tokens regresses it with a smooth L1 loss (beta 2) scaled by ``1 / sqrt(D)``. The teacher's
decay rises linearly from ``momentum`` to ``momentum_end`` over the first ``momentum_anneal`` of the
schedule, then stays. On a hierarchical backbone (the CvT) the targets come from its last stage:
stages differ in width and resolution, so only the last is a target of the student's output tokens.
``target_layer=ffn`` takes each block's feed-forward output before the residual connection instead
(data2vec 2.0's choice; on the CvT, of the top K blocks of the last stage).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.masking import TokenMask, block_masks
from mimkit.methods.base import MethodConfig, PretrainOutput
from mimkit.methods.teacher import Pair, TeacherStudent, frozen_copy, linear_momentum
from mimkit.schema import check_positive, require

log = logging.getLogger(__name__)

#: What of each of the teacher's top blocks a target averages (``RegressionConfig.target_layer``).
TARGET_LAYERS = ("block", "ffn")


@contextmanager
def recorded_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the output of each of ``modules``, in call order, during the forwards inside the block.

    Example:
        >>> lin = nn.Linear(2, 3)
        >>> with recorded_outputs([lin]) as outs:
        ...     _ = lin(torch.zeros(4, 2))
        >>> [tuple(o.shape) for o in outs]
        [(4, 3)]

    """
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _module, _args, out: outputs.append(out)) for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """The mean over features of the standard deviation over rows of ``x [..., D]``, in float32.

    data2vec's collapse guard: near 0 when every token's target (or prediction) is the same.
    """
    x = x.float().reshape(-1, x.shape[-1])
    return torch.sqrt(x.var(dim=0) + 1e-6).mean() if x.shape[0] > 1 else x.new_zeros(())


def warn_if_collapsed(method: str, step: int, total_steps: int, stds: tuple[float, float] | None,
                      cfg: RegressionConfig) -> None:
    """Warn, with what to change, when the targets or the predictions stopped varying (fairseq's
    ``min_target_var`` / ``min_pred_var`` guards, as a warning rather than an abort).

    The check runs every ``cfg.collapse_check_every`` steps, or twenty times in a shorter run, on the
    feature stds ``(target, prediction)`` of the step's last micro-batch.
    """
    every = max(1, min(cfg.collapse_check_every, total_steps // 20))
    if stds is None or (step + 1) % every:
        return
    target_std, pred_std = stds
    if target_std < cfg.min_target_var:
        log.warning("step %d: %s collapse: the teacher's targets hardly vary (feature std %.4f < "
                    "method.min_target_var %g); lower optim.base_lr, raise method.top_k or method.momentum",
                    step + 1, method, target_std, cfg.min_target_var)
    elif pred_std < cfg.min_pred_var:
        log.warning("step %d: %s collapse: the student predicts one vector (feature std %.4f < "
                    "method.min_pred_var %g); lower optim.base_lr or change method.mask_ratio",
                    step + 1, method, pred_std, cfg.min_pred_var)


def layer_targets(blocks: list[torch.Tensor]) -> torch.Tensor:
    """data2vec's vision target: each block output ``[N, L, D]`` through a parameter-free LayerNorm,
    averaged over the blocks, then a parameter-free LayerNorm again; float32 ``[N, L, D]``.
    """
    normed = [F.layer_norm(b.float(), b.shape[-1:]) for b in blocks]
    average = torch.stack(normed).mean(0)
    return F.layer_norm(average, average.shape[-1:])


def regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth L1 (``beta``) summed over the features and scaled by ``1 / sqrt(D)``, averaged over tokens.

    Args:
        pred: ``[M, D]`` predictions of the masked tokens.
        target: ``[M, D]`` targets.
        beta: Where smooth L1 turns from quadratic to linear (data2vec's vision recipe: 2).

    Returns:
        The scalar loss in float32 (0 when no token is masked).

    """
    if pred.shape[0] == 0:
        return pred.float().sum() * 0.0
    per_token = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).sum(-1)
    return per_token.mean() / math.sqrt(pred.shape[-1])


@dataclass
class RegressionConfig(MethodConfig):
    """The settings data2vec and data2vec 2.0 share: the targets' depth, the teacher's decay, the collapse guard."""

    top_k: int = 0
    """How many of the teacher's last blocks are averaged into the target (0: the top half; data2vec
    ViT-B: 6 of 12, data2vec 2.0: 10 of 12). On the CvT with ``target_layer=block`` the last stage's
    output is the target whatever this is; with ``ffn``, K counts the last stage's blocks."""
    momentum: float = 0.99
    """The teacher's decay at the start. data2vec's 0.999-0.9998 (and data2vec 2.0's 0.9998-0.99999)
    have horizons of thousands of steps, a whole CPU budget, which would leave the teacher near its
    random start; 0.99 to 0.999 over the run follows the student within a few hundred steps."""
    momentum_end: float = 0.999
    momentum_anneal: float = 1.0
    """Fraction of the schedule over which the decay rises linearly to ``momentum_end``."""
    min_target_var: float = 0.1
    """Below this feature std of the targets the run log warns of a collapse (fairseq's
    ``min_target_var``); so does a prediction std below ``min_pred_var``."""
    min_pred_var: float = 0.01
    collapse_check_every: int = 100
    target_layer: str = "block"
    """What of each top block the target averages: ``block``, its output (the residual stream, as
    data2vec's vision code takes it), or ``ffn``, its feed-forward output before the residual
    connection (data2vec 2.0's ``end_of_block_targets: false``). On the CvT ``block`` is the last
    stage's output and ``ffn`` the feed-forward outputs of the top K blocks of its last stage."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.top_k >= 0, "method.top_k", ">= 0 (0 = the top half of the blocks)", self.top_k)
        check_positive("method", collapse_check_every=self.collapse_check_every)
        require(self.target_layer in TARGET_LAYERS, "method.target_layer", " or ".join(TARGET_LAYERS),
                self.target_layer)
        for key in ("momentum", "momentum_end", "momentum_anneal"):
            require(0.0 <= getattr(self, key) <= 1.0, f"method.{key}", "in [0, 1]", getattr(self, key))
        for key in ("min_target_var", "min_pred_var"):
            require(getattr(self, key) >= 0, f"method.{key}", ">= 0", getattr(self, key))


class EncoderTeacher(TeacherStudent):
    """The part data2vec and data2vec 2.0 share: an EMA copy of the encoder under a linear decay, the
    schedule's state in buffers, and the collapse guard after each step.

    A subclass calls :meth:`add_teacher` once its encoder is set, and records the step's feature stds
    ``(target, prediction)`` in ``self._stds`` during a training forward.
    """

    cfg: RegressionConfig
    #: The method's name in the collapse warning.
    title = "data2vec"

    def add_teacher(self) -> None:
        """A teacher copy of ``self.encoder`` that never takes a gradient, and the schedule's buffers."""
        self.teacher_encoder = frozen_copy(self.encoder)
        self.add_schedule_state()
        # The last micro-batch's feature stds, which the collapse check after the step reads.
        self._stds: tuple[float, float] | None = None

    def teacher_pairs(self) -> list[Pair]:
        """The ``(student, teacher)`` modules the EMA moves: the encoder (heads and decoders have no teacher)."""
        return [(self.encoder, self.teacher_encoder)]

    def momentum(self, progress: float) -> float:
        """The teacher's decay: linear from ``momentum`` to ``momentum_end``, then constant."""
        c = self.cfg
        return linear_momentum(progress, c.momentum, c.momentum_end, c.momentum_anneal)

    def target_blocks(self) -> Sequence[nn.Module]:
        """The teacher's blocks whose outputs can be targets: the ViT's, or the last stage's of a
        hierarchical backbone (its stages differ in width and resolution).
        """
        enc = self.teacher_encoder
        return enc.blocks if hasattr(enc, "blocks") else enc.stages[-1].blocks

    def top_blocks(self) -> int:
        """How many layers the target averages: the top K blocks, or the CvT's last stage as a whole."""
        if self.cfg.target_layer == "block" and not hasattr(self.teacher_encoder, "blocks"):
            return 1  # a hierarchical backbone's intermediates are stages
        depth = len(self.target_blocks())
        return min(depth, self.cfg.top_k or max(1, depth // 2))

    @torch.no_grad()
    def teacher_layers(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's patch tokens ``[N, L, D]`` of each layer the target averages, shallowest first,
        from one pass over the unmasked ``images`` (``cfg.target_layer`` says which output of a block).
        """
        enc, k = self.teacher_encoder, self.top_blocks()
        if self.cfg.target_layer == "block":
            return enc.forward_intermediates(images, k, norm=False, output_fmt="NLC", intermediates_only=True)
        blocks = self.target_blocks()
        # Hooks rather than a backbone option: timm's intermediates convention has no FFN outputs.
        with recorded_outputs([block.mlp for block in blocks[len(blocks) - k:]]) as outs:
            enc.forward_features(images)
        if len(outs) != k:
            raise RuntimeError(f"{type(enc).__name__}: expected one feed-forward output from each of the top {k} "
                               f"blocks in one teacher pass, got {len(outs)}; use method.target_layer=block")
        return [out[:, enc.num_prefix_tokens:] for out in outs]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Move the teacher towards the student, advance the schedule, check for a collapse."""
        self.advance_teacher(step, total_steps)
        warn_if_collapsed(self.title, step, total_steps, self._stds, self.cfg)


class Data2Vec(EncoderTeacher):
    """Student encoder + regression head against an EMA teacher's averaged layer targets.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=2, num_heads=2)
        >>> d2v = Data2Vec(enc, Data2Vec.Config())
        >>> out = d2v(torch.randn(2, 1, 28, 28))
        >>> out.loss.ndim, out.mask.shape, sorted(out.logs)[:2]
        (0, torch.Size([2, 49]), ['masked', 'momentum'])

    """

    @dataclass
    class Config(RegressionConfig):
        """data2vec's settings (``method:`` in a config); the defaults are for 28-32 px images on a CPU."""

        mask_ratio: float = 0.6
        """Fraction of the patches masked in blocks (data2vec: 120 of 196)."""
        mask_min_block: int = 4
        """Smallest block in tokens (BEiT's 16 is for a 14 x 14 grid)."""
        loss_beta: float = 2.0

        def __post_init__(self) -> None:
            super().__post_init__()
            require(0.0 < self.mask_ratio < 1.0, "method.mask_ratio", "in (0, 1)", self.mask_ratio)
            require(self.mask_min_block >= 1, "method.mask_min_block", ">= 1", self.mask_min_block)
            check_positive("method", loss_beta=self.loss_beta)

    mask_kind = "token_mask"

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """The student ``encoder``, a learned mask token where the backbone takes one, a linear head,
        and a teacher copy of the encoder that never takes a gradient.
        """
        super().__init__()
        self.check_encoder(encoder)
        self.cfg = cfg
        self.encoder = encoder
        # Only a backbone that puts the token in place of patch embeddings (the ViT) gets one; the
        # CvT hides the pixels instead, and an unused parameter would stall DDP.
        self.mask_token = None
        if getattr(encoder, "uses_mask_token", False):
            self.mask_token = nn.Parameter(torch.zeros(encoder.num_features))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.num_features, encoder.num_features)
        self.add_teacher()

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 targets ``[N, L, D]`` for every patch token of the unmasked ``images``."""
        return layer_targets(self.teacher_layers(images))

    def draw_masks(self, n: int, height: int, width: int) -> torch.Tensor:
        """``[n, height * width]`` bool BEiT block masks at ``mask_ratio``, from the global RNG."""
        return block_masks(n, height, width, self.cfg.mask_ratio, min_block=self.cfg.mask_min_block)

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """The regression loss of the student's masked tokens against the teacher's targets."""
        images = Batch.of(batch).images
        n = images.shape[0]
        masks = self.draw_masks(n, *self.encoder.grid_size(*images.shape[-2:])).to(images.device)  # [N, L]
        target = self.targets(images)  # [N, L, D]
        tokens = self.encoder.forward_features(images, TokenMask(masks, self.mask_token))
        pred = self.head(tokens[:, self.encoder.num_prefix_tokens:])  # [N, L, D]
        loss = regression_loss(pred[masks], target[masks], self.cfg.loss_beta)
        with torch.no_grad():
            target_std, pred_std = float(feature_std(target[masks])), float(feature_std(pred[masks]))
        if self.training:
            self._stds = (target_std, pred_std)
        logs = {"target_var": target_std, "pred_var": pred_std, "masked": float(masks.float().mean()),
                "momentum": self.momentum(float(self.progress))}
        return PretrainOutput(loss, logs, None, masks.float())


__all__ = ["TARGET_LAYERS", "Data2Vec", "EncoderTeacher", "RegressionConfig", "feature_std", "layer_targets",
           "recorded_outputs", "regression_loss", "warn_if_collapsed"]
