from __future__ import annotations

import pytest
import torch

from mimkit.masking import block_masks, num_kept, pixel_block_mask, random_masking

# ----------------------------------------------------------------------------- random_masking


@pytest.mark.parametrize("tokens, ratio, masked", [(49, 0.75, 37), (196, 0.75, 147), (100, 0.5, 50),
                                                   (16, 0.6, 10), (4, 0.99, 3)])
def test_random_masking_exact_count(tokens, ratio, masked):
    m = random_masking(8, tokens, ratio)
    assert m.keep_idx.shape == (8, tokens - masked)
    assert m.restore_idx.shape == (8, tokens)
    assert m.mask.shape == (8, tokens) and m.mask.dtype == torch.float32
    assert (m.mask.sum(1) == masked).all()
    assert m.keep_idx.dtype == torch.int64 and m.restore_idx.dtype == torch.int64


def test_num_kept():
    assert num_kept(49, 0.75) == 12
    assert num_kept(4, 0.99) == 1  # never zero
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            num_kept(10, bad)


def test_random_masking_indices_consistent():
    n, length = 6, 49
    m = random_masking(n, length, 0.75)
    keep = m.keep_idx.shape[1]
    # mask is 0 exactly at the kept positions
    for i in range(n):
        kept = set(m.keep_idx[i].tolist())
        assert len(kept) == keep
        visible = set(torch.nonzero(m.mask[i] == 0).squeeze(1).tolist())
        assert visible == kept
    # cat(visible, masked) in shuffled order, gathered with restore_idx, is the original sequence
    x = torch.arange(length).repeat(n, 1) * 10
    masked_idx = torch.stack([
        torch.tensor([j for j in torch.argsort(m.restore_idx[i]).tolist() if j not in set(m.keep_idx[i].tolist())])
        for i in range(n)
    ])
    shuffled = torch.cat([torch.gather(x, 1, m.keep_idx), torch.gather(x, 1, masked_idx)], dim=1)
    restored = torch.gather(shuffled, 1, m.restore_idx)
    assert torch.equal(restored, x)
    # restore_idx is a permutation whose first K inverse entries are keep_idx
    inverse = torch.argsort(m.restore_idx, dim=1)
    assert torch.equal(inverse[:, :keep], m.keep_idx)


def test_random_masking_independent_per_sample():
    m = random_masking(16, 49, 0.75, generator=torch.Generator().manual_seed(0))
    distinct = torch.unique(m.mask, dim=0).shape[0]
    assert distinct == 16


def test_random_masking_reproducible_with_generator():
    a = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(123))
    b = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(123))
    c = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.keep_idx, b.keep_idx)
    assert torch.equal(a.restore_idx, b.restore_idx)
    assert not torch.equal(a.mask, c.mask)


def test_random_masking_float32_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = random_masking(2, 16, 0.5)
    assert m.mask.dtype == torch.float32
    assert (m.mask.sum(1) == 8).all()


# ----------------------------------------------------------------------------- block_masks


@pytest.mark.parametrize("h, w, ratio", [(14, 14, 0.4), (14, 14, 0.5), (7, 7, 0.75), (8, 4, 0.3)])
def test_block_masking_exact_count(h, w, ratio):
    out = block_masks(6, h, w, ratio, generator=torch.Generator().manual_seed(0)).float()
    assert out.shape == (6, h * w) and out.dtype == torch.float32
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    assert (out.sum(1) == round(ratio * h * w)).all()


@pytest.mark.parametrize("h, w, ratio, min_block, expected", [(6, 6, 0.1, 16, 4), (2, 3, 0.5, 4, 3),
                                                              (5, 5, 0.9, 4, 22)])
def test_block_masking_exact_count_when_blocks_do_not_fit(h, w, ratio, min_block, expected):
    """When no block of min_block cells fits the remainder, single cells make up the count."""
    out = block_masks(5, h, w, ratio, min_block=min_block, generator=torch.Generator().manual_seed(0)).float()
    assert (out.sum(1) == expected).all()


