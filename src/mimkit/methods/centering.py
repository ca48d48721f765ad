"""How a teacher's logits become the targets of a self-distillation loss: centring or Sinkhorn-Knopp.

Both keep the teacher from collapsing to one prototype for every image. DINO subtracts a centre, a
moving average of the teacher's logits, before a sharp softmax (Caron et al., "Emerging Properties
in Self-Supervised Vision Transformers", ICCV 2021); iBOT keeps a second centre for its patch tokens
(Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022). DINOv2 normalises
the batch's assignments with a few Sinkhorn-Knopp iterations instead (Oquab et al., "DINOv2:
Learning Robust Visual Features without Supervision", TMLR 2024, after Caron et al., "Unsupervised
Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020).

One interface: :meth:`probs` gives the targets of a forward pass; in training the method
:meth:`~Center.add` s the teacher's logits of each micro-batch, and after the optimizer step
:meth:`~Center.update` applies them (summed over every rank), or :meth:`~Center.discard` drops them
when the engine skipped the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

#: The choices of ``method.centering``.
CENTERINGS = ("center", "sinkhorn_knopp")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Center(nn.Module):
    """A moving average of the teacher's logits, subtracted before its softmax.

    The logits added since the last optimizer step are summed outside the buffers: DDP broadcasts
    rank 0's buffers at every forward, which would drop the other ranks' sums between the
    micro-batches of an accumulated step. The centre itself is a buffer (``value``), so a resumed
    run continues from it.

    Args:
        dim: Prototypes K.
        momentum: Weight of the old centre in each update.
        ndim: Dimensions of the logits it centres (2: ``[N, K]``; 3: ``[N, L, K]`` patch tokens).

    Example:
        >>> c = Center(4, momentum=0.9)
        >>> c.add(torch.ones(2, 4)); c.update(); c.value
        tensor([[0.1000, 0.1000, 0.1000, 0.1000]])

    """

    def __init__(self, dim: int, momentum: float, ndim: int = 2) -> None:
        """A zero centre of shape ``[1, ..., 1, K]`` with ``ndim`` dimensions."""
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(*([1] * (ndim - 1)), dim))
        self._sum: torch.Tensor | None = None
        self._count = 0

    @staticmethod
    def upgrade_keys(state_dict: dict[str, Any], prefix: str) -> None:
        """Rename, in place, the key that checkpoints from before the centre had a module of its own
        used: the buffer was named after the centre (``center``, not ``center.value``).
        """
        old = prefix[:-1]
        if old and old in state_dict and prefix + "value" not in state_dict:
            state_dict[prefix + "value"] = state_dict.pop(old)

    def probs(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets ``softmax((logits - centre) / temp)`` of float32 logits ``[N, K]`` (or ``[N, L, K]``)."""
        return F.softmax((logits - self.value) / temp, dim=-1)

    def add(self, logits: torch.Tensor) -> None:
        """Add one micro-batch's teacher logits ``[M, K]`` (one row per image) to the step's sum."""
        total = logits.sum(0)
        self._sum = total if self._sum is None else self._sum + total
        self._count += logits.shape[0]

    @torch.no_grad()
    def update(self) -> None:
        """Move the centre towards the mean of the step's logits on every rank (nothing added: no change)."""
        if self._sum is None:
            return
        count = torch.tensor([float(self._count)], device=self.value.device)
        pending = torch.cat([self._sum.flatten().to(self.value.device), count])
        if _distributed():
            dist.all_reduce(pending)  # every rank's teacher outputs: one centre for the job
        m = self.momentum
        self.value.mul_(m).add_((pending[:-1] / pending[-1]).view_as(self.value), alpha=1 - m)
        self.discard()

    def discard(self) -> None:
        """Drop what was added since the last update (a skipped step's teacher outputs)."""
        self._sum, self._count = None, 0

    def log_norm(self) -> dict[str, float]:
        """The centre's norm, for the run log."""
        return {"norm": float(self.value.norm())}


class SinkhornKnopp(nn.Module):
    """Targets whose assignments to the K prototypes are balanced over the batch of every rank.

    A few Sinkhorn-Knopp iterations alternately normalise the prototypes' and the samples' mass of
    ``exp(logits / temp)``, so each prototype takes an equal share of the global batch and each
    sample's targets sum to 1. The iterations run on logarithms: at a teacher temperature of 0.04 a
    prototype far below the others would underflow to a zero column in ``exp`` and give 0 / 0. It
    keeps no state: :meth:`add`, :meth:`update` and :meth:`discard` do nothing. On iBOT's patch
    tokens it balances every token of the global crops (DINOv2 balances the masked ones only).

    Args:
        iterations: Sinkhorn-Knopp iterations (DINOv2: 3).

    Example:
        >>> p = SinkhornKnopp()(torch.randn(8, 4), 0.1)
        >>> p.shape, bool(p.sum(-1).allclose(torch.ones(8)))
        (torch.Size([8, 4]), True)

    """

    def __init__(self, iterations: int = 3) -> None:
        """Sinkhorn-Knopp with ``iterations`` rounds."""
        super().__init__()
        self.iterations = iterations

    @torch.no_grad()
    def probs(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Balanced float32 targets of logits ``[..., K]`` (every leading position is one sample)."""
        shape = logits.shape
        log_q = logits.float().reshape(-1, shape[-1]) / temp  # [B, K]
        samples = torch.tensor([float(log_q.shape[0])], device=log_q.device)
        if _distributed():
            dist.all_reduce(samples)
        log_k, log_b = math.log(shape[-1]), torch.log(samples)
        for _ in range(self.iterations):
            log_q = log_q - _logsumexp_over_ranks(log_q) - log_k  # each prototype: 1 / K of the mass
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # each sample: 1 / B
        return torch.exp(log_q + log_b).reshape(shape)

    forward = probs

    def add(self, logits: torch.Tensor) -> None:
        """Nothing to accumulate."""

    def update(self) -> None:
        """Nothing to update."""

    def discard(self) -> None:
        """Nothing to drop."""

    def log_norm(self) -> dict[str, float]:
        """Nothing to log."""
        return {}


def _logsumexp_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` of ``x [B, K]`` over the samples of every rank, ``[1, K]``."""
    top = x.max(0, keepdim=True).values
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    total = torch.exp(x - top).sum(0, keepdim=True)
    if _distributed():
        dist.all_reduce(total)
    return top + torch.log(total)


def make_centering(kind: str, dim: int, momentum: float, ndim: int = 2, iterations: int = 3) -> Center | SinkhornKnopp:
    """The targets' normalisation named by ``method.centering`` (one of :data:`CENTERINGS`)."""
    if kind == "center":
        return Center(dim, momentum, ndim)
    if kind == "sinkhorn_knopp":
        return SinkhornKnopp(iterations)
    raise ValueError(f"method.centering {kind!r} is unknown; valid: {', '.join(CENTERINGS)}")


__all__ = ["CENTERINGS", "Center", "SinkhornKnopp", "make_centering"]
