from __future__ import annotations

import pytest
import torch

from mimkit.evaluation import knn_accuracy


def _clusters(n_per_class: int, classes: int = 10, dim: int = 16, noise: float = 0.1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    return x[perm], labels[perm]


def test_knn_on_clusters_is_perfect():
    train_x, train_y = _clusters(50)
    test_x, test_y = _clusters(20, seed=1)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, ks=(1, 20, 200))
    assert set(acc) == {1, 20, 200}
    assert acc[1] == 100.0 and acc[20] == 100.0
    assert acc[200] > 99.0


def test_knn_on_random_labels_is_chance():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    train_y, test_y = torch.randint(0, 10, (2000,), generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,))
    assert 5.0 < acc[20] < 16.0


def test_knn_nearest_neighbour_and_cosine():
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 2])
    test_x = torch.tensor([[5.0, 0.5], [0.1, 3.0], [-0.2, -0.01]])  # length does not matter, direction does
    test_y = torch.tensor([0, 1, 2])
    assert knn_accuracy(train_x, train_y, test_x, test_y, ks=(1,))[1] == 100.0
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([1, 1, 2]), ks=(1,))[1] == pytest.approx(200 / 3)


def test_knn_weighted_votes():
    """Two farther neighbours of class 1 outvote a near one of class 0 only when votes are not weighted."""
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([0, 1, 1])
    query, target = torch.tensor([[1.0, 0.05]]), torch.tensor([0])
    # with a small temperature the near neighbour dominates
    assert knn_accuracy(train_x, train_y, query, target, ks=(3,), temperature=0.07)[3] == 100.0
    # with a huge temperature every vote counts the same and class 1 wins 2:1
    assert knn_accuracy(train_x, train_y, query, target, ks=(3,), temperature=1e6)[3] == 0.0


def test_knn_chunking_and_k_larger_than_bank():
    train_x, train_y = _clusters(5, noise=1.0)
    test_x, test_y = _clusters(10, noise=1.0, seed=3)
    a = knn_accuracy(train_x, train_y, test_x, test_y, ks=(3, 500), chunk=7)
    b = knn_accuracy(train_x, train_y, test_x, test_y, ks=(3, 500), chunk=4096)
    assert a == b
    assert 0.0 <= a[500] <= 100.0
