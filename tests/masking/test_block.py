"""Block masks as batched pure functions: BEiT/iBOT's ``block_masks`` and data2vec 2.0's ``inverse_block_masks``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mimkit.masking import block_masks, inverse_block_masks, random_masking

# ----------------------------------------------------------------------------- references

#: iBOT's masks as the code before ``block_masks`` drew them (one bit per cell, per image), for
#: ``(n, height, width, lo, hi, mask_prob, min_block, seed)``: the batched function must keep them.
_RECORDED = {
    (6, 7, 7, 0.1, 0.5, 0.5, 4, 0): ["0xe1c3878f8a00", "0x38704000000", "0x2040820fff80", "0x1f3e0f1b870",
                                     "0x60c18706c183", "0x70e0c18700"],
    (4, 14, 14, 0.2, 0.4, 1.0, 16, 3): ["0x3e01f807e01f801e007801e007801e00000000000000", "0x7807fc1ff07fc1ff0000",
                                        "0x7803fe3ff8ffe0fe0000",
                                        "0x3fc0ff03fc0ff03fc0ff03fc0ff006001800000000000"],
}


@pytest.mark.parametrize("case", list(_RECORDED))
def test_block_masks_keep_the_masks_recorded_before(case):
    n, h, w, lo, hi, prob, min_block, seed = case
    torch.manual_seed(seed)
    got = block_masks(n, h, w, (lo, hi), mask_prob=prob, min_block=min_block)
    assert [hex(sum(1 << j for j in range(h * w) if got[i, j])) for i in range(n)] == _RECORDED[case]


def _one_ratio(batch, height, width, mask_ratio, min_block=4, max_aspect=3.0, generator=None):
    """The fixed-ratio float32 call iBOT's loop made before ``block_masks`` took the whole batch."""
    return block_masks(batch, height, width, mask_ratio, min_block=min_block, max_aspect=max_aspect,
                       generator=generator).float()


class _ReferenceIBOT:
    """IBOT.draw_masks as it was before ``block_masks``: one call per masked image."""

    def __init__(self, mask_prob, mask_ratio, mask_min_block, impl):
        self.cfg = SimpleNamespace(mask_prob=mask_prob, mask_ratio=list(mask_ratio), mask_min_block=mask_min_block)
        self.impl = impl

    def draw_masks(self, n, height, width):
        block_masking = self.impl
        out = torch.zeros(n, height * width, dtype=torch.bool)
        lo, hi = self.cfg.mask_ratio
        draws = torch.rand(n, 2)
        for i in range(n):
            if draws[i, 0] < self.cfg.mask_prob:
                ratio = lo + (hi - lo) * float(draws[i, 1])
                out[i] = block_masking(1, height, width, ratio, min_block=self.cfg.mask_min_block)[0].bool()
        return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- block_masks: iBOT's masks, bit for bit

_IBOT_CASES = [
    # n, height, width, (lo, hi), mask_prob, min_block
    (16, 7, 7, (0.1, 0.5), 0.5, 4),
    (12, 14, 14, (0.1, 0.5), 0.5, 4),
    (10, 14, 14, (0.2, 0.4), 1.0, 16),
    (20, 8, 5, (0.3, 0.3), 0.7, 4),
    (9, 4, 4, (0.1, 0.9), 0.3, 4),
    (8, 6, 6, (0.4, 0.6), 0.0, 2),
    (6, 2, 3, (0.2, 0.8), 0.9, 4),
]


@pytest.mark.parametrize("n, h, w, ratio, prob, min_block", _IBOT_CASES)
@pytest.mark.parametrize("seed", [0, 3])
def test_block_masks_reproduce_ibot_draw_masks_bit_for_bit(n, h, w, ratio, prob, min_block, seed):
    torch.manual_seed(seed)
    want = _ReferenceIBOT(prob, ratio, min_block, _one_ratio).draw_masks(n, h, w)
    after_want = torch.rand(4)  # the reference and block_masks must also consume the same draws
    torch.manual_seed(seed)
    got = block_masks(n, h, w, tuple(ratio), mask_prob=prob, min_block=min_block)
    after_got = torch.rand(4)
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(after_got, after_want)
    # iBOT's mask_ratio is a list; a list is the same range
    torch.manual_seed(seed)
    assert torch.equal(block_masks(n, h, w, list(ratio), mask_prob=prob, min_block=min_block), want)


