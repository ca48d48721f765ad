"""Shared fixtures: tiny models, tiny configs, synthetic image folders, Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.backbones import BACKBONES, backbones_taking, create_backbone
from mimkit.config import DataConfig, PretrainConfig
from mimkit.data import Batch
from mimkit.data.datasets import DEBIAN_FASHION_MNIST
from mimkit.data.views import expand_views
from mimkit.methods import METHODS, create_method
from mimkit.models import load_config

# The machine is shared and has 2 cores: OpenMP threads spinning against other processes made a
# tiny forward/backward ~20x slower than with one thread. One thread keeps the suite fast and
# deterministic; MIMKIT_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("MIMKIT_TEST_THREADS", "1")))

TINY_VIT = dict(img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
TINY_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)

# Overrides that make a pre-training run take seconds: a 1%-per-class Fashion-MNIST subset
# (600 images), a one-block 32-wide encoder and decoder, fp32 on the CPU, no progress bar.
TINY_RUN_OVERRIDES = [
    "data.subset_fraction=0.01",
    "optim.batch_size=32",
    "optim.base_lr=8e-3",
    "optim.warmup_epochs=0.25",
    "backbone.embed_dim=32",
    "backbone.depth=1",
    "backbone.num_heads=2",
    "method.decoder_dim=32",
    "method.decoder_depth=1",
    "method.decoder_heads=2",
    "train.precision=fp32",
    "train.device=cpu",
    "train.progress=false",
    "train.log_every=3",
]

# Tiny per-family settings; every registered backbone is built from its own preset plus these.
TINY_FAMILY = {
    "VisionTransformer": dict(embed_dim=32, depth=1, num_heads=2),
    "ConvVisionTransformer": dict(dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 1, 1)),
    "SwinTransformer": dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), window_size=4),
}


def family(name: str) -> str:
    """The class a registered backbone builds (the key of :data:`TINY_FAMILY`)."""
    return getattr(BACKBONES[name], "func", BACKBONES[name]).__name__


def preset(name: str) -> dict:
    """The settings a registry entry fixes for its backbone."""
    builder = BACKBONES[name]
    return dict(builder.keywords) if isinstance(builder, functools.partial) else {}


def _accepted(name: str) -> set[str]:
    builder = BACKBONES[name]
    target = builder.func if isinstance(builder, functools.partial) else builder
    return set(inspect.signature(target).parameters)


def tiny_backbone_kwargs(name: str, in_chans: int = 3) -> tuple[dict, int]:
    """Small settings a builder accepts, and an image size its patch size divides."""
    patch = preset(name).get("patch_size", 16)
    img = 2 * patch if patch >= 8 else 4 * patch
    wanted = {**TINY_FAMILY[family(name)], "img_size": img, "in_chans": in_chans}
    return {k: v for k, v in wanted.items() if k in _accepted(name)}, img


def tiny_tokenizer_settings(backbone: str = "vit_tiny_p4", in_chans: int = 1) -> dict:
    """The recorded settings of a tiny tokenizer run (16 codes) on ``backbone``'s tiny grid: what a
    BEiT's ``method.tokenizer_settings`` holds, so that a test builds BEiT without a tokenizer run."""
    kwargs, img = tiny_backbone_kwargs(backbone, in_chans)
    kwargs.pop("img_size"), kwargs.pop("in_chans")
    return {"data": {"img_size": img, "channels": in_chans}, "backbone": {"name": backbone, **kwargs},
            "method": {"name": "vqvae", "num_codes": 16, "code_dim": 8, "decoder_dim": 16, "decoder_depth": 1}}


def tiny_method_cfg(name: str, img_size: int | None = None, backbone: str = "vit_tiny_p4") -> dict:
    """``method:`` settings that make method ``name`` small (a one-block decoder, three classes, small heads).

    With ``img_size``, a method that declares views of their own size (DINO's local crops) gets
    them at half the image, at most two of each kind. A method with a frozen tokenizer (BEiT) gets
    a tiny one on ``backbone``'s grid, for grey images.
    """
    fields = {f.name for f in dataclasses.fields(METHODS[name].Config)}
    small = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "num_classes": 3,
             "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "num_codes": 16, "code_dim": 8}
    cfg = {"name": name, **{k: v for k, v in small.items() if k in fields}}
    if "tokenizer_settings" in fields:
        cfg["tokenizer_settings"] = tiny_tokenizer_settings(backbone)
    views = METHODS[name].Config().views
    if img_size is not None and any(v.get("size") for v in views):
        cfg["views"] = [{**v, "size": img_size // 2 if v.get("size") else 0, "count": min(v.get("count", 1), 2)}
                        for v in views]
    return cfg


def method_batch(method, images: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    """A batch of ``images`` as ``method`` trains on it: one view, or each of its views resized from
    ``images`` (shifted by a pixel per view, so that no two are equal)."""
    specs = expand_views(method.views)
    if len(specs) == 1 and not specs[0].size:
        return Batch(images, labels)
    side = images.shape[-1]
    views = tuple(F.interpolate(torch.roll(images, i, dims=-1), size=s.resolved_size(side), mode="bilinear",
                                antialias=True) for i, s in enumerate(specs))
    return Batch(views[0], labels, views if len(views) > 1 else ())


#: A tiny teacher-student setting: small heads, two 28 px global and two 12 px local views.
TINY_TEACHER_STUDENT = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16,
                        "views": [{"count": 2}, {"size": 12, "scale": [0.1, 0.4], "count": 2}]}


def tiny_teacher_student(name: str, backbone: str = "vit_tiny_p4", **cfg: object):
    """A tiny DINO or iBOT on 28 px grey images (seed 0), with ``cfg`` over :data:`TINY_TEACHER_STUDENT`."""
    torch.manual_seed(0)
    kwargs = {**TINY_FAMILY[family(backbone)], "img_size": 28, "in_chans": 1}
    return create_method({"name": name, **TINY_TEACHER_STUDENT, **cfg}, create_backbone(backbone, **kwargs))


def fixed_batch_losses(method: torch.nn.Module, images: torch.Tensor, steps: int, lr: float) -> list[float]:
    """The losses of ``steps`` AdamW steps on one batch with the same masks each step (``after_step`` after
    each), a check that a method can fit what it is shown."""
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(0)
        loss = method(images).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, steps)
        losses.append(float(loss.detach()))
    return losses


