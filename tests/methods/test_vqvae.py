"""The visual tokenizers: a VQ-VAE of pixels, k-means of patches, and VQ-KD of a teacher run's features."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import fake_run, fixed_batch_losses, tiny_tokenizer_settings
from safetensors.torch import load_file

from mimkit.backbones import create_backbone
from mimkit.errors import ConfigError
from mimkit.methods import create_method
from mimkit.methods.losses import patchify
from mimkit.methods.quantizer import nearest
from mimkit.methods.vqvae import VQTokenizer, patch_side
from mimkit.models import load_config, method_from_config

TINY = dict(img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)


def _tokenizer(**cfg) -> VQTokenizer:
    torch.manual_seed(0)
    settings = {"num_codes": 16, "code_dim": 8, "decoder_dim": 16, "decoder_depth": 1, **cfg}
    return create_method({"name": "vqvae", **settings}, create_backbone("vit_tiny_p4", **TINY))


def test_a_pixel_tokenizer_learns_to_reconstruct_a_batch():
    tok = _tokenizer().train()
    smooth = F.interpolate(torch.randn(8, 1, 7, 7, generator=torch.Generator().manual_seed(1)), size=28,
                           mode="bilinear")  # images with structure a few codes can hold
    losses = fixed_batch_losses(tok, smooth, steps=30, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_tokenize_gives_the_nearest_codes_and_leaves_the_codebook_alone():
    tok = _tokenizer().train()
    images = torch.randn(4, 1, 28, 28)
    tok(images)
    tok.after_step(0, 10)
    before = {k: v.clone() for k, v in tok.quantizer.state_dict().items()}
    codes = tok.tokenize(images)
    assert codes.shape == (4, 49) and codes.dtype == torch.long and tok.quantizer.training
    with torch.no_grad():
        want = nearest(tok.encode(images).reshape(-1, 8), tok.quantizer.codebook).view(4, 49)
    assert torch.equal(codes, want)
    tok.after_step(1, 10)  # nothing pending from tokenize
    for k, v in tok.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_patch_kmeans_quantises_the_patches_and_trains_only_its_decoder():
    tok = _tokenizer(source="patches").train()
    images = torch.randn(4, 1, 28, 28)
    out = tok(images)
    out.loss.backward()
    assert tok.to_code is None and not any(p.requires_grad for p in tok.encoder.parameters())
    assert all(p.grad is not None for p in tok.decoder.parameters())
    assert not tok.encoder.training
    patches = patchify(images, patch_side(tok.encoder)).reshape(-1, 16)
    assert torch.equal(tok.tokenize(images).flatten(), nearest(patches, tok.quantizer.codebook))


def test_the_collapse_warning_names_what_to_change(caplog):
    tok = _tokenizer(source="patches", min_usage=0.99, dead_threshold=0).train()
    tok(torch.zeros(2, 1, 28, 28))  # every patch the same: one code in use
    with caplog.at_level(logging.WARNING):
        tok.after_step(9, 10)
    assert "codebook collapse" in caplog.text and "method.num_codes" in caplog.text


def test_an_image_the_grid_does_not_cut_is_refused():
    tok = create_method({"name": "vqvae", "num_codes": 8, "code_dim": 4, "decoder_dim": 8},
                        create_backbone("cvt_micro_s2", img_size=28, in_chans=1))
    with pytest.raises(ConfigError, match="does not cut it into"):
        tok.check_image_size(30, 30)
    tok.check_image_size(28, 28)


def test_a_vqkd_tokenizer_learns_from_a_frozen_teacher_run(tmp_path):
    """VQ-KD: the targets are a teacher run's features; the teacher is rebuilt from the recorded
    settings, loaded once from its run, never trained and kept in evaluation mode."""
    teacher_settings = {**tiny_tokenizer_settings(), "method": {"name": "data2vec2", "decoder_dim": 16}}
    teacher_run = fake_run(tmp_path / "teacher", teacher_settings, seed=3)
    cfg = load_config(None, ["backbone.name=vit_tiny_p4", "backbone.embed_dim=32", "backbone.depth=1",
                             "backbone.num_heads=2", "data.channels=1", "method.name=vqvae",
                             "method.target=teacher", f"method.teacher={teacher_run}", "method.normalize=true",
                             "method.num_codes=16", "method.code_dim=8", "method.decoder_dim=16"])
    assert cfg.method.teacher_settings["method"]["name"] == "data2vec2"
    tok = method_from_config(cfg)
    tok.load_helpers()
    weights = load_file(str(teacher_run / "checkpoints" / "step_00000001" / "model.safetensors"))
    for k, v in tok.teacher.state_dict().items():  # the teacher run's evaluated encoder
        assert torch.equal(v, weights[tok._teacher_prefix + k]), k
    tok.train()
    assert not tok.teacher.training and not any(p.requires_grad for p in tok.teacher.parameters())
    out = tok(torch.randn(4, 1, 28, 28))
    out.loss.backward()
    assert out.pred is None and torch.isfinite(out.loss)
    assert all(p.grad is None for p in tok.teacher.parameters())
    assert torch.allclose(tok.quantizer.codebook.norm(dim=-1), torch.ones(16))


def test_vqkd_without_a_teacher_is_refused_with_what_to_give():
    with pytest.raises(ConfigError, match="method.target=teacher needs method.teacher"):
        load_config(None, ["method.name=vqvae", "method.target=teacher"])
    with pytest.raises(ConfigError, match="method.teacher: no run at"):
        load_config(None, ["method.name=vqvae", "method.target=teacher", "method.teacher=/no/such/run"])
