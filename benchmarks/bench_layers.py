"""Which layer and which pooling of a trained ViT encoder: kNN and linear probe per block.

For every block: the mean of its patch tokens (blocks before the last without the final norm, the
last with it), the final class token, and concatenations of the last two and three blocks; each
scored with the kNN (k = 20, 200; T = 0.07) and linear-probe protocol of ``mimkit knn`` /
``mimkit linprobe`` on the full train and test splits. Also kNN on standardised features.
(``mimkit ... --blocks N`` differs in one detail: it passes every block through the final norm.)

Usage:
    python benchmarks/bench_layers.py RUN_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import markdown_table

from mimkit.data import build_dataset, build_loader, normalizer_for
from mimkit.evaluation.knn import knn_accuracy
from mimkit.evaluation.linear_probe import linear_probe
from mimkit.evaluation.runner import load_run_encoder


@torch.no_grad()
def block_features(enc: torch.nn.Module, loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mean-pooled patch tokens of every block and the final class token, ``{name: [N, D]}``."""
    out: dict[str, list[torch.Tensor]] = {}
    labels = []
    for batch in loader:
        x, y = batch.images, batch.labels
        t = enc.embed(x)
        t = torch.cat([enc.cls_token.expand(t.shape[0], -1, -1), t], 1)
        for i, block in enumerate(enc.blocks):
            t = block(t)
            h = enc.norm(t) if i == len(enc.blocks) - 1 else t
            out.setdefault(f"block {i + 1}, mean", []).append(h[:, 1:].mean(1))
        out.setdefault("final class token", []).append(h[:, 0])
        labels.append(y)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder or checkpoint of a ViT encoder")
    args = ap.parse_args()
    enc, cfg, ckpt = load_run_encoder(args.run)
    enc.eval()
    data = dataclasses.replace(cfg.data, subset_fraction=1.0)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    norm = normalizer_for(train, data)
    ftr, ytr = block_features(enc, build_loader(train, data, 512, train=False, normalize=norm))
    fte, yte = block_features(enc, build_loader(test, data, 512, train=False, normalize=norm))
    depth = len(enc.blocks)
    for n in (2, 3):
        names = [f"block {i}, mean" for i in range(depth - n + 1, depth + 1)]
        key = f"blocks {depth - n + 1}-{depth}, mean, concatenated"
        ftr[key], fte[key] = torch.cat([ftr[k] for k in names], 1), torch.cat([fte[k] for k in names], 1)
    rows = []
    for name in ftr:
        a, b = ftr[name], fte[name]
        knn = knn_accuracy(a, ytr, b, yte, (20, 200), 0.07, 10)
        mean, std = a.mean(0), a.std(0) + 1e-6
        knn_std = knn_accuracy((a - mean) / std, ytr, (b - mean) / std, yte, (20,), 0.07, 10)
        lin = linear_probe(a, ytr, b, yte, 10, epochs=100, lr=0.1, batch_size=1024, seed=0)
        rows.append([name, a.shape[1], knn[20], knn[200], knn_std[20], lin["top1"]])
        print(rows[-1], flush=True)
    print(f"\n# {ckpt}, {time.strftime('%Y-%m-%d')}")
    print(markdown_table(["features", "dim", "kNN k=20", "kNN k=200", "kNN k=20 standardised", "linear probe"], rows))


if __name__ == "__main__":
    main()
