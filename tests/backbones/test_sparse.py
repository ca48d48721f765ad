"""The CvT's sparse mode: the blocks compute the visible tokens alone, equal to a dense reference that
masks the same positions, with no padding, hidden position or other image of the batch in any result.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mimkit.backbones import ConvVisionTransformer, create_backbone
from mimkit.backbones.cvt import UPDATE_MASKS
from mimkit.backbones.layers.partial_conv import window_count
from mimkit.backbones.layers.sparse import Packed, batch_norm_where
from mimkit.errors import ConfigError
from mimkit.masking import pixel_block_mask
from mimkit.models import load_config, method_from_config

TINY = dict(in_chans=1, dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 2, 2))
REWEIGHTS = [u for u in UPDATE_MASKS if u != "none"]


@pytest.fixture
def cvt() -> ConvVisionTransformer:
    torch.manual_seed(0)
    return create_backbone("cvt_micro_s2", **TINY)


def _visible(n: int = 4, size: int = 28, block: int = 4, ratio: float = 0.75, seed: int = 0) -> torch.Tensor:
    # Random blocks: the images keep different numbers of tokens at every stage, so packing pads.
    return 1.0 - pixel_block_mask(n, size, size, block, ratio, generator=torch.Generator().manual_seed(seed))


def _dense_reference(cvt: ConvVisionTransformer, x: torch.Tensor, visible: torch.Tensor,
                     update_mask: str, propagate: str = "window") -> list[torch.Tensor]:
    """The sparse mode written densely: every position computed, the hidden ones masked out of every
    convolution, BatchNorm statistic and attention, and zeroed after every block."""
    maps = []
    for stage in cvt.stages:
        x, visible = stage.embed(x, visible, update_mask, propagate)
        n, d, h, w = x.shape
        vis = visible.flatten(1) > 0  # [N, HW]
        tokens = x.flatten(2).transpose(1, 2)
        for block in stage.blocks:
            attn = block.attn
            fmap = (block.norm1(tokens) * vis[..., None]).transpose(1, 2).reshape(n, d, h, w)
            conv = attn.conv_k.conv
            filled = window_count(visible, conv.kernel_size[0], conv.stride[0], conv.padding[0]).flatten(1) > 0
            q = batch_norm_where(attn.conv_q.bn, attn.conv_q.conv_map(fmap).flatten(2).transpose(1, 2), vis)
            k, v = (batch_norm_where(p.bn, p.conv_map(fmap).flatten(2).transpose(1, 2), filled)
                    for p in (attn.conv_k, attn.conv_v))
            q, k, v = (attn._heads(proj(t)) for proj, t in ((attn.proj_q, q), (attn.proj_k, k), (attn.proj_v, v)))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=filled[:, None, None, :])
            tokens = tokens + attn.proj(out.transpose(1, 2).reshape(n, h * w, d))
            tokens = (tokens + block.mlp(block.norm2(tokens))) * vis[..., None]
        x = tokens.transpose(1, 2).reshape(n, d, h, w)
        maps.append(x)
    maps[-1] = cvt.norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return maps


def test_packing_gathers_and_scatters_the_visible_positions_in_raster_order():
    visible = torch.zeros(3, 1, 2, 3)
    visible[0, 0, 0, 1] = visible[0, 0, 1, 2] = 1
    visible[1] = 1
    packed = Packed.of(visible)  # image 2 shows nothing
    assert packed.length == 6 and packed.valid.sum(1).tolist() == [2, 6, 0]
    assert packed.count == 8 and packed.padded
    assert packed.index[0, :2].tolist() == [1, 5] and packed.index[1].tolist() == list(range(6))
    for index, valid in zip(packed.index, packed.valid, strict=True):  # an image's padding: its own slots past the map
        assert (index[~valid] >= 6).all() and len(set(index.tolist())) == len(index)
    fmap = torch.randn(3, 5, 2, 3)
    tokens = packed.gather(fmap)
    assert tokens.shape == (3, 6, 5) and torch.equal(tokens[~packed.valid], torch.zeros(10, 5))
    assert torch.equal(packed.scatter(tokens), fmap * visible)
    assert torch.equal(packed.mask(), visible)
    same = Packed.of(visible[:1].expand(2, -1, -1, -1))  # two images alike: no padding, no tail to read
    assert same.count == 4 and not same.padded and same.index.max() < 6
    assert torch.equal(same.scatter(same.gather(fmap[:2])), fmap[:2] * visible[:1])


def test_the_sparse_stages_hand_on_the_dense_stages_layout(cvt):
    """The blocks get contiguous tokens and the next layers maps laid out as the dense mode's:
    convolutions were measured at half the speed on a channels-first copy (BENCHMARKS.md, section 31)."""
    x, visible = torch.randn(4, 1, 28, 28), _visible()
    packed = Packed.of(cvt.stage_visible(visible, "window")[0])
    assert packed.gather(torch.randn(4, 5, 14, 14)).is_contiguous()
    sparse = cvt.forward_stages(x, visible, "pre_norm", sparse=True)
    dense = cvt.forward_stages(x, visible, "pre_norm")
    for got, want in zip(sparse, dense, strict=True):
        assert got.stride()[1:] == want.stride()[1:]  # within an image; padding may sit between images


@pytest.mark.parametrize("update_mask,propagate", [*[(u, "window") for u in REWEIGHTS], ("pre_norm", "cell")])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("alike", [False, True], ids=["padded", "unpadded"])
def test_sparse_equals_the_dense_reference(cvt, update_mask, propagate, train, alike):
    """In fp32 the sparse stages equal the dense computation that masks the same positions, in training
    (BatchNorm on the batch) and evaluation; hidden positions hold nothing in both. With one mask for
    every image no packing pads, and the unpadded paths (no zero tail, BatchNorm of every token, no
    attention mask) are the ones checked."""
    cvt.train(train)
    reference = copy.deepcopy(cvt)  # BatchNorm's running averages move in training: one copy each
    x, visible = torch.randn(4, 1, 28, 28), _visible()
    if alike:
        visible = visible[:1].repeat(4, 1, 1, 1)
        stages = [cvt.stages[s].blocks[0].attn.sparse_stage(m) for s, m in
                  enumerate(cvt.stage_visible(visible, propagate))]
        assert not any(p.tokens.padded or p.keys.padded for p in stages)
    sparse = cvt.forward_stages(x, visible, update_mask, sparse=True, propagate=propagate)
    dense = _dense_reference(reference, x, visible, update_mask, propagate)
    for s, (got, want) in enumerate(zip(sparse, dense, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"stage {s}")
    for name, buf in cvt.named_buffers():
        torch.testing.assert_close(buf, dict(reference.named_buffers())[name], msg=name)


def test_the_reference_is_not_the_dense_mode(cvt):
    """The equality above can fail: the dense mode lets hidden tokens into the convolutions and the
    attention, and differs from the reference."""
    cvt.eval()
    x, visible = torch.randn(4, 1, 28, 28), _visible()
    dense = cvt.forward_stages(x, visible, "pre_norm")
    reference = _dense_reference(cvt, x, visible, "pre_norm")
    assert (dense[1] - reference[1]).abs().max() > 1e-2


def test_an_image_is_encoded_alone_whatever_else_the_batch_holds(cvt):
    """Padding to the batch's longest image changes nothing: each image as in a batch of its own."""
    cvt.eval()
    x, visible = torch.randn(4, 1, 28, 28), _visible()
    batch = cvt.forward_stages(x, visible, "pre_norm", sparse=True)
    for i in range(4):
        alone = cvt.forward_stages(x[i:i + 1], visible[i:i + 1], "pre_norm", sparse=True)
        for got, want in zip(alone, batch, strict=True):
            torch.testing.assert_close(got[0], want[i], rtol=1e-5, atol=1e-6)


