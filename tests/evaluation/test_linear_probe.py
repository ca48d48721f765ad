from __future__ import annotations

import torch

from mimkit.evaluation import linear_probe


def _separable(n: int, dim: int = 20, classes: int = 5, seed: int = 0):
    w = torch.randn(classes, dim, generator=torch.Generator().manual_seed(42))
    gen = torch.Generator().manual_seed(seed)
    # features at very different scales and offsets: the BatchNorm in front of the probe handles them
    x = torch.randn(n, dim, generator=gen) * torch.linspace(0.1, 10, dim) + 5
    y = ((x - 5) / torch.linspace(0.1, 10, dim) @ w.T).argmax(1)
    return x, y


def test_linear_probe_separable():
    train_x, train_y = _separable(2000)
    test_x, test_y = _separable(500, seed=1)
    res = linear_probe(train_x, train_y, test_x, test_y, num_classes=5, epochs=30, batch_size=256)
    assert set(res) == {"top1", "train_top1"}
    assert res["top1"] > 95.0 and res["train_top1"] > 95.0


def test_linear_probe_random_labels_near_chance():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(500, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    train_y, test_y = torch.randint(0, 4, (500,), generator=gen), torch.randint(0, 4, (1000,), generator=gen)
    res = linear_probe(train_x, train_y, test_x, test_y, num_classes=4, epochs=5, batch_size=128)
    assert 15.0 < res["top1"] < 35.0


def test_linear_probe_deterministic_for_a_seed():
    train_x, train_y = _separable(300)
    test_x, test_y = _separable(100, seed=1)
    a = linear_probe(train_x, train_y, test_x, test_y, 5, epochs=3, batch_size=64, seed=1)
    b = linear_probe(train_x, train_y, test_x, test_y, 5, epochs=3, batch_size=64, seed=1)
    assert a == b


def test_linear_probe_single_leftover_sample():
    """A last batch of one sample (BatchNorm cannot train on it) is skipped, not an error."""
    train_x, train_y = _separable(65)
    res = linear_probe(train_x, train_y, train_x, train_y, 5, epochs=2, batch_size=64)
    assert 0.0 <= res["top1"] <= 100.0
