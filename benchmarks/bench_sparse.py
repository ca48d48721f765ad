"""Where the sparse CvT-MAE can save compute: the hidden share of every stage, by mask size and ratio.

The sparse mode (``method.sparse=true``) runs a stage's blocks on the tokens whose embedding window
holds a visible pixel. The update mask propagates visibility through every embedding, and an
embedding window wider than its stride carries it into the border of a hidden block, so the hidden
share falls from stage to stage; a hole smaller than a stage's stride is filled there. This prints,
for each backbone and image size, the hidden share of each stage (mean over random masks, as
``pixel_block_mask`` draws them for the CvT-MAE) for mask blocks from the first stage's stride up
to the last stage's and beyond where the image allows, and the share of the blocks' multiply-adds
the sparse mode skips in batches of 64 padded to their longest image (attention counted at its
query x key cost, so a stage's saving is not simply its hidden share).
No training: it runs in seconds.

Usage:
    python benchmarks/bench_sparse.py
    python benchmarks/bench_sparse.py --ratios 0.5 0.75 --samples 256
"""

from __future__ import annotations

import argparse

import torch
from common import markdown_table

from mimkit.backbones import create_backbone
from mimkit.backbones.layers.partial_conv import PROPAGATIONS
from mimkit.masking import pixel_block_mask

#: (backbone preset, image side, mask block sides to try).
CASES = [("cvt_tiny_s4", 28, (4, 7, 14)), ("cvt_tiny_s2", 28, (2, 4, 7, 14)),
         ("cvt_13", 64, (4, 8, 16, 32)), ("cvt_13", 224, (4, 8, 16, 32))]


def block_cost(dim: int, tokens: float, keys: float, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of one CvT block on ``tokens`` queries and ``keys`` key/value windows: the four
    linear maps, the attention (scores and weighted sum) and the MLP; the depthwise convolutions run
    on the whole map in either mode and are left out."""
    linear = dim * dim * (tokens + 2 * keys + tokens)
    return linear + 2 * tokens * keys * dim + 2 * mlp_ratio * dim * dim * tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--samples", type=int, default=256, help="masks drawn per case (a multiple of 64)")
    args = ap.parse_args()
    if args.samples < 64 or args.samples % 64:
        ap.error(f"--samples must be a positive multiple of 64 (batches of 64), got {args.samples}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, side, sizes in CASES:
        cvt = create_backbone(name, in_chans=1)
        depths = [len(stage.blocks) for stage in cvt.stages]
        for ratio in args.ratios:
            for size in sizes:
                if side % size:
                    continue
                hole = pixel_block_mask(args.samples, side, side, size, ratio, generator=gen)
                for rule in PROPAGATIONS:
                    rows.append([name, side, ratio, size, rule, *saving(cvt, cvt.stage_visible(1.0 - hole, rule),
                                                                        depths)])
    stages = max(len(r) - 6 for r in rows)
    print(markdown_table(["backbone", "px", "mask ratio", "mask block (px)", "visible where",
                          *[f"hidden, stage {i + 1}" for i in range(stages)],
                          "block multiply-adds skipped"], rows))
    print(f"\n# {args.samples} masks per row, in batches of 64; visible where (method.propagate): window = the "
          "update mask (a token whose embedding window holds a visible input), cell = a token whose own cell does")


def saving(cvt, masks: list[torch.Tensor], depths: list[int]) -> list[str]:
    """The hidden share of each stage and the share of block multiply-adds skipped."""
    shares, dense, sparse = [], 0.0, 0.0
    for stage, visible, depth, dim in zip(cvt.stages, masks, depths, cvt.dims, strict=True):
        # The packing the sparse mode itself makes: visible tokens and the key windows holding one.
        packing = stage.blocks[0].attn.sparse_stage(visible)
        area, key_area = visible[0].numel(), packing.keys.height * packing.keys.width
        shares.append(1.0 - visible.mean().item())
        dense += depth * block_cost(dim, area, key_area)
        # Per batch of 64, padded to its image with the most tokens, as the sparse mode runs.
        longest = (packing.tokens.valid.sum(1).view(-1, 64).amax(-1), packing.keys.valid.sum(1).view(-1, 64).amax(-1))
        sparse += depth * sum(block_cost(dim, q, k) for q, k in zip(*(t.tolist() for t in longest),
                                                                     strict=True)) / len(longest[0])
    return [*[f"{100 * s:.0f} %" for s in shares], f"{100 * (1 - sparse / dense):.0f} %"]


if __name__ == "__main__":
    main()
