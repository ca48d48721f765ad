from __future__ import annotations

import json

import pytest
import torch

from mimkit.backbones import create_backbone
from mimkit.config import ConfigError, to_yaml
from mimkit.data.datasets import FILE_SOURCES
from mimkit.engine import CONFIG_FILE
from mimkit.engine.checkpoint import save_checkpoint
from mimkit.evaluation import dataset_features, extract_features, load_run_encoder, resolve_subject
from mimkit.evaluation.runner import result_name, run_config_for, run_knn, write_result
from mimkit.models import load_config, method_from_config

TINY = ["backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "method.decoder_dim=32",
        "method.decoder_depth=1", "method.decoder_heads=2"]


def test_resolve_subject_pixels(tmp_path):
    subject = resolve_subject(None, "pixels", None, [f"run_dir={tmp_path}"])
    assert subject.encoder is None
    assert subject.out_dir == tmp_path / "baseline-pixels"
    assert subject.tag == "pixels"
    assert subject.cfg.data.name == "fashion_mnist"


def test_resolve_subject_random_is_seeded(tmp_path):
    overrides = [f"run_dir={tmp_path}", *TINY]
    a = resolve_subject(None, "random", None, overrides, seed=0)
    b = resolve_subject(None, "random", None, overrides, seed=0)
    c = resolve_subject(None, "random", None, overrides, seed=1)
    assert a.out_dir == tmp_path / "baseline-random"
    assert a.encoder.embed_dim == 32 and a.encoder.in_chans == 1
    assert torch.equal(a.encoder.patch_embed.proj.weight, b.encoder.patch_embed.proj.weight)
    assert not torch.equal(a.encoder.patch_embed.proj.weight, c.encoder.patch_embed.proj.weight)
    assert a.tag != c.tag


def test_resolve_subject_errors(tmp_path):
    with pytest.raises(ConfigError, match="--baseline 'imagenet'.*pixels, random"):
        resolve_subject(None, "imagenet", None, [])
    with pytest.raises(ConfigError, match="give a run"):
        resolve_subject(None, None, None, [])


def _fake_run(tmp_path):
    """A run folder with a config and an (untrained) checkpoint, written without training."""
    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", *TINY])
    run.mkdir()
    (run / CONFIG_FILE).write_text(to_yaml(cfg))
    torch.manual_seed(3)
    method = method_from_config(cfg)
    ckpt = save_checkpoint(run / "checkpoints", 12, method, {"step": 12})
    return run, ckpt, method


def test_resolve_subject_run_and_load_encoder(tmp_path):
    run, ckpt, method = _fake_run(tmp_path)
    assert run_config_for(ckpt) == run / CONFIG_FILE
    subject = resolve_subject(str(run), None, None, ["data.img_size=32"])
    assert subject.out_dir == ckpt and subject.tag == str(ckpt.resolve())
    assert subject.cfg.data.img_size == 32  # data override on top of the run's config
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(subject.encoder.state_dict()[k], v), k
    encoder, cfg, found = load_run_encoder(run)
    assert found == ckpt and cfg.backbone["embed_dim"] == 32
    assert torch.equal(encoder.cls_token, method.encoder.cls_token)
    # a random baseline next to a run uses the run's architecture
    random = resolve_subject(str(run), "random", None, [])
    assert random.out_dir == run / "baseline-random"
    assert random.encoder.embed_dim == 32
    assert not torch.equal(random.encoder.cls_token, method.encoder.cls_token)


def test_run_config_missing(tmp_path, tiny_mae):
    ckpt = save_checkpoint(tmp_path / "a" / "b" / "c" / "d", 1, tiny_mae, {})
    with pytest.raises(ConfigError, match="no config.yaml"):
        run_config_for(ckpt)


def test_extract_features_pixels_and_encoder(tiny_encoder):
    batches = [(torch.randn(4, 1, 28, 28), torch.arange(4)), (torch.randn(2, 1, 28, 28), torch.arange(2))]
    x, y = extract_features(None, batches, torch.device("cpu"), "fp32", progress=False)
    assert x.shape == (6, 784) and torch.equal(y, torch.tensor([0, 1, 2, 3, 0, 1]))
    tiny_encoder.train()
    x, y = extract_features(tiny_encoder, batches, torch.device("cpu"), "fp32", progress=False)
    assert x.shape == (6, 32) and x.dtype == torch.float32
    assert not tiny_encoder.training  # frozen encoders are evaluated in eval mode


def test_extract_features_of_the_last_blocks():
    torch.manual_seed(0)
    enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=3, num_heads=2)
    batches = [(torch.randn(4, 1, 28, 28), torch.arange(4))]
    one, _ = extract_features(enc, batches, torch.device("cpu"), "fp32", progress=False)
    three, _ = extract_features(enc, batches, torch.device("cpu"), "fp32", progress=False, blocks=3)
    assert three.shape == (4, 96)
    torch.testing.assert_close(three[:, 64:], one)  # the last block's pooled features come last


def _labelled_folder(root, write_image):
    for split, n in (("train", 6), ("test", 3)):
        for k, cls in enumerate(("a", "b")):
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", value=40 + 170 * k + i)
    return root


