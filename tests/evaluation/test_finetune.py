"""Fine-tuning: initialisation from a run, scratch, partial fine-tuning, layer decay, scoring."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import latest_checkpoint
from mimkit.engine.distributed import DistInfo
from mimkit.engine.trainer import Trainer
from mimkit.errors import ConfigError
from mimkit.evaluation.finetune import finetune_config
from mimkit.models import load_config

pytestmark = [pytest.mark.fmnist, pytest.mark.slow]
# A 5 % per-class subset (3000 images), one short epoch of fine-tuning.
SHORT = ["data.subset_fraction=0.05", "train.epochs=0.3", "train.progress=false", "optim.batch_size=64"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from conftest import TINY_RUN_OVERRIDES

    run = tmp_path_factory.mktemp("ft") / "mae"
    pretrain(load_config(None, [f"run_dir={run}", *TINY_RUN_OVERRIDES, "backbone.depth=2", "train.epochs=1"]))
    return run


def _encoder_weights(ckpt):
    return {k[len("encoder."):]: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
            if k.startswith("encoder.")}


def test_finetune_starts_from_the_pretrained_encoder(pretrained):
    cfg = finetune_config(str(pretrained), overrides=SHORT)
    assert cfg.method.name == "finetune" and cfg.method.num_classes == 10
    assert cfg.run_dir == str(pretrained / "finetune-fmnist")
    assert cfg.backbone["embed_dim"] == 32 and cfg.backbone["drop_path_rate"] == 0.1
    trainer = Trainer(cfg, DistInfo())
    pre = _encoder_weights(latest_checkpoint(pretrained / "checkpoints"))
    own = trainer.method.encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in pre.items())
    scratch_cfg = finetune_config(str(pretrained), overrides=SHORT, scratch=True)
    assert scratch_cfg.method.layer_decay == 1.0 and scratch_cfg.init == ""
    assert scratch_cfg.method.label_smoothing == 0.1, "the rest of the recipe is the same"
    scratch = Trainer(scratch_cfg, DistInfo())
    assert not all(torch.equal(scratch.method.encoder.state_dict()[k], v) for k, v in pre.items())


def test_layer_decay_scales_the_lr_by_depth(pretrained):
    trainer = Trainer(finetune_config(str(pretrained), overrides=[*SHORT, "method.layer_decay=0.5"]), DistInfo())
    scales = sorted({g["lr_scale"] for g in trainer.optimizer.param_groups})
    # stem and two blocks (the final norm sits with the last block), then the head at 1
    assert scales == pytest.approx([0.125, 0.25, 0.5, 1.0])
    head = [g for g in trainer.optimizer.param_groups if any(p is trainer.method.head.weight for p in g["params"])]
    assert head[0]["lr_scale"] == 1.0


@pytest.mark.parametrize("k", [0, 1])
def test_partial_finetuning_trains_only_the_last_k_groups(pretrained, k, tmp_path):
    cfg = finetune_config(str(pretrained), overrides=[*SHORT, f"method.trainable_blocks={k}",
                                                      f"run_dir={tmp_path / 'partial'}"])
    trainer = Trainer(cfg, DistInfo())
    before = {n: p.detach().clone() for n, p in trainer.method.named_parameters()}
    trainer.fit()
    changed = {n for n, p in trainer.method.named_parameters() if not torch.equal(before[n], p)}
    assert {"head.weight", "head.bias"} <= changed
    encoder_changed = {n for n in changed if n.startswith("encoder.")}
    if k == 0:
        assert not encoder_changed, "k=0 is a linear head on a frozen encoder"
    else:
        assert encoder_changed and all(n.startswith(("encoder.blocks.1.", "encoder.norm.")) for n in encoder_changed)


def test_finetune_command_scores_and_reports(pretrained, capsys):
    assert main(["finetune", str(pretrained), *SHORT]) == 0
    out = capsys.readouterr().out
    ckpt = latest_checkpoint(pretrained / "finetune-fmnist" / "checkpoints")
    result = json.loads((ckpt / "finetune.json").read_text())
    assert result["test_images"] == 10000 and 10.0 < result["top1"] <= 100.0  # above chance after ~15 steps
    assert f"top-1 {result['top1']:.2f}%" in out
    assert (pretrained / "finetune-fmnist" / "loss_curve.png").is_file()
    assert main(["report", str(pretrained)]) == 0
    table = capsys.readouterr().out
    assert f"| {result['top1']:.2f} |" in table and "fine-tune (%)" in table
    # a second fine-tune into the same folder is refused, as any run is
    assert main(["finetune", str(pretrained), *SHORT]) == 2


def test_finetune_refuses_what_it_cannot_score(pretrained, tmp_path, write_image):
    with pytest.raises(ConfigError, match="method.num_classes 7 does not match the 10 classes"):
        finetune_config(str(pretrained), overrides=[*SHORT, "method.num_classes=7"])
    with pytest.raises(ConfigError, match="give a pre-training run to fine-tune, or --scratch with --config"):
        finetune_config(None)
    with pytest.raises(ConfigError, match="trainable_blocks 9 is more than the 3 parameter groups"):
        Trainer(finetune_config(str(pretrained), overrides=[*SHORT, "method.trainable_blocks=9"]), DistInfo())
    for i in range(4):
        write_image(tmp_path / "u" / f"{i}.png", value=40 * i, size=(8, 8))
    with pytest.raises(ConfigError, match="fine-tuning needs a labelled dataset"):
        finetune_config(str(pretrained), overrides=[*SHORT, "data.name=unlabelled", f"data.root={tmp_path / 'u'}"])


def test_finetune_with_mixup_augmentation_and_ema_resumes_exactly(pretrained, tmp_path):
    """Mixup and CutMix draw from NumPy's RNG, which the checkpoint carries, RandAugment and erasing from
    per-batch generators, and the weight average is in the checkpoint: a resume is bit-identical."""
    import shutil

    from mimkit.engine.checkpoint import list_checkpoints
    from mimkit.evaluation.finetune import test_accuracy

    settings = [*SHORT, "method.mixup=0.8", "method.cutmix=1.0", "train.ckpt_every_steps=4", "train.keep_last=0",
                "train.deterministic=true", "data.randaugment_ops=2", "data.random_erasing=0.25",
                "method.ema_decay=0.8"]
    full = pretrain(finetune_config(str(pretrained), overrides=[*settings, f"run_dir={tmp_path / 'full'}"]))
    last = latest_checkpoint(full / "checkpoints")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for c in list_checkpoints(part / "checkpoints"):
        if int(c.name[5:]) > 4:
            shutil.rmtree(c)
    pretrain(finetune_config(str(pretrained), overrides=[*settings, f"run_dir={part}"]), resume="auto")
    a = load_file(str(last / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / last.name / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert "ema.module.head.weight" in a and not torch.equal(a["ema.module.head.weight"], a["head.weight"])
    result = test_accuracy(finetune_config(str(pretrained), overrides=[*settings, f"run_dir={part}"]), last)
    assert 10.0 < result["top1_ema"] <= 100.0 and "top1" in result


def test_the_weight_average_starts_from_the_trained_weights(pretrained, tmp_path):
    """The first steps copy the weights, so the average never holds the head's random initialisation."""
    cfg = finetune_config(str(pretrained), overrides=[*SHORT, "method.ema_decay=0.99", f"run_dir={tmp_path / 'e'}"])
    method = Trainer(cfg, DistInfo()).method
    method.head.weight.data.add_(1.0)
    method.after_step(0, 10)
    assert torch.equal(method.ema.module["head"].weight, method.head.weight)
    before = method.ema.module["head"].weight.clone()
    method.head.weight.data.add_(1.0)
    method.after_step(5, 10)
    torch.testing.assert_close(method.ema.module["head"].weight, before + 0.01)


