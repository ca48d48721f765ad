"""Weighted k-nearest-neighbour classification on frozen features.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018,
as used by DINO (Caron et al., ICCV 2021): cosine similarity, votes weighted by exp(sim / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    ks: tuple[int, ...] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (%) of weighted cosine kNN for each ``k``.

    Args:
        train_x: ``[N, D]`` memory-bank features.
        train_y: ``[N]`` labels.
        test_x: ``[M, D]`` query features.
        test_y: ``[M]`` labels.
        ks: Neighbourhood sizes.
        temperature: T in exp(sim / T).
        num_classes: Number of classes (default: from the labels).
        chunk: Queries per block, to bound memory.

    Returns:
        ``{k: accuracy in percent}``.

    """
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    bank = F.normalize(train_x.float(), dim=1)
    kmax = min(max(ks), bank.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test_x.shape[0], chunk):
        q = F.normalize(test_x[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # [B, kmax], sorted descending
        weight = (sim / temperature).exp()
        votes_all = F.one_hot(train_y[idx], num_classes).float() * weight.unsqueeze(-1)  # [B, kmax, C]
        target = test_y[start : start + chunk]
        for k in ks:
            pred = votes_all[:, : min(k, kmax)].sum(1).argmax(1)
            correct[k] += int((pred == target).sum())
    return {k: 100.0 * correct[k] / test_x.shape[0] for k in ks}