@pytest.mark.parametrize("n, h, w, ratio, prob, min_block", _IBOT_CASES[:4])
def test_block_masks_with_a_generator_draw_everything_from_it(n, h, w, ratio, prob, min_block):
    """A generator seeded s gives the masks iBOT draws from the global RNG seeded s, and the global RNG is untouched."""
    torch.manual_seed(5)
    want = _ReferenceIBOT(prob, ratio, min_block, _one_ratio).draw_masks(n, h, w)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = block_masks(n, h, w, ratio, mask_prob=prob, min_block=min_block, generator=_gen(5))
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("n, h, w, ratio, min_block, max_aspect", [
    (6, 14, 14, 0.4, 4, 3.0), (5, 7, 7, 0.75, 4, 3.0), (4, 8, 4, 0.3, 2, 2.0), (5, 6, 6, 0.1, 16, 3.0),
    (3, 5, 5, 0.9, 4, 1.0),
])
def test_a_float_ratio_gives_the_former_block_masking_per_image(n, h, w, ratio, min_block, max_aspect):
    want = _one_ratio(n, h, w, ratio, min_block, max_aspect, generator=_gen(1))
    got = block_masks(n, h, w, ratio, min_block=min_block, max_aspect=max_aspect, generator=_gen(1))
    assert torch.equal(got, want.bool())
    wrapped = _one_ratio(n, h, w, ratio, min_block, max_aspect, generator=_gen(1))
    assert wrapped.dtype == torch.float32 and torch.equal(wrapped, want)
    # image by image: mask i is what the former function gives after the draws of images 0..i-1
    g = _gen(1)
    rows = [_one_ratio(1, h, w, ratio, min_block, max_aspect, generator=g)[0] for _ in range(n)]
    assert torch.equal(got, torch.stack(rows).bool())


def test_a_float_ratio_with_a_mask_probability_is_the_range_of_one_value():
    a = block_masks(12, 7, 7, 0.3, mask_prob=0.6, generator=_gen(2))
    b = block_masks(12, 7, 7, (0.3, 0.3), mask_prob=0.6, generator=_gen(2))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- block_masks: counts, probability


@pytest.mark.parametrize("h, w, ratio", [(14, 14, 0.4), (7, 7, 0.75), (8, 4, 0.3), (5, 5, 0.9), (2, 3, 0.5)])
def test_block_masks_exact_count_at_a_float_ratio(h, w, ratio):
    out = block_masks(6, h, w, ratio, generator=_gen(0))
    assert out.shape == (6, h * w) and out.dtype == torch.bool and out.device.type == "cpu"
    assert (out.sum(1) == round(ratio * h * w)).all()


@pytest.mark.parametrize("h, w, lo, hi, prob", [(14, 14, 0.1, 0.5, 1.0), (7, 7, 0.2, 0.4, 0.5), (9, 6, 0.6, 0.9, 0.8)])
def test_block_masks_ratio_range_is_honoured_per_image(h, w, lo, hi, prob):
    n, total = 40, h * w
    out = block_masks(n, h, w, (lo, hi), mask_prob=prob, generator=_gen(7))
    draws = torch.rand(n, 2, generator=_gen(7))  # the up-front draws, replayed
    chosen = draws[:, 0] < prob
    want = torch.tensor([min(total - 1, max(1, round((lo + (hi - lo) * float(u)) * total))) if c else 0
                         for c, u in zip(chosen.tolist(), draws[:, 1], strict=True)])
    counts = out.sum(1)
    assert torch.equal(counts, want)
    assert (counts[chosen] >= round(lo * total)).all() and (counts[chosen] <= round(hi * total)).all()
    assert len(set(counts[chosen].tolist())) > 3  # the ratio varies from image to image
    assert not out[~chosen].any()


def test_block_masks_mask_probability_zero_one_and_between():
    none = block_masks(50, 7, 7, (0.1, 0.5), mask_prob=0.0, generator=_gen(0))
    assert none.shape == (50, 49) and not none.any()
    every = block_masks(50, 7, 7, (0.1, 0.5), mask_prob=1.0, generator=_gen(0))
    assert (every.sum(1) > 0).all()
    half = block_masks(400, 7, 7, (0.1, 0.5), mask_prob=0.5, generator=_gen(0))
    assert 0.4 < float(half.any(1).float().mean()) < 0.6


