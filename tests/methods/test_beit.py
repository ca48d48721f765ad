"""BEiT: block masks on small grids, the loss on the masked patches only, and a frozen tokenizer that
comes from its own run and is saved with the method."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import fake_run, tiny_method_cfg, tiny_tokenizer_settings
from safetensors.torch import load_file

from mimkit.backbones import create_backbone
from mimkit.config import to_yaml
from mimkit.engine.checkpoint import MODEL_FILE, latest_checkpoint
from mimkit.errors import ConfigError
from mimkit.masking import block_masks
from mimkit.masking.block import _block_mask_one
from mimkit.methods import create_method
from mimkit.models import load_config, method_from_config

TINY = dict(img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)


def _beit(backbone: str = "vit_tiny_p4", **cfg):
    torch.manual_seed(0)
    kwargs = TINY if backbone == "vit_tiny_p4" else dict(img_size=28, in_chans=1)
    return create_method({**tiny_method_cfg("beit", 28, backbone), **cfg}, create_backbone(backbone, **kwargs))


@pytest.mark.parametrize("min_block", [4, 16])
@pytest.mark.parametrize("side", [7, 8])
def test_block_masks_on_a_small_grid_hit_the_ratio_in_blocks(side, min_block):
    """On a 7 x 7 or 8 x 8 grid BEiT's masks hide exactly their share, and nearly all of it in blocks:
    a block that would overshoot is retried (BEiT's own generator gives up after ten tries and leaves
    the mask short), and only what the blocks leave is made up with single cells."""
    gen = torch.Generator().manual_seed(0)
    want = round(0.4 * side * side)
    masks = block_masks(40, side, side, 0.4, min_block=min_block, generator=gen)
    assert (masks.sum(1) == want).all()
    placed = [int(_block_mask_one(side, side, want, min_block, 1 / 0.3, gen).sum()) for _ in range(40)]
    assert sum(placed) / (40 * want) > 0.9


def test_the_loss_reads_the_codes_of_the_masked_patches_only(monkeypatch):
    beit = _beit().train()
    images = torch.randn(3, 1, 28, 28)
    codes = torch.randint(0, 16, (3, 49))
    monkeypatch.setattr(beit.tokenizer, "tokenize", lambda x: codes)
    torch.manual_seed(5)
    out = beit(images)
    changed = codes.clone()
    hidden = out.mask.bool()
    changed[~hidden] = (changed[~hidden] + 1) % 16  # every visible patch's code changes
    monkeypatch.setattr(beit.tokenizer, "tokenize", lambda x: changed)
    torch.manual_seed(5)
    assert torch.equal(beit(images).loss, out.loss)
    changed[hidden] = (changed[hidden] + 1) % 16  # and now the masked ones
    torch.manual_seed(5)
    assert not torch.equal(beit(images).loss, out.loss)
    assert 0.3 < float(out.mask.mean()) < 0.5 and 0 <= out.logs["mlm_acc"] <= 1


def test_the_tokenizer_is_frozen_in_eval_and_outside_the_optimizer_but_saved_with_the_method():
    beit = _beit().train()
    assert not beit.tokenizer.training and not beit.tokenizer.quantizer.training
    beit(torch.randn(2, 1, 28, 28)).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in beit.tokenizer.parameters())
    grouped = {id(p) for g in beit.param_groups(0.05) for p in g["params"]}
    assert not grouped & {id(p) for p in beit.tokenizer.parameters()}
    assert any(k.startswith("tokenizer.quantizer.codebook") for k in beit.state_dict())


def test_a_tokenizer_on_another_grid_is_refused():
    beit = _beit(tokenizer_settings=tiny_tokenizer_settings("cvt_micro_s2"))
    with pytest.raises(ConfigError, match="4 x 4 grid of codes and the encoder a 7 x 7 grid"):
        beit.check_image_size(28, 28)


def test_beit_without_a_tokenizer_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="method.tokenizer: name the tokenizer run"):
        method_from_config(load_config(None, ["method.name=beit", "backbone.name=vit_tiny_p4"]))
    with pytest.raises(ConfigError, match="method.tokenizer: no run at"):
        load_config(None, ["method.name=beit", "method.tokenizer=/no/such/run"])


def test_a_beit_run_needs_its_own_folder_only(tmp_path):
    """Named by its run, the tokenizer's settings are recorded in BEiT's settings and its weights are
    read from its newest checkpoint at a fresh start; the BEiT run's own config.yaml then rebuilds it
    after the tokenizer's folder is gone, and its checkpoint holds the tokenizer's weights."""
    tok_run = fake_run(tmp_path / "tok", tiny_tokenizer_settings(), seed=7)
    over = ["backbone.name=vit_tiny_p4", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
            "data.channels=1", "method.name=beit", f"method.tokenizer={tok_run}"]
    cfg = load_config(None, over)
    assert cfg.method.tokenizer_settings["method"]["name"] == "vqvae"
    beit = method_from_config(cfg)
    beit.load_helpers()
    tok_weights = load_file(str(latest_checkpoint(tok_run / "checkpoints") / MODEL_FILE))
    for k, v in beit.tokenizer.state_dict().items():
        assert torch.equal(v, tok_weights[k]), k
    own = fake_run(tmp_path / "beit", cfg)  # as a run writes it: its settings with the tokenizer's
    shutil.rmtree(tok_run)
    again = method_from_config(load_config(own / "config.yaml"))
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in beit.state_dict().items()}
    assert (own / "config.yaml").read_text() == to_yaml(load_config(own / "config.yaml"))