def four_views(n: int = 4, seed: int = 0) -> Batch:
    """A batch as :func:`tiny_teacher_student`'s loader would give it: two 28 px and two 12 px views."""
    g = torch.Generator().manual_seed(seed)
    views = tuple(torch.randn(n, 1, s, s, generator=g) for s in (28, 28, 12, 12))
    return Batch(views[0], None, views)


#: Every registered method with every backbone that can take it.
METHOD_BACKBONE_PAIRS = [(m, b) for m in sorted(METHODS) for b in backbones_taking(METHODS[m].mask_kind)]

HAVE_FMNIST = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fmnist: needs the Debian Fashion-MNIST files (skipped without them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_FMNIST:
        return
    skip = pytest.mark.skip(reason="Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
    for item in items:
        if "fmnist" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def servers():
    """Three fork servers of ``python -m mimkit`` (``cli_forkserver.py``): a command's process without
    the interpreter's start and mimkit's imports (about 3 s each). Two run side by side, one per core;
    the third is the one a resumed run is forked from while the other two hold the run it resumes and
    the uninterrupted one it must equal, so the three are three processes, as three interpreters were."""
    from cli_forkserver import ForkServers

    servers = ForkServers(3)
    yield servers
    servers.close()


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo logging set-up done by a test (the CLI's basicConfig, a run's file handler)."""
    loggers = [logging.getLogger(), logging.getLogger("mimkit")]
    saved = [(lg, list(lg.handlers), lg.level) for lg in loggers]
    yield
    for lg, handlers, level in saved:
        for h in list(lg.handlers):
            # exact types only: pytest's own capture handlers subclass StreamHandler
            if h not in handlers and type(h) in (logging.StreamHandler, logging.FileHandler):
                lg.removeHandler(h)
                h.close()
        lg.setLevel(level)


@pytest.fixture
def tiny_encoder() -> torch.nn.Module:
    """A one-block, 32-wide ViT for 28x28 grey images (patch 4, 49 tokens)."""
    torch.manual_seed(0)
    return create_backbone("vit_tiny_p4", **TINY_VIT)


@pytest.fixture
def tiny_mae(tiny_encoder: torch.nn.Module) -> torch.nn.Module:
    """MAE with a one-block 32-wide decoder around :func:`tiny_encoder`."""
    torch.manual_seed(0)
    return create_method({"name": "mae", **TINY_DECODER}, tiny_encoder)


@pytest.fixture
def tiny_run_overrides() -> list[str]:
    """``key=value`` strings for a seconds-long pre-training run (see ``TINY_RUN_OVERRIDES``)."""
    return list(TINY_RUN_OVERRIDES)


@pytest.fixture
def tiny_run_config(tmp_path: Path) -> Callable[..., PretrainConfig]:
    """Factory: a validated tiny pre-training config writing to ``tmp_path/run`` plus extra overrides."""

    def make(*extra: str, run_dir: Path | None = None) -> PretrainConfig:
        run = run_dir or tmp_path / "run"
        return load_config(None, [f"run_dir={run}", *TINY_RUN_OVERRIDES, *extra])

    return make


def _write_image(path: Path, value: int = 128, size: tuple[int, int] = (12, 10), mode: str = "RGB",
                 fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    channels = 3 if mode == "RGB" else 1
    arr = np.clip(rng.normal(value, 10, size=(size[1], size[0], channels)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """Factory: write a small image file (PNG unless the suffix says otherwise) and return its path."""
    return _write_image


@pytest.fixture(scope="session")
def write_image_session() -> Callable[..., Path]:
    """:func:`write_image` for session-scoped fixtures."""
    return _write_image


@pytest.fixture
def data_cfg() -> Callable[..., DataConfig]:
    """Factory: a ``DataConfig`` with the given fields (small images; augmentation is the loader's views)."""

    def make(**kw: object) -> DataConfig:
        base = dict(img_size=8, channels=3)
        base.update(kw)
        return DataConfig(**base)

    return make


@pytest.fixture(scope="session")
def fmnist_train():
    """The Fashion-MNIST train split, loaded once per session."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed")
    from mimkit.data import build_dataset

    return build_dataset(DataConfig(), "train")


def fake_run(folder: Path, settings: dict | PretrainConfig, seed: int = 0) -> Path:
    """A run folder as a finished run leaves one (``config.yaml`` and one complete checkpoint) of the
    method ``settings`` describe, with fresh weights: a helper run (a tokenizer, a teacher) for tests.
    """
    from mimkit.config import to_yaml
    from mimkit.engine.checkpoint import save_checkpoint
    from mimkit.models import compose_config, method_from_config

    cfg = settings if isinstance(settings, PretrainConfig) else compose_config([settings])
    cfg = dataclasses.replace(cfg, run_dir=str(folder))
    torch.manual_seed(seed)
    method = method_from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    save_checkpoint(folder / "checkpoints", 1, method, {"step": 1}, keep_last=0)
    return folder