def test_block_masks_are_blocky():
    out = block_masks(8, 14, 14, (0.4, 0.5), generator=_gen(0)).view(8, 14, 14)
    for grid in out:  # every image holds a masked 2 x 2 square
        assert bool((grid[:-1, :-1] & grid[1:, :-1] & grid[:-1, 1:] & grid[1:, 1:]).any())


def test_block_masks_reproducible_and_varied():
    a = block_masks(6, 14, 14, (0.2, 0.5), mask_prob=0.9, generator=_gen(5))
    b = block_masks(6, 14, 14, (0.2, 0.5), mask_prob=0.9, generator=_gen(5))
    c = block_masks(6, 14, 14, (0.2, 0.5), mask_prob=0.9, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    masked = block_masks(6, 14, 14, (0.2, 0.5), generator=_gen(5))
    assert torch.unique(masked, dim=0).shape[0] == 6


def test_block_masks_of_no_images():
    assert block_masks(0, 7, 7, (0.1, 0.5), mask_prob=0.5).shape == (0, 49)
    assert inverse_block_masks(0, 7, 7, 0.8).shape == (0, 49)


# ----------------------------------------------------------------------------- invalid arguments

_RATIO_RULE = r"ratio must be a float in \(0, 1\) or a range \(lo, hi\) with 0 < lo <= hi < 1"


@pytest.mark.parametrize("fn", [block_masks, inverse_block_masks])
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5, (0.5, 0.4), (0.0, 0.5), (0.2, 1.0), (0.2,), (0.1, 0.2, 0.3),
                                   "0.5", True, None, float("nan")])
def test_a_bad_ratio_is_refused_with_its_range(fn, ratio):
    with pytest.raises(ValueError, match=_RATIO_RULE):
        fn(2, 7, 7, ratio)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=-1), r"n must be >= 0, got -1"),
    (dict(height=0), r"height and width must be >= 1, got 0 x 7"),
    (dict(width=-3), r"height and width must be >= 1, got 7 x -3"),
    (dict(mask_prob=-0.1), r"mask_prob must be in \[0, 1\], got -0.1"),
    (dict(mask_prob=1.5), r"mask_prob must be in \[0, 1\], got 1.5"),
    (dict(min_block=0), r"min_block must be >= 1, got 0"),
    (dict(max_aspect=0.5), r"max_aspect must be >= 1, got 0.5"),
])
def test_block_masks_bad_arguments(kwargs, message):
    args = dict(n=2, height=7, width=7, ratio=0.5) | kwargs
    with pytest.raises(ValueError, match=message):
        block_masks(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=-1), r"n must be >= 0, got -1"),
    (dict(height=0), r"height and width must be >= 1, got 0 x 14"),
    (dict(block_size=0), r"block_size must be in \[1, min\(height, width\)\] = \[1, 14\], got 0"),
    (dict(width=4, block_size=5), r"block_size must be in \[1, min\(height, width\)\] = \[1, 4\], got 5"),
    (dict(adjust=-0.01), r"adjust must be >= 0, got -0.01"),
])
def test_inverse_block_masks_bad_arguments(kwargs, message):
    args = dict(n=2, height=14, width=14, ratio=0.8) | kwargs
    with pytest.raises(ValueError, match=message):
        inverse_block_masks(**args)


def test_block_masking_keeps_refusing_a_bad_ratio():
    with pytest.raises(ValueError, match=r"ratio must be a float in \(0, 1\).*got 1.0"):
        block_masks(1, 4, 4, 1.0)


# ----------------------------------------------------------------------------- inverse_block_masks


@pytest.mark.parametrize("h, w, ratio, block", [(14, 14, 0.8, 3), (14, 14, 0.6, 5), (7, 7, 0.75, 2),
                                                (16, 8, 0.5, 4), (4, 4, 0.9, 3), (5, 9, 0.3, 1), (14, 14, 0.05, 3)])
def test_inverse_block_masks_exact_count(h, w, ratio, block):
    out = inverse_block_masks(16, h, w, ratio, block_size=block, generator=_gen(0))
    assert out.shape == (16, h * w) and out.dtype == torch.bool and out.device.type == "cpu"
    assert (out.sum(1) == round(ratio * h * w)).all()


@pytest.mark.parametrize("adjust", [0.0, 0.07, 0.5])
def test_inverse_block_masks_exact_count_whatever_the_block_surplus(adjust):
    """Too few blocks (adjust 0, overlaps) and too many (0.5) are both corrected to the exact count."""
    out = inverse_block_masks(64, 14, 14, 0.8, adjust=adjust, generator=_gen(1))
    assert (out.sum(1) == 157).all()


