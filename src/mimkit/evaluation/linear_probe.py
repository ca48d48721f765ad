"""Linear probe on frozen, cached features.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, App. A.2: a BatchNorm
without affine parameters before the linear classifier, which normalises the features whose scale
differs across pre-training methods.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 1024,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``BatchNorm1d(affine=False) + Linear`` with SGD (momentum 0.9, cosine) and test it.

    No model selection on the test set: the accuracy after the last epoch is reported.

    Args:
        train_x: ``[N, D]`` features.
        train_y: ``[N]`` labels.
        test_x: ``[M, D]`` features.
        test_y: ``[M]`` labels.
        num_classes: Output classes.
        epochs: Passes over the training features.
        lr: Peak learning rate at ``batch_size`` (features are batch-normalised, so ~0.1 fits any).
        batch_size: Features per step.
        weight_decay: L2 on the linear weights.
        seed: Seeds the initialisation and the shuffles.

    Returns:
        ``{"top1": test %, "train_top1": train %}``.

    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = train_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = train_x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    train_x, test_x = train_x.float(), test_x.float()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            sel = order[start : start + batch_size]
            if sel.numel() < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(train_x[sel]), train_y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        test_acc = (head(test_x).argmax(1) == test_y).float().mean().item() * 100
        train_acc = (head(train_x).argmax(1) == train_y).float().mean().item() * 100
    return {"top1": test_acc, "train_top1": train_acc}
