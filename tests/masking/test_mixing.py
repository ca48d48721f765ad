"""Mixing as pure functions: every position of a mix comes from exactly one image, un-mixing inverts it."""

from __future__ import annotations

import pytest
import torch

from mimkit.masking import MixPairs, group_assignment, mix_groups, mix_pairs, pair_mask, unmix_groups, unmix_pairs
from mimkit.masking.mixing import pair_partner, upsample_labels


@pytest.mark.parametrize("grid, ratio, partner", [((7, 7), 0.5, 24), ((4, 4), 0.5, 8), ((2, 2), 0.5, 2),
                                                  ((8, 8), 0.25, 16)])
def test_pair_mask_sets_exactly_floor_l_ratio_cells(grid, ratio, partner):
    for seed in range(5):
        labels = pair_mask(grid, ratio, generator=torch.Generator().manual_seed(seed))
        assert labels.shape == grid and labels.dtype == torch.int64
        assert set(labels.unique().tolist()) == {0, 1} and int(labels.sum()) == partner


def test_pair_mask_refuses_a_ratio_that_leaves_an_image_nothing():
    with pytest.raises(ValueError, match="ratio"):
        pair_mask((4, 4), 1.0)
    with pytest.raises(ValueError, match="larger grid"):
        pair_mask((1, 1), 0.5)


def test_pairing_is_an_involution_and_needs_an_even_batch():
    partner = pair_partner(6)
    assert torch.equal(partner[partner], torch.arange(6)) and (partner != torch.arange(6)).all()
    for bad in (0, 1, 5):
        with pytest.raises(ValueError, match="even batch"):
            pair_partner(bad)


def test_upsampled_labels_keep_every_merged_group_in_one_image():
    """Labels drawn on the last grid, upsampled by 2 and 4: each 2x2 merging group is one label."""
    labels = pair_mask((4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    for factor in (2, 4):
        fine = upsample_labels(labels, (4 * factor, 4 * factor))
        groups = fine.view(4 * factor // 2, 2, 4 * factor // 2, 2)
        assert (groups.amin(dim=(1, 3)) == groups.amax(dim=(1, 3))).all()
        assert torch.equal(fine[::factor, ::factor], labels)


def test_every_pixel_of_a_pair_mix_comes_from_exactly_one_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 8, 8, generator=g)
    labels = upsample_labels(pair_mask((4, 4), 0.5, generator=g), (8, 8))
    mixed = mix_pairs(x, labels)
    partner = pair_partner(6)
    own = (labels == 0).expand_as(x[0])
    for i in range(6):
        assert torch.equal(mixed[i][own], x[i][own]) and torch.equal(mixed[i][~own], x[partner[i]][~own])
    # the two samples of a pair are complements: together they show both images once
    assert torch.equal(mixed[0][~own], x[5][~own]) and torch.equal(mixed[5][~own], x[0][~own])


def test_unmixing_a_pair_gives_the_images_back_bit_for_bit():
    x = torch.randn(4, 1, 8, 8)
    per_pair = torch.randint(0, 2, (2, 8, 8))
    per_sample = torch.cat([per_pair, per_pair.flip(0)])  # the two samples of a pair share their labels
    for labels in (upsample_labels(pair_mask((2, 2), 0.5), (8, 8)), per_sample):
        assert torch.equal(unmix_pairs(mix_pairs(x, labels), labels), x)
    unshared = torch.randint(0, 2, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(unmix_pairs(mix_pairs(x, unshared), unshared), x)  # what the sharing is for


def test_mix_labels_reach_every_stage_size():
    mix = MixPairs(torch.tensor([[0, 1], [1, 0]]))
    assert mix.stage_labels((4, 4)).shape == (1, 4, 4)
    assert torch.equal(mix.stage_labels((2, 2))[0], mix.labels)


@pytest.mark.parametrize("batch, group, length", [(8, 4, 64), (6, 2, 16), (9, 3, 9), (4, 4, 4)])
def test_group_assignment_is_balanced_and_complete(batch, group, length):
    mix = group_assignment(batch, group, length, generator=torch.Generator().manual_seed(1))
    per = length // group
    assert mix.source.shape == (batch // group, length)
    for b in range(batch // group):
        assert torch.equal(torch.bincount(mix.source[b], minlength=group), torch.full((group,), per))
    assert mix.keep_idx.shape == (batch, per) and (mix.mask.sum(1) == length - per).all()
    for n in range(batch):
        b, g = divmod(n, group)
        assert torch.equal(mix.keep_idx[n], torch.nonzero(mix.source[b] == g).squeeze(1))
        assert torch.equal(mix.mask[n] == 0, mix.source[b] == g)
    # restore_idx puts (kept, then hidden) back into position order
    kept_first = torch.argsort(mix.mask * length + torch.arange(length), dim=1)
    assert torch.equal(torch.gather(kept_first, 1, mix.restore_idx), torch.arange(length).expand(batch, -1))


def test_group_assignments_differ_between_groups_and_draws():
    a = group_assignment(8, 4, 16, generator=torch.Generator().manual_seed(0))
    b = group_assignment(8, 4, 16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.source[0], a.source[1]) and not torch.equal(a.source, b.source)


def test_group_mix_takes_each_token_from_its_image_and_unmix_inverts_it():
    batch, group, length, dim = 8, 4, 16, 3
    tokens = torch.randn(batch, length, dim)
    mix = group_assignment(batch, group, length)
    mixed = mix_groups(tokens, mix.source)
    assert mixed.shape == (batch // group, length, dim)
    for b in range(batch // group):
        for p in range(length):
            assert torch.equal(mixed[b, p], tokens[b * group + mix.source[b, p], p])
    own = unmix_groups(mixed, mix)  # [N, L/G, D]
    back = torch.zeros_like(tokens).scatter_(1, mix.keep_idx.unsqueeze(-1).expand(-1, -1, dim), own)
    visible = (mix.mask == 0).unsqueeze(-1)
    assert torch.equal(back * visible, tokens * visible)


@pytest.mark.parametrize("batch, group, length, match", [(6, 4, 16, "multiple of the group"),
                                                          (8, 4, 10, "equally"), (4, 1, 4, "at least 2")])
def test_group_assignment_refuses_uneven_shares(batch, group, length, match):
    with pytest.raises(ValueError, match=match):
        group_assignment(batch, group, length)