def _has_masked_2x2(grid: torch.Tensor) -> bool:
    g = grid.bool()
    return bool((g[:-1, :-1] & g[1:, :-1] & g[:-1, 1:] & g[1:, 1:]).any())


def _neighbour_fraction(grid: torch.Tensor) -> float:
    """Of horizontally or vertically adjacent pairs touching a masked cell, the share with both masked."""
    g = grid.bool()
    both = (g[:, :-1] & g[:, 1:]).sum() + (g[:-1] & g[1:]).sum()
    any_ = (g[:, :-1] | g[:, 1:]).sum() + (g[:-1] | g[1:]).sum()
    return float(both) / float(any_)


def test_block_masking_is_blocky():
    gen = torch.Generator().manual_seed(0)
    out = block_masks(8, 14, 14, 0.5, generator=gen).float().view(8, 14, 14)
    for grid in out:
        assert _has_masked_2x2(grid)
    # uniform random masking at 0.5 gives ~1/3 here; BEiT blocks are far more clustered
    block_frac = sum(_neighbour_fraction(g) for g in out) / 8
    rand = torch.stack([
        pixel_block_mask(1, 14, 14, 1, 0.5, generator=torch.Generator().manual_seed(s))[0, 0] for s in range(8)
    ])
    rand_frac = sum(_neighbour_fraction(g) for g in rand) / 8
    assert block_frac > 0.55
    assert block_frac > rand_frac + 0.15


def test_block_masking_reproducible_and_varied():
    a = block_masks(4, 14, 14, 0.4, generator=torch.Generator().manual_seed(5)).float()
    b = block_masks(4, 14, 14, 0.4, generator=torch.Generator().manual_seed(5)).float()
    assert torch.equal(a, b)
    assert torch.unique(a, dim=0).shape[0] == 4


def test_block_masking_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        block_masks(1, 4, 4, 1.0)


# ----------------------------------------------------------------------------- pixel_block_mask


@pytest.mark.parametrize("mode", ["random", "block"])
@pytest.mark.parametrize("h, w, s, ratio", [(28, 28, 7, 0.5), (32, 16, 4, 0.75), (24, 24, 3, 0.6)])
def test_pixel_block_mask(mode, h, w, s, ratio):
    n = 4
    mask = pixel_block_mask(n, h, w, s, ratio, mode=mode, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (n, 1, h, w) and mask.dtype == torch.float32
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    blocks = (h // s) * (w // s)
    masked_blocks = round(ratio * blocks)
    assert (mask.sum(dim=(1, 2, 3)) == masked_blocks * s * s).all()
    # constant within each s x s block
    tiles = mask.view(n, 1, h // s, s, w // s, s)
    assert torch.equal(tiles.amax(dim=(3, 5)), tiles.amin(dim=(3, 5)))


def test_pixel_block_size_independent_of_patch():
    """A 7-pixel block on a 28-pixel image does not align with 4-pixel ViT patches."""
    mask = pixel_block_mask(2, 28, 28, 7, 0.5, generator=torch.Generator().manual_seed(1))
    row = mask[0, 0]
    # block boundaries fall every 7 pixels: pixels 6 and 7 may differ, pixels 3 and 4 never do
    assert torch.equal(row[:, 3], row[:, 4])
    change_cols = {c for c in range(1, 28) if not torch.equal(row[:, c - 1], row[:, c])}
    assert change_cols and change_cols <= {7, 14, 21}


def test_pixel_block_mask_samples_differ():
    mask = pixel_block_mask(8, 16, 16, 2, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.unique(mask.flatten(1), dim=0).shape[0] == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=28, width=28, block_size=5), "divisible"),
    (dict(height=28, width=30, block_size=4), "divisible"),
    (dict(height=28, width=28, block_size=4, mask_ratio=0.0), "mask_ratio"),
    (dict(height=28, width=28, block_size=4, mode="stripes"), "mode"),
])
def test_pixel_block_mask_bad_arguments(kwargs, message):
    args = dict(batch=1, mask_ratio=0.5, mode="random") | kwargs
    with pytest.raises(ValueError, match=message):
        pixel_block_mask(**args)
