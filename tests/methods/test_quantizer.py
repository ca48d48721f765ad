"""The EMA vector quantiser: nearest codes, the k-means start, the moving average, dead-code restarts,
a skipped step forgotten, and two processes equal to one."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mimkit.methods.quantizer import EMAQuantizer, kmeans, nearest, perplexity


def _clusters(n_per: int = 20, centres: int = 4, dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=gen) * 5
    rows = means.repeat_interleave(n_per, 0) + 0.05 * torch.randn(centres * n_per, dim, generator=gen)
    return rows, means


def test_nearest_is_the_brute_force_argmin():
    rows, codes = torch.randn(50, 6), torch.randn(9, 6)
    assert torch.equal(nearest(rows, codes), torch.cdist(rows, codes).argmin(1))
    unit_rows, unit_codes = F.normalize(rows, dim=-1), F.normalize(codes, dim=-1)
    assert torch.equal(nearest(unit_rows, unit_codes, normalize=True), (unit_rows @ unit_codes.t()).argmax(1))


def test_kmeans_finds_well_separated_clusters():
    torch.manual_seed(1)
    rows, means = _clusters()
    centroids, counts = kmeans(rows, 4, iters=10)
    assert sorted(counts.tolist()) == [20.0] * 4
    # every true mean has a centroid within the noise
    assert torch.cdist(means, centroids).min(1).values.max() < 0.1


def test_the_first_training_batch_starts_the_codebook_and_evaluation_does_not():
    torch.manual_seed(0)
    rows, means = _clusters()
    q = EMAQuantizer(4, 3, kmeans_iters=10, dead_threshold=0)
    q.eval()(rows)
    assert not bool(q.initialised)
    out = q.train()(rows)
    assert bool(q.initialised) and torch.cdist(means, q.codebook).min(1).values.max() < 0.1
    assert out.perplexity == pytest.approx(4.0, rel=1e-3)
    assert float(out.commitment) < 0.01


def test_the_codebook_moves_by_the_moving_average_of_a_whole_step():
    """Two micro-batches, one update: the Laplace-smoothed EMA of the pair's counts and sums."""
    torch.manual_seed(0)
    q = EMAQuantizer(3, 2, decay=0.9, eps=1e-5, kmeans_iters=0, dead_threshold=0).train()
    q.initialised.fill_(True)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    q.cluster_size.fill_(1.0)
    q.embed_sum.copy_(q.codebook)
    a, b = torch.tensor([[1.0, 0.0], [9.0, 1.0]]), torch.tensor([[0.0, 1.0], [11.0, 1.0]])
    q(a), q(b)
    q.update()
    counts = torch.tensor([2.0, 2.0, 0.0])
    sums = torch.tensor([[1.0, 1.0], [20.0, 2.0], [0.0, 0.0]])
    size = 0.9 * torch.ones(3) + 0.1 * counts
    embed = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]) + 0.1 * sums
    smoothed = (size + 1e-5) / (size.sum() + 3e-5) * size.sum()
    torch.testing.assert_close(q.cluster_size, size)
    torch.testing.assert_close(q.codebook, embed / smoothed[:, None])


def test_a_skipped_step_is_forgotten():
    q = EMAQuantizer(4, 3, kmeans_iters=2).train()
    q(torch.randn(8, 3))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.discard()
    q.update()
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_dead_code_restarts_at_a_vector_of_the_step():
    torch.manual_seed(0)
    rows, _ = _clusters(centres=2)
    q = EMAQuantizer(3, 3, decay=0.5, kmeans_iters=0, dead_threshold=1.0).train()
    q.initialised.fill_(True)
    q.codebook.copy_(torch.stack([rows[0], rows[-1], torch.full((3,), 100.0)]))  # code 2 is never chosen
    q.cluster_size.fill_(1.0)
    q.embed_sum.copy_(q.codebook)
    q(rows)
    q.update()
    assert (q.codebook[2] == rows).all(1).any(), "the dead code took one of the step's vectors"
    assert float(q.cluster_size[2]) == 1.0 and q.usage() == 1.0


def test_without_restarts_the_dead_code_stays_dead():
    """The restart test can fail: with the threshold at 0 nothing moves the unused code."""
    torch.manual_seed(0)
    rows, _ = _clusters(centres=2)
    q = EMAQuantizer(3, 3, decay=0.5, kmeans_iters=0, dead_threshold=0).train()
    q.initialised.fill_(True)
    q.codebook.copy_(torch.stack([rows[0], rows[-1], torch.full((3,), 100.0)]))
    q.cluster_size.fill_(1.0)
    q.embed_sum.copy_(q.codebook)
    q(rows)
    q.update()
    assert not (q.codebook[2] == rows).all(1).any()
    assert q.usage(threshold=0.6) == pytest.approx(2 / 3)


def test_cosine_codes_stay_on_the_unit_sphere_and_gradients_go_straight_through():
    q = EMAQuantizer(8, 4, normalize=True, kmeans_iters=3).train()
    z = torch.randn(2, 10, 4, requires_grad=True)
    out = q(z)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(8))
    (out.vectors.sum() + out.commitment).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    q.update()
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(8), atol=1e-6)


def test_perplexity_counts_equal_use_as_the_number_of_codes():
    assert perplexity(torch.bincount(torch.arange(8).repeat(3), minlength=8)) == pytest.approx(8.0)
    assert perplexity(torch.bincount(torch.zeros(10, dtype=torch.long), minlength=8)) == pytest.approx(1.0)


def _quantizer_rank(rank: int, port: int, rows: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0 if rank == 0 else 123)  # the ranks' own RNGs differ: rank 0's choices must rule
        q = EMAQuantizer(6, 3, decay=0.8, kmeans_iters=4, dead_threshold=2.0).train()
        for half in rows.chunk(2):  # two steps, each rank with its half of every step's batch
            q(half.chunk(2)[rank])
            q.update()
        torch.save(q.state_dict(), f"{out}/q{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_the_codebook_of_one(tmp_path):
    """k-means start, moving average and restarts over the joint batch: both ranks hold what one
    process holds after the same two steps."""
    rows, _ = _clusters(n_per=8, centres=4)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(2))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_quantizer_rank, args=(port, rows, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    one = EMAQuantizer(6, 3, decay=0.8, kmeans_iters=4, dead_threshold=2.0).train()
    for half in rows.chunk(2):
        one(half)
        one.update()
    for r in range(2):
        got = torch.load(tmp_path / f"q{r}.pt")
        for k, v in one.state_dict().items():
            torch.testing.assert_close(got[k], v, msg=f"rank {r}: {k}")