@pytest.mark.parametrize("lo, hi", [(0.5, 0.9), (0.7, 0.8)])
def test_inverse_block_masks_ratio_range_is_honoured_per_image(lo, hi):
    n, total = 64, 196
    out = inverse_block_masks(n, 14, 14, (lo, hi), generator=_gen(3))
    u = torch.rand(n, generator=_gen(3)).double()  # the per-image ratio draws come first
    want = torch.round((lo + (hi - lo) * u) * total).long()
    counts = out.sum(1)
    assert torch.equal(counts, want)
    assert (counts >= round(lo * total)).all() and (counts <= round(hi * total)).all()
    assert len(set(counts.tolist())) > 3


def _visible_neighbour_share(visible: torch.Tensor, h: int, w: int) -> float:
    """Of the visible cells, the share with a visible horizontal or vertical neighbour."""
    v = visible.view(-1, h, w)
    p = F.pad(v.float(), (1, 1, 1, 1))
    neighbour = (p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]) > 0
    return float((neighbour & v).sum()) / float(v.sum())


def _holds_visible_square(visible: torch.Tensor, h: int, w: int, size: int) -> torch.Tensor:
    """``[N]`` bool: whether each image's visible cells hold a whole ``size x size`` square."""
    v = visible.view(-1, 1, h, w).float()
    return (F.avg_pool2d(v, size, stride=1) > 1 - 1e-6).flatten(1).any(1)


def test_inverse_block_masks_show_blocks_unlike_random_cells():
    """Data2vec 2.0's setting (14 x 14, ratio 0.8, 3 x 3 blocks): visible cells cluster into whole blocks."""
    n, h, w = 64, 14, 14
    visible = ~inverse_block_masks(n, h, w, 0.8, block_size=3, generator=_gen(0))
    baseline = random_masking(n, h * w, 0.8, generator=_gen(0)).mask == 0  # random cells, same count
    assert int(visible.sum()) == int(baseline.sum())
    share, base_share = _visible_neighbour_share(visible, h, w), _visible_neighbour_share(baseline, h, w)
    assert share > 0.85 and share > base_share + 0.25
    assert float(_holds_visible_square(visible, h, w, 3).float().mean()) > 0.9
    assert float(_holds_visible_square(baseline, h, w, 3).float().mean()) < 0.1
    # the masked cells are the complement: the visible blocks are holes in a mostly masked grid
    assert float((~visible).float().mean()) == pytest.approx(157 / 196)


@pytest.mark.parametrize("h, w, block", [(9, 9, 3), (8, 8, 2), (10, 7, 4)])
def test_one_inverse_block_is_a_whole_square_away_from_the_border(h, w, block):
    """With room for one block and no surplus, an interior centre shows exactly one block x block square."""
    total, n = h * w, 200
    ratio = (total - block * block) / total
    visible = ~inverse_block_masks(n, h, w, ratio, block_size=block, adjust=1e-9, generator=_gen(4))
    assert (visible.sum(1) == block * block).all()
    square = _holds_visible_square(visible, h, w, block)
    interior = (h - block + 1) * (w - block + 1) / total  # chance that a uniform centre shows a whole square
    assert abs(float(square.float().mean()) - interior) < 0.1


def test_inverse_block_masks_reproducible_with_a_generator_and_varied():
    a = inverse_block_masks(8, 14, 14, (0.6, 0.9), generator=_gen(5))
    b = inverse_block_masks(8, 14, 14, (0.6, 0.9), generator=_gen(5))
    c = inverse_block_masks(8, 14, 14, (0.6, 0.9), generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.unique(a, dim=0).shape[0] == 8


def test_inverse_block_masks_use_the_global_rng_without_a_generator_and_leave_it_alone_with_one():
    torch.manual_seed(9)
    global_draw = inverse_block_masks(8, 14, 14, 0.8)
    assert torch.equal(global_draw, inverse_block_masks(8, 14, 14, 0.8, generator=_gen(9)))
    state = torch.get_rng_state()
    inverse_block_masks(8, 14, 14, (0.5, 0.9), generator=_gen(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_inverse_block_masks_device_follows_the_generator():
    out = inverse_block_masks(2, 6, 6, 0.5, generator=_gen(0))
    assert out.device.type == "cpu"
    out = inverse_block_masks(2, 6, 6, 0.5, device="cpu")
    assert out.device.type == "cpu" and out.dtype == torch.bool