def test_all_visible_sparse_equals_the_plain_encoder(cvt):
    cvt.eval()
    x = torch.randn(2, 1, 28, 28)
    plain = cvt.forward_stages(x)
    sparse = cvt.forward_stages(x, torch.ones(2, 1, 28, 28), "pre_norm", sparse=True)
    for got, want in zip(sparse, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_norm_of_every_token_is_batch_norm(momentum, train):
    bn = torch.nn.BatchNorm2d(8, momentum=momentum).train(train)
    bn.running_mean.uniform_(-1, 1)
    ref = copy.deepcopy(bn)
    for _ in range(2):
        tokens = torch.randn(3, 5, 8)
        got = batch_norm_where(bn, tokens, torch.ones(3, 5, dtype=torch.bool))
        want = ref(tokens.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        torch.testing.assert_close(got, want)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(bn.named_buffers())[name], buf, msg=name)


@pytest.mark.parametrize("every", [False, True], ids=["some-kept", "all-kept"])
def test_batch_norm_given_the_kept_count_gives_the_same_numbers(every):
    """The count-aware paths (every token kept; the kept rows found without a device sync) against the
    boolean-index path: the same outputs, gradients and running statistics."""
    torch.manual_seed(0)
    keep = torch.ones(3, 5, dtype=torch.bool) if every else torch.rand(3, 5) > 0.4
    tokens = (torch.randn(3, 5, 8) * keep[..., None]).requires_grad_(True)
    outs, grads, stats = [], [], []
    for kept in (None, int(keep.sum())):
        bn = torch.nn.BatchNorm2d(8).train()
        out = batch_norm_where(bn, tokens, keep, kept)
        (grad,) = torch.autograd.grad((out * torch.arange(8.0)).sum(), tokens)
        outs.append(out), grads.append(grad), stats.append((bn.running_mean.clone(), bn.running_var.clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats[1], stats[0], rtol=0, atol=0)


def test_batch_norm_of_one_token_uses_the_running_statistics():
    bn = torch.nn.BatchNorm2d(4).train()
    keep = torch.zeros(2, 3, dtype=torch.bool)
    keep[1, 2] = True
    out = batch_norm_where(bn, torch.randn(2, 3, 4), keep)
    assert torch.isfinite(out).all() and int(bn.num_batches_tracked) == 0


def test_an_image_with_nothing_visible_trains_finite(cvt):
    """Its attention rows have no key window; they must not turn into NaN gradients."""
    cvt.train()
    visible = _visible(3)
    visible[1] = 0
    maps = cvt.forward_stages(torch.randn(3, 1, 28, 28), visible, "pre_norm", sparse=True)
    sum(m.square().mean() for m in maps).backward()
    assert all(torch.isfinite(m).all() for m in maps)
    assert all(torch.isfinite(p.grad).all() for p in cvt.parameters() if p.grad is not None)


@pytest.mark.parametrize("update_mask", REWEIGHTS)
def test_sparse_under_bf16_autocast_is_finite_and_every_parameter_learns(cvt, update_mask):
    cvt.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = cvt.forward_stages(torch.randn(4, 1, 28, 28), _visible(ratio=0.9), update_mask, sparse=True)
    assert all(torch.isfinite(m.float()).all() for m in maps)
    sum(m.float().square().mean() for m in maps).backward()
    missing = [n for n, p in cvt.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_sparse_needs_a_propagated_mask(cvt):
    with pytest.raises(ConfigError, match="update_mask"):
        cvt.forward_stages(torch.randn(1, 1, 28, 28), _visible(1), "none", sparse=True)
    with pytest.raises(ConfigError, match="method.sparse .* needs method.update_mask"):
        load_config("cvt_mae_fmnist_s4", ["method.sparse=true", "method.update_mask=none"])


def test_the_cvt_mae_setting_runs_the_encoder_sparse(cvt, monkeypatch):
    cfg = load_config("cvt_mae_fmnist_s4", ["method.sparse=true"])
    method = method_from_config(cfg)
    seen = []
    forward_stages = method.encoder.forward_stages
    monkeypatch.setattr(method.encoder, "forward_stages", lambda *a, **k: seen.append(k) or forward_stages(*a, **k))
    method(torch.randn(4, 1, 28, 28)).loss.backward()
    assert seen == [{"sparse": True}]
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


def test_stage_visible_is_the_propagated_mask_of_every_stage(cvt):
    visible = _visible()
    x = torch.randn(4, 1, 28, 28)
    for stage, mask in zip(cvt.stages, cvt.stage_visible(visible), strict=True):
        x, visible = stage.embed(x, visible)
        assert torch.equal(mask, visible)


def test_a_cell_propagated_hole_of_the_last_grid_stays_a_hole_at_every_stage(cvt):
    """With the mask drawn on the last stage's grid (8 px at 32 px: grids 16, 8, 4), ``cell`` hides the
    mask ratio at every stage, where the update mask's windows shrink the holes stage by stage."""
    hole = pixel_block_mask(64, 32, 32, 8, 0.75, generator=torch.Generator().manual_seed(0))
    cell = [1 - m.mean().item() for m in cvt.stage_visible(1 - hole, "cell")]
    window = [1 - m.mean().item() for m in cvt.stage_visible(1 - hole, "window")]
    assert cell == pytest.approx([0.75, 0.75, 0.75])
    assert window[0] < 0.75 and window[2] < window[0]
    for grid, mask in zip(cvt.stage_grids(32, 32), cvt.stage_visible(1 - hole, "cell"), strict=True):
        assert tuple(mask.shape[-2:]) == grid
