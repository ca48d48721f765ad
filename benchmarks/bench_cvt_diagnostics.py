"""Diagnostics of a trained hybrid CvT-MAE: where its features are, whether its decoder uses them,
and where the update mask can still act. Forward passes on saved checkpoints, minutes each.

    stages   kNN (k = 20, 200; T = 0.07) and linear probe of every stage's mean-pooled output (the last
             through the final norm), and of all stages concatenated, on the full train and test
             splits (or ``--train-fraction``); with ``--random`` the same for the randomly initialised
             encoder of the run's config (the floor the pre-training is measured against).
    bypass   the hole reconstruction error (L1 on masked pixels, the inpainting loss's hole term) of
             the model as trained, with its deepest map shuffled across the batch, and with every
             skip shuffled (does the decoder read the deep features, or go around them?).
    visible  the visible fraction after each stage's embedding (``[cnt > 0]``), for mask sizes and
             the strides of a backbone: past the stage where it reaches 1 the update mask changes
             nothing.

The CvT's depthwise q/k/v projections carry BatchNorm, whose running statistics pre-training
gathered on masked images; evaluation runs on clean ones. ``stages --recalibrate-bn`` adds the same
encoder with those statistics re-estimated on clean training images (the source's linear probe ran
its BatchNorm layers in train mode, which has the same effect).

Usage:
    python benchmarks/bench_cvt_diagnostics.py stages RUN [--random] [--recalibrate-bn] [--train-fraction 0.2]
    python benchmarks/bench_cvt_diagnostics.py bypass RUN [--batches 20]
    python benchmarks/bench_cvt_diagnostics.py visible --config cvt_mae_fmnist_s4 --mask-sizes 2 4 7 14
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from common import markdown_table

from mimkit.config import resolve_config_path
from mimkit.data import build_dataset, build_loader, normalizer_for
from mimkit.engine.checkpoint import load_weights, resolve_checkpoint
from mimkit.engine.run_folder import run_config_for
from mimkit.evaluation.knn import knn_accuracy
from mimkit.evaluation.linear_probe import linear_probe
from mimkit.masking import pixel_block_mask
from mimkit.models import encoder_from_config, load_config, method_from_config


def _run(path: str):
    ckpt = resolve_checkpoint(path)
    cfg = load_config(run_config_for(ckpt))
    method = method_from_config(cfg)
    load_weights(method, ckpt)
    return method.eval(), cfg, ckpt


@torch.no_grad()
def stage_features(encoder: torch.nn.Module, loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean-pooled output of every stage, ``{name: [N, D_i]}``, and the labels ``[N]``."""
    out: dict[str, list[torch.Tensor]] = {}
    labels = []
    for batch in loader:
        maps = encoder.forward_stages(batch.images)
        for i, m in enumerate(maps):
            out.setdefault(f"stage {i + 1}{' (final norm)' if i == len(maps) - 1 else ''}", []).append(
                m.mean(dim=(2, 3)))
        labels.append(batch.labels)
    feats = {k: torch.cat(v) for k, v in out.items()}
    feats["all stages, concatenated"] = torch.cat(list(feats.values()), 1)
    return feats, torch.cat(labels)


@torch.no_grad()
def recalibrated(encoder: torch.nn.Module, loader, batches: int) -> torch.nn.Module:
    """A copy of ``encoder`` whose BatchNorm running statistics are re-estimated (a cumulative mean)
    on ``batches`` batches of ``loader``'s clean images; everything else as trained."""
    enc = copy.deepcopy(encoder).eval()
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i, batch in enumerate(loader):
        if i == batches:
            break
        enc.forward_features(batch.images)
    return enc.eval()


