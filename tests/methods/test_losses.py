from __future__ import annotations

import pytest
import torch

from mimkit.masking import pixel_block_mask
from mimkit.methods.losses import (
    hole_total_variation,
    inpainting_loss,
    masked_mse,
    patch_norm_stats,
    patchify,
    unpatchify,
)


@pytest.mark.parametrize("n, c, h, w, p", [(2, 1, 28, 28, 4), (3, 3, 16, 8, 4), (1, 3, 32, 32, 16)])
def test_patchify_unpatchify_round_trip(n, c, h, w, p):
    images = torch.randn(n, c, h, w)
    patches = patchify(images, p)
    assert patches.shape == (n, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, c, (h // p, w // p)), images)


def test_patchify_layout():
    """Patches are row-major over the grid and pixels are in (p, p, C) order, as in MAE."""
    images = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)  # C=2, H=4, W=6
    patches = patchify(images, 2)
    assert patches.shape == (1, 6, 8)
    # second patch of the first row: rows 0-1, columns 2-3
    expected = images[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1], expected)
    # first patch of the second row: rows 2-3, columns 0-1
    assert torch.equal(patches[0, 3], images[0, :, 2:4, 0:2].permute(1, 2, 0).reshape(-1))


def test_masked_mse_ignores_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 12), torch.randn(2, 10, 12)
    mask = torch.zeros(2, 10)
    mask[:, :4] = 1
    for norm_pix in (False, True):
        base = masked_mse(pred, target, mask, norm_pix)
        changed = pred.clone()
        changed[:, 4:] += 100.0  # visible patches only
        assert torch.equal(masked_mse(changed, target, mask, norm_pix), base)
        changed = pred.clone()
        changed[:, :4] += 1.0  # a masked patch
        assert not torch.allclose(masked_mse(changed, target, mask, norm_pix), base)


def test_masked_mse_value():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    # mean over masked patches of the per-patch mean squared error: (1 + 9) / 2
    assert masked_mse(pred, target, mask).item() == pytest.approx(5.0)
    assert masked_mse(pred, target, torch.zeros(1, 3)).item() == 0.0  # no division by zero


def test_norm_pix_normalises_each_patch():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 16) * torch.rand(2, 5, 1) * 10 + torch.randn(2, 5, 1) * 50
    mask = torch.ones(2, 5)
    mean, std = patch_norm_stats(target)
    assert mean.shape == std.shape == (2, 5, 1)
    normalised = (target - mean) / std
    torch.testing.assert_close(normalised.mean(-1), torch.zeros(2, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(-1), torch.ones(2, 5), atol=1e-4, rtol=0)
    # predicting the normalised patches is a perfect score with norm_pix, a poor one without
    assert masked_mse(normalised, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-8)
    assert masked_mse(normalised, target, mask, norm_pix=False).item() > 1.0
    # the loss is invariant to a per-patch affine change of the target
    scaled = target * 3.0 + 7.0
    torch.testing.assert_close(masked_mse(normalised, scaled, mask, norm_pix=True),
                               masked_mse(normalised, target, mask, norm_pix=True), atol=1e-6, rtol=0)


def test_masked_mse_float32_from_bf16():
    pred = torch.randn(2, 4, 8).bfloat16()
    loss = masked_mse(pred, torch.randn(2, 4, 8), torch.ones(2, 4))
    assert loss.dtype == torch.float32 and loss.ndim == 0


def test_inpainting_loss_of_a_perfect_prediction_is_its_smoothness_term():
    x = torch.randn(2, 3, 8, 8)
    hole = pixel_block_mask(2, 8, 8, 2, 0.5)
    loss, logs = inpainting_loss(x, x, hole)
    assert float(logs["l1_hole"]) == 0.0 and float(logs["l1_valid"]) == 0.0
    torch.testing.assert_close(loss, 0.1 * hole_total_variation(x, hole))
    flat = torch.ones(2, 3, 8, 8)
    assert float(inpainting_loss(flat, flat, hole)[0]) == 0.0


def test_inpainting_loss_terms_are_normalised_by_their_pixel_counts():
    target = torch.zeros(1, 1, 4, 4)
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., :2, :] = 1.0  # top half is the hole
    pred = torch.zeros(1, 1, 4, 4)
    pred[..., :2, :] = 2.0  # error 2 on every hole pixel
    pred[..., 3, 0] = 1.0  # error 1 on one of 8 visible pixels
    loss, logs = inpainting_loss(pred, target, hole, hole_weight=6.0, tv_weight=0.0)
    assert float(logs["l1_hole"]) == pytest.approx(2.0)
    assert float(logs["l1_valid"]) == pytest.approx(1.0 / 8)
    assert float(loss) == pytest.approx(1.0 / 8 + 6 * 2.0)


def test_total_variation_uses_adjacent_pixels_inside_the_dilated_hole():
    hole = torch.zeros(1, 1, 5, 5)
    hole[..., 2, 2] = 1.0  # dilation gives the 3x3 block rows/cols 1..3
    img = torch.zeros(1, 1, 5, 5)
    img[..., 2, 2] = 1.0
    # pairs inside the 3x3 block: 6 horizontal + 6 vertical; 4 of them touch the centre pixel
    assert float(hole_total_variation(img, hole)) == pytest.approx(4.0 / 12)
    # a step between the last and the first row is not a neighbour pair (the source's bug)
    img2 = torch.zeros(1, 1, 5, 5)
    img2[..., 0, :] = 5.0
    assert float(hole_total_variation(img2, hole)) == 0.0
