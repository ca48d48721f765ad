"""A vector quantiser with an exponential-moving-average codebook: the visual tokenizers' shared part.

A vector ``z`` becomes the index of its nearest code and is replaced by that code (van den Oord et
al., "Neural Discrete Representation Learning", NeurIPS 2017). The codebook is not trained by the
gradient but moved after every optimizer step towards the mean of the vectors each code was given
(the same paper's appendix; Razavi et al., "Generating Diverse High-Fidelity Images with VQ-VAE-2",
NeurIPS 2019), with Laplace-smoothed counts so that an unused code does not divide by zero. Against
the codebook collapse small datasets show (BEiT v2's maintainers report it), it has the two usual
remedies: the codebook starts as k-means centroids of the first training batch (seeded as k-means++:
Arthur and Vassilvitskii, "k-means++: The Advantages of Careful Seeding", SODA 2007), and a code whose
average use falls below ``dead_threshold`` restarts at a random vector of the step's batch
(Dhariwal et al., "Jukebox: A Generative Model for Music", 2020). ``normalize`` quantises on the
unit sphere, nearest by cosine, as BEiT v2's VQ-KD does (Peng et al., "BEiT v2: Masked Image
Modeling with Vector-Quantized Visual Tokenizers", 2022).

Like a teacher's centre (:mod:`mimkit.methods.centering`), the vectors of the micro-batches of a
step are summed outside the buffers and applied once after the optimizer step, summed over every
rank, or dropped when the engine skips the step. The codebook, its counts and sums are buffers, so a
resumed run continues from them; the random choices (k-means seeds, restarts) come from the global
RNG, which a checkpoint holds, drawn on rank 0 and shared. Distances and averages are computed in
float32 with autocast off: in bf16 near ties would pick other codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows [M_r, C]`` concatenated in rank order (the ranks' counts may differ: a rank
    whose loader skipped an unreadable image has fewer).
    """
    if not _distributed():
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = F.pad(rows, (0, 0, 0, max(sizes) - rows.shape[0])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def _shared(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (a random choice drawn once for the job)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def kmeans_pp(rows: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding: ``k`` row indices ``[k]``, each next one drawn with probability proportional
    to its squared distance from the nearest one drawn so far (uniformly where every row is drawn
    already or all are equal), from the global RNG.
    """
    m = rows.shape[0]
    picks = torch.empty(k, dtype=torch.long, device=rows.device)
    picks[0] = torch.randint(0, m, ()).to(rows.device)
    d2 = (rows - rows[picks[0]]).square().sum(1)
    for i in range(1, k):
        total = d2.sum()
        weights = d2 if bool(total > 0) else torch.ones_like(d2)
        picks[i] = torch.multinomial(weights.cpu(), 1).to(rows.device)[0]
        d2 = torch.minimum(d2, (rows - rows[picks[i]]).square().sum(1))
    return picks


def kmeans(rows: torch.Tensor, k: int, iters: int, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``rows [M, C]`` (float32): ``(centroids [k, C], counts [k])``.

    The centroids start at ``k`` rows seeded by :func:`kmeans_pp` (drawn with replacement when
    ``M < k``) from the global RNG; a centroid that loses all its rows keeps its place. ``counts`` are
    the rows nearest each final centroid. With ``normalize`` the rows and centroids lie on the unit
    sphere and nearness is the cosine (spherical k-means).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> c, n = kmeans(torch.cat([torch.zeros(5, 2), torch.ones(5, 2)]), 2, iters=5)
        >>> sorted(n.tolist())
        [5.0, 5.0]

    """
    with torch.autocast(rows.device.type, enabled=False):
        rows = rows.float()
        if normalize:
            rows = F.normalize(rows, dim=-1)
        m = rows.shape[0]
        pick = kmeans_pp(rows, k) if m >= k else torch.randint(0, m, (k,)).to(rows.device)
        centroids = rows[_shared(pick)].clone()
        for _ in range(iters):
            codes = nearest(rows, centroids, normalize)
            counts = torch.bincount(codes, minlength=k).float()
            sums = torch.zeros_like(centroids).index_add_(0, codes, rows)
            moved = sums / counts.clamp(min=1)[:, None]
            if normalize:
                moved = F.normalize(moved, dim=-1)
            centroids = torch.where(counts[:, None] > 0, moved, centroids)
        counts = torch.bincount(nearest(rows, centroids, normalize), minlength=k).float()
    return centroids, counts


def nearest(rows: torch.Tensor, codebook: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Index ``[M]`` of the nearest code of each row ``[M, C]``: squared distance, or cosine with
    ``normalize``; in float32 whatever autocast says.
    """
    with torch.autocast(rows.device.type, enabled=False):
        rows, codebook = rows.float(), codebook.float()
        if normalize:
            return (rows @ codebook.t()).argmax(dim=1)
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 does not change the argmin
        return (codebook.square().sum(1)[None, :] - 2 * rows @ codebook.t()).argmin(dim=1)


@dataclass
class Quantized:
    """What the quantiser gives for vectors ``z [..., C]``.

    Attributes:
        vectors: ``[..., C]`` the codes, with the straight-through gradient of ``z`` (float32).
        codes: ``[...]`` int64 code indices.
        commitment: Scalar float32 ``mean |z - sg(code)|^2``, which keeps the encoder near its codes.
        perplexity: ``exp`` of the entropy of this batch's code frequencies (K when every code is
            used equally, 1 when one code takes everything).

    """

    vectors: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor
    perplexity: float


class EMAQuantizer(nn.Module):
    """``num_codes`` codes of ``dim`` features, moved by an exponential moving average.

    Args:
        num_codes: Codebook size K.
        dim: Code dimension C.
        decay: Weight of the old average in each update (VQ-VAE: 0.99).
        eps: Laplace smoothing of the counts.
        normalize: Quantise on the unit sphere (cosine), as VQ-KD.
        kmeans_iters: Lloyd iterations of the k-means start on the first training batch (0: the
            codebook starts as random rows of that batch).
        dead_threshold: A code whose average count per step falls below this restarts at a random
            vector of the step (0: never).

    Example:
        >>> q = EMAQuantizer(8, 4)
        >>> out = q(torch.randn(2, 16, 4))
        >>> out.vectors.shape, out.codes.shape, out.commitment.ndim
        (torch.Size([2, 16, 4]), torch.Size([2, 16]), 0)

    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, normalize: bool = False,
                 kmeans_iters: int = 10, dead_threshold: float = 1.0) -> None:
        """An uninitialised codebook (it starts on the first training batch; random unit vectors until then)."""
        super().__init__()
        self.num_codes, self.dim, self.decay, self.eps = num_codes, dim, decay, eps
        self.normalize, self.kmeans_iters, self.dead_threshold = normalize, kmeans_iters, dead_threshold
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, dim), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self._counts: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantise ``z [..., C]``; in training, start the codebook (first batch) and add the step's sums."""
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z)

    def _quantize(self, z: torch.Tensor) -> Quantized:
        shape = z.shape[:-1]
        rows = z.reshape(-1, self.dim).float()
        if self.normalize:
            rows = F.normalize(rows, dim=-1)
        if self.training and not bool(self.initialised):
            self._start(rows.detach())
        codes = nearest(rows.detach(), self.codebook, self.normalize)
        chosen = self.codebook[codes]
        commitment = F.mse_loss(rows, chosen)
        counts = torch.bincount(codes, minlength=self.num_codes).float()
        if self.training:
            self._add(rows.detach(), codes, counts)
        vectors = rows + (chosen - rows).detach()  # straight-through: the encoder gets the decoder's gradient
        return Quantized(vectors.view(*shape, self.dim), codes.view(shape), commitment, perplexity(counts))

    @torch.no_grad()
    def _start(self, rows: torch.Tensor) -> None:
        """The codebook as k-means centroids of the first batch (of every rank)."""
        centroids, counts = kmeans(_gather_rows(rows), self.num_codes, self.kmeans_iters, self.normalize)
        # A centroid no row chose still counts once: its sum then keeps it in place, not at zero.
        counts = counts.clamp(min=1)
        self.codebook.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.initialised.fill_(True)

    def _add(self, rows: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros(self.num_codes, self.dim, device=rows.device).index_add_(0, codes, rows)
        self._counts = counts if self._counts is None else self._counts + counts
        self._sums = sums if self._sums is None else self._sums + sums
        self._rows.append(rows)

    @torch.no_grad()
    def update(self) -> None:
        """Move the codes towards the step's assigned means (summed over ranks), restart the dead ones."""
        if self._counts is None:
            return
        pending = torch.cat([self._counts[:, None], self._sums], dim=1)
        if _distributed():
            dist.all_reduce(pending)
        counts, sums = pending[:, 0], pending[:, 1:]
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        codebook = self.embed_sum / smoothed[:, None]
        self.codebook.copy_(F.normalize(codebook, dim=-1) if self.normalize else codebook)
        if self.dead_threshold > 0:
            self._restart()
        self.discard()

    def _restart(self) -> None:
        """Codes whose average count fell below ``dead_threshold`` take random rows of the step."""
        dead = self.cluster_size < self.dead_threshold
        n = int(dead.sum())  # the same on every rank: the counts are the job's
        if n == 0:
            return
        rows = _gather_rows(torch.cat(self._rows))
        pick = _shared(torch.randint(0, rows.shape[0], (n,)).to(rows.device))
        fresh = rows[pick]
        self.codebook[dead] = fresh
        self.cluster_size[dead] = self.dead_threshold
        self.embed_sum[dead] = fresh * self.dead_threshold

    def discard(self) -> None:
        """Drop what the step's forwards added (a skipped step, or after :meth:`update`)."""
        self._counts, self._sums, self._rows = None, None, []

    def usage(self, threshold: float | None = None) -> float:
        """Fraction of codes whose average count per step is at least ``threshold`` (default: the
        restart threshold, or one use per step without one).
        """
        t = threshold if threshold is not None else self.dead_threshold or 1.0
        return float((self.cluster_size >= t).float().mean())


def perplexity(counts: torch.Tensor) -> float:
    """``exp`` of the entropy of the code frequencies ``counts [K]`` (K when every code is used
    equally, 1 when one code takes everything).
    """
    probs = counts.float() / counts.sum().clamp(min=1)
    return math.exp(float(-(probs * torch.log(probs.clamp(min=1e-12))).sum()))


__all__ = ["EMAQuantizer", "Quantized", "kmeans", "kmeans_pp", "nearest", "perplexity"]