def stages(args: argparse.Namespace) -> None:
    method, cfg, ckpt = _run(args.run)
    encoders = {"pre-trained": method.encoder}
    data = dataclasses.replace(cfg.data, subset_fraction=1.0)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    norm = normalizer_for(train, data)
    if args.recalibrate_bn:
        clean = build_loader(train, data, 256, train=False, normalize=norm)
        encoders["pre-trained, BatchNorm re-estimated on clean images"] = recalibrated(method.encoder, clean, 40)
    if args.random:
        torch.manual_seed(cfg.seed)
        encoders["random init"] = encoder_from_config(cfg).eval()
    bank = train.per_class_fraction(args.train_fraction)
    rows = []
    for which, enc in encoders.items():
        ftr, ytr = stage_features(enc, build_loader(bank, data, 512, train=False, normalize=norm))
        fte, yte = stage_features(enc, build_loader(test, data, 512, train=False, normalize=norm))
        classes = int(ytr.max()) + 1
        for name in ftr:
            knn = knn_accuracy(ftr[name], ytr, fte[name], yte, (20, 200), 0.07, classes)
            lin = linear_probe(ftr[name], ytr, fte[name], yte, classes, epochs=100, lr=0.1, batch_size=1024, seed=0)
            rows.append([which, name, ftr[name].shape[1], knn[20], knn[200], lin["top1"]])
            print(rows[-1], flush=True)
    print(f"\n# {ckpt}, bank {args.train_fraction:.0%} per class, {time.strftime('%Y-%m-%d %H:%M')}")
    print(markdown_table(["encoder", "features", "dim", "kNN k=20", "kNN k=200", "linear probe"], rows))


@torch.no_grad()
def bypass(args: argparse.Namespace) -> None:
    method, cfg, ckpt = _run(args.run)
    data = dataclasses.replace(cfg.data, subset_fraction=1.0)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    loader = build_loader(test, data, 256, train=False, normalize=normalizer_for(train, data))
    torch.manual_seed(0)
    sums = {"as trained": 0.0, "deepest map shuffled": 0.0, "every skip shuffled": 0.0}
    pixels = 0.0
    for i, batch in enumerate(loader):
        if i == args.batches:
            break
        x = batch.images
        n, _, h, w = x.shape
        hole = pixel_block_mask(n, h, w, method.cfg.mask_size, method.cfg.mask_ratio, method.cfg.mask_mode)
        maps = method.encoder.forward_stages(x, 1 - hole, method.cfg.update_mask)
        perm = torch.roll(torch.arange(n), 1)  # every image gets another image's map
        variants = {"as trained": maps, "deepest map shuffled": [*maps[:-1], maps[-1][perm]],
                    "every skip shuffled": [*(m[perm] for m in maps[:-1]), maps[-1]]}
        for name, ms in variants.items():
            pred = method.decoder(ms, (h, w))
            sums[name] += float(((pred - x).abs() * hole).sum())
        pixels += float(hole.sum() * x.shape[1])
    rows = [[name, total / pixels] for name, total in sums.items()]
    print(f"\n# {ckpt}: hole L1 (normalised pixels) over {min(args.batches, len(loader))} test batches of 256, "
          f"skip={method.cfg.skip}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(markdown_table(["decoder input", "hole L1"], rows))


@torch.no_grad()
def visible(args: argparse.Namespace) -> None:
    cfg = load_config(resolve_config_path(args.config))
    enc = encoder_from_config(cfg)
    size = cfg.data.img_size
    rows = []
    for b in args.mask_sizes:
        if size % b:
            continue
        torch.manual_seed(0)
        vis = 1 - pixel_block_mask(64, size, size, b, args.mask_ratio, "random")
        row = [b, float(vis.mean())]
        for stage in enc.stages:
            e = stage.embed
            vis = (torch.nn.functional.conv2d(vis, torch.ones(1, 1, e.kernel, e.kernel), stride=e.stride,
                                              padding=e.padding) > 0).float()
            row.append(float(vis.mean()))
        rows.append(row)
    heads = ["mask size (px)", "input"] + [f"after stage {i + 1} (k{s.embed.kernel}/s{s.embed.stride})"
                                           for i, s in enumerate(enc.stages)]
    print(f"\n# {args.config} ({cfg.backbone['name']}, {size} px), mask ratio {args.mask_ratio}: visible fraction")
    print(markdown_table(heads, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("stages")
    p.add_argument("run")
    p.add_argument("--random", action="store_true", help="also the randomly initialised encoder")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="also the encoder with its BatchNorm statistics re-estimated on 40 clean train batches")
    p.add_argument("--train-fraction", type=float, default=1.0)
    p = sub.add_parser("bypass")
    p.add_argument("run")
    p.add_argument("--batches", type=int, default=20)
    p = sub.add_parser("visible")
    p.add_argument("--config", default="cvt_mae_fmnist_s4")
    p.add_argument("--mask-sizes", type=int, nargs="+", default=[1, 2, 4, 7, 14])
    p.add_argument("--mask-ratio", type=float, default=0.5)
    args = ap.parse_args()
    {"stages": stages, "bypass": bypass, "visible": visible}[args.what](args)


if __name__ == "__main__":
    main()
