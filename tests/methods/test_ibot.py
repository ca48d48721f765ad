from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import four_views, tiny_teacher_student

from mimkit.methods.dino import DINO
from mimkit.methods.ibot import IBOT, ibot_patch_loss
from mimkit.methods.losses import koleo_loss


def _ibot(backbone: str = "vit_tiny_p4", **cfg) -> IBOT:
    return tiny_teacher_student("ibot", backbone, **cfg)


_batch = four_views


def test_patch_loss_counts_masked_tokens_only_and_unmasked_images_as_zero():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), F.softmax(torch.randn(2, 3, 5), -1)
    m = torch.tensor([[True, False, True], [False, False, False]])
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    want = torch.stack([(ce[0, 0] + ce[0, 2]) / 2, torch.tensor(0.0)]).mean()
    torch.testing.assert_close(ibot_patch_loss([s], [t], [m], 0.1), want)
    # what sits under an unmasked token does not matter
    s2 = s.clone()
    s2[0, 1] += 100
    torch.testing.assert_close(ibot_patch_loss([s2], [t], [m], 0.1), want)


def test_koleo_of_three_points_on_a_circle():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # normalised: three points, nearest at sqrt(2)
    assert float(koleo_loss(x)) == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_masks_follow_probability_and_ratio():
    ibot = _ibot(mask_prob=0.5, mask_ratio=[0.2, 0.4])
    torch.manual_seed(1)
    masks = ibot.draw_masks(400, 7, 7)
    frac = masks.float().mean(1)
    masked = frac > 0
    assert 0.4 < float(masked.float().mean()) < 0.6
    assert float(frac[masked].min()) >= 0.2 - 1 / 49 and float(frac[masked].max()) <= 0.4 + 1 / 49


@pytest.mark.parametrize("backbone", ["vit_tiny_p4", "cvt_tiny_s4"])
def test_forward_trains_the_student_and_mask_token_only(backbone):
    ibot = _ibot(backbone, mask_prob=1.0).train()
    out = ibot(_batch())
    grid = ibot.encoder.grid_size(28, 28)
    assert out.mask.shape == (4, grid[0] * grid[1]) and float(out.mask.sum()) > 0
    assert {"loss_cls", "loss_patch", "masked", "center2_norm", "teacher_entropy"} <= set(out.logs)
    out.loss.backward()
    assert all(p.grad is None for p in ibot.teacher_encoder.parameters())
    if backbone.startswith("vit"):
        assert ibot.mask_token.grad is not None and float(ibot.mask_token.grad.abs().sum()) > 0
    else:  # the CvT hides the masked pixels instead: no token, so no parameter DDP would wait for
        assert ibot.mask_token is None


def test_patch_centre_is_the_mean_of_per_image_patch_means():
    ibot = _ibot(center_momentum2=0.9).train()
    batch = _batch()
    with torch.no_grad():
        _, tokens = ibot._encode(ibot.teacher_encoder, torch.cat(batch.views[:2]))
        t_patch = ibot.teacher_head(tokens).float()
    ibot(batch)
    ibot.after_step(0, 10)
    torch.testing.assert_close(ibot.center2.value, 0.1 * t_patch.mean(1).mean(0).view(1, 1, -1), rtol=1e-5, atol=1e-7)
    assert "center2.value" in ibot.state_dict()


def test_a_separate_patch_head_has_its_own_teacher():
    ibot = _ibot(shared_head=False).train()
    assert ibot._heads(False)[1] is ibot.patch_head and ibot._heads(True)[1] is ibot.teacher_patch_head
    assert not ibot.teacher_patch_head.training
    assert not any(p.requires_grad for p in ibot.teacher_patch_head.parameters())
    ibot(_batch()).loss.backward()
    with torch.no_grad():
        for p in ibot.patch_head.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ibot.teacher_patch_head.parameters()]
    ibot.after_step(0, 10)
    assert any(not torch.equal(a, b) for a, b in zip(before, ibot.teacher_patch_head.parameters(), strict=True))
    assert not hasattr(_ibot(), "patch_head")


def test_koleo_finds_neighbours_in_float32_under_bf16_autocast():
    # Point 0's nearest neighbour is point 2 (0.010 away, against 0.012), a difference bf16 rounds away.
    e = torch.eye(3)
    x = torch.stack([e[0], e[0] + 0.012 * e[1], e[0] + 0.010 * e[2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = koleo_loss(x)
    torch.testing.assert_close(got, koleo_loss(x.double()).float())


def test_koleo_is_added_when_weighted_and_trains():
    ibot = _ibot(koleo_weight=0.1).train()
    out = ibot(_batch())
    assert "loss_koleo" in out.logs and math.isfinite(out.logs["loss_koleo"])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ibot.encoder.parameters() if p.grad is not None)
    x = torch.randn(5, 3, requires_grad=True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert "loss_koleo" not in _ibot().train()(_batch()).logs


def test_koleo_is_dinos_term_added_to_ibots_loss():
    assert "koleo_weight" in DINO.Config.__dataclass_fields__
    batch, weight = _batch(), 0.2
    # each model is built from the same seed, so both draw the same masks after it
    plain = _ibot().train()(batch)
    out = _ibot(koleo_weight=weight).train()(batch)
    assert "loss_koleo" not in plain.logs
    assert torch.equal(out.loss, plain.loss + weight * torch.tensor(out.logs["loss_koleo"]))