def test_dataset_features_cached(tmp_path, write_image, data_cfg, monkeypatch):
    root = _labelled_folder(tmp_path / "imgs", write_image)
    cfg = data_cfg(name="imagefolder", root=str(root), subset_fraction=0.5)
    feats = dataset_features(None, cfg, tmp_path / "cache", "pixels", torch.device("cpu"), "fp32",
                             batch_size=4, progress=False)
    assert feats["train_x"].shape == (12, 3 * 8 * 8)  # subset_fraction does not apply to evaluation
    assert feats["test_x"].shape == (6, 192)
    assert sorted(feats["train_y"].tolist()) == [0] * 6 + [1] * 6
    assert int(feats["num_classes"]) == 2
    cached = list((tmp_path / "cache").glob("features-*.pt"))
    assert len(cached) == 1
    # a second call reads the cache and decodes nothing

    def no_decoding(*args, **kwargs):
        raise AssertionError("the dataset was loaded again")

    monkeypatch.setattr("mimkit.evaluation.features.build_dataset", no_decoding)
    again = dataset_features(None, cfg, tmp_path / "cache", "pixels", torch.device("cpu"), "fp32",
                             batch_size=4, progress=False)
    assert torch.equal(again["train_x"], feats["train_x"])
    knn = run_knn(None, (1,), 0.07, feats)
    assert knn["top1_k1"] == 100.0 and knn["feature_dim"] == 192


def test_dataset_features_train_fraction(tmp_path, write_image, data_cfg):
    root = _labelled_folder(tmp_path / "imgs", write_image)
    cfg = data_cfg(name="imagefolder", root=str(root))
    feats = dataset_features(None, cfg, None, "pixels", torch.device("cpu"), "fp32", batch_size=4,
                             progress=False, train_fraction=0.5)
    assert torch.bincount(feats["train_y"]).tolist() == [3, 3]
    assert feats["test_x"].shape[0] == 6


def test_dataset_features_needs_labels(tmp_path, write_image, data_cfg):
    write_image(tmp_path / "u" / "x.png")
    assert "unlabelled" in FILE_SOURCES
    with pytest.raises(ValueError, match="no labels"):
        dataset_features(None, data_cfg(name="unlabelled", root=str(tmp_path / "u")), None, "pixels",
                         torch.device("cpu"), "fp32", progress=False)


def test_write_result(tmp_path):
    subject = resolve_subject(None, "pixels", None, [f"run_dir={tmp_path}"])
    path = write_result(subject, "knn", {"top1_k20": 81.5})
    row = json.loads(path.read_text())
    assert path == tmp_path / "baseline-pixels" / "knn.json"
    assert row["top1_k20"] == 81.5 and row["evaluation"] == "knn" and row["dataset"] == "fashion_mnist"


def test_extract_features_keeps_cvt_batchnorm_statistics_frozen():
    """The source's probe ran the frozen encoder in train mode, so BatchNorm statistics kept moving."""
    torch.manual_seed(0)
    enc = create_backbone("cvt_micro_s2", in_chans=1, dims=(8, 16, 32), num_heads=(1, 1, 2), depths=(1, 1, 1))
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    assert before
    batches = [(torch.randn(4, 1, 28, 28) * 3 + 1, torch.arange(4)) for _ in range(3)]
    first, _ = extract_features(enc, batches, torch.device("cpu"), "fp32", progress=False)
    second, _ = extract_features(enc, batches, torch.device("cpu"), "fp32", progress=False)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert torch.equal(first, second)


def test_a_damaged_feature_cache_is_rebuilt(tmp_path, write_image, data_cfg, caplog):
    root = _labelled_folder(tmp_path / "imgs", write_image)
    cfg = data_cfg(name="imagefolder", root=str(root))
    args = (None, cfg, tmp_path / "cache", "pixels", torch.device("cpu"), "fp32")
    first = dataset_features(*args, batch_size=4, progress=False)
    (cache,) = (tmp_path / "cache").glob("features-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    again = dataset_features(*args, batch_size=4, progress=False)
    assert torch.equal(first["train_x"], again["train_x"])
    assert any("unreadable" in r.message for r in caplog.records)
    assert torch.load(cache, weights_only=True)["train_x"].shape == first["train_x"].shape


def test_result_names_differ_for_every_setting_that_changes_a_result(tmp_path):
    subject = resolve_subject(None, "pixels", None, [f"run_dir={tmp_path}"])
    other_data = resolve_subject(None, "pixels", None, [f"run_dir={tmp_path}", "data.img_size=32"])
    assert result_name(subject, "knn", {}) == "knn"
    variants = [
        (subject, "knn", {"train_fraction": 0.2}), (subject, "knn", {"blocks": 3}),
        (subject, "knn", {"k": (10,)}), (subject, "knn", {"temperature": 0.1}),
        (subject, "knn", {"precision": "bf16"}), (other_data, "knn", {}),
        (subject, "linprobe", {}), (subject, "linprobe", {"epochs": 50}), (subject, "linprobe", {"lr": 0.05}),
        (subject, "linprobe", {"probe_batch_size": 256}), (subject, "linprobe", {"seed": 1}),
        (subject, "knn", {"train_fraction": 0.2, "k": (10,)}),
    ]
    names = [result_name(s, cmd, settings) for s, cmd, settings in variants]
    assert len(set(names + ["knn"])) == len(names) + 1, names
    assert result_name(subject, "knn", {"k": [20, 200], "temperature": 0.07}) == "knn"