def test_finetune_at_another_resolution_than_pretraining(pretrained, tmp_path):
    """The ViT's sin-cos position embedding is computed for the grid it is given: nothing to interpolate."""
    from mimkit.evaluation.finetune import finished_checkpoint, test_accuracy

    cfg = finetune_config(str(pretrained), overrides=[*SHORT, "data.img_size=16", f"run_dir={tmp_path / 'r16'}"])
    trainer = Trainer(cfg, DistInfo())
    pre = _encoder_weights(latest_checkpoint(pretrained / "checkpoints"))
    assert all(torch.equal(trainer.method.encoder.state_dict()[k], v) for k, v in pre.items())
    trainer.fit()
    result = test_accuracy(cfg, finished_checkpoint(cfg))
    assert result["test_images"] == 10000 and 10.0 < result["top1"] <= 100.0


def test_a_finetuning_continues_after_its_start_checkpoint_is_rotated_away(tmp_path, tiny_run_overrides):
    """A continuation takes its weights from its own checkpoint: the pre-training checkpoint it started
    from may be gone (the run was continued and rotated it), and the record still names that one."""
    from mimkit.evaluation.finetune import run_finetune

    run = tmp_path / "mae"
    settings = [f"run_dir={run}", *tiny_run_overrides, "train.epochs=1", "train.keep_last=1"]
    pretrain(load_config(None, settings))
    start = latest_checkpoint(run / "checkpoints").resolve()
    tuning = ["data.subset_fraction=0.01", "train.epochs=1", "train.progress=false", "optim.batch_size=32",
              "train.ckpt_every_steps=5"]
    with pytest.raises(KeyboardInterrupt):  # stopped by hand after its first checkpoint
        import mimkit.engine.trainer as trainer_module

        real = trainer_module.Trainer.checkpoint

        def stop(self, batch):
            real(self, batch)
            raise KeyboardInterrupt

        trainer_module.Trainer.checkpoint = stop
        try:
            run_finetune(finetune_config(str(run), overrides=tuning))
        finally:
            trainer_module.Trainer.checkpoint = real
    pretrain(load_config(None, [*settings, "train.epochs=2"]), resume="auto")
    assert not start.exists(), "the pre-training run rotated its old checkpoint away"
    newest = latest_checkpoint(run / "checkpoints")
    with pytest.raises(ConfigError, match=r"under other settings \(init: run "):
        # Named explicitly, another checkpoint is another fine-tuning, not this one's continuation.
        run_finetune(finetune_config(str(newest), overrides=tuning, resume=True), resume="auto")
    result, path, _ = run_finetune(finetune_config(str(run), overrides=tuning, resume=True), resume="auto")
    assert json.loads(path.read_text())["init"] == str(start), "the record names the checkpoint it started from"
    assert 0.0 <= result["top1"] <= 100.0
