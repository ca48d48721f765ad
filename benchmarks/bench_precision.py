"""Training speed in fp32 against bf16 autocast, per packaged config, and the strided depthwise conv.

For each config, one training step (forward, backward, AdamW) on a batch of random images is timed
in fp32 and under the engine's bf16 autocast (the models pick their CPU kernels themselves),
alternating round after round in one process so that the host's drift hits both alike; the figure
is the median over rounds and the ratio bf16 / fp32. This is what ``train.precision=auto`` decides
between on a CPU with native bf16 (AVX512-BF16 or AMX).

``--kernel`` also times three kernels that are slow on a CPU, each against what replaces it: the
CvT's strided depthwise 3x3 conv against the same conv at stride 1 sampled every second pixel (the
same numbers), oneDNN's depthwise conv on maps too small to hold a whole window against a product
with the tap matrix, and the flash attention kernel against the math kernel at several sequence
lengths: ``mimkit.backbones.layers.cpu_kernels`` picks the faster one.

Usage:
    python benchmarks/bench_precision.py cvt_mae_fmnist_s4 cvt_mae_fmnist mae_fmnist --kernel
    python benchmarks/bench_precision.py mae_fmnist,backbone.name=vit_small_p4 --batch 64
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import add_step_args, alternate, config_method, engine_step, markdown_table, start_steps
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimkit.backbones.layers.cpu_kernels import depthwise_matmul

#: Depthwise conv cases ``(channels, map side, stride)``: all but the fourth and the sixth hold no whole
#: 3x3 window, the fourth and the sixth do (``cpu_kernels.no_inner_window``).
SMALL_MAPS = ((192, 1, 1), (192, 2, 1), (192, 2, 2), (96, 3, 1), (96, 3, 2), (96, 4, 2), (384, 2, 1))


def train_step(config: str, batch: int) -> dict[str, Callable[[], None]]:
    """fp32 and bf16 training steps of one config (one model, one optimizer).

    ``config`` is a packaged name or YAML path, optionally followed by comma-separated overrides:
    ``mae_fmnist,backbone.name=vit_small_p4``.
    """
    cfg, method, opt = config_method(config)
    x = torch.randn(batch, cfg.data.channels, cfg.data.img_size, cfg.data.img_size)

    def step(bf16: bool) -> None:
        engine_step(method, x, opt, torch.device("cpu"), "bf16" if bf16 else "fp32")

    return {"fp32": lambda: step(False), "bf16": lambda: step(True)}


def conv_steps(dim: int, size: int, batch: int) -> dict[str, Callable[[], None]]:
    """Depthwise 3x3 stride-2 conv, strided against sampled stride-1, each in fp32 and bf16."""
    w = torch.randn(dim, 1, 3, 3, requires_grad=True)
    fns = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(batch, dim, size, size, dtype=dtype, requires_grad=True)

        def strided(x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
            F.conv2d(x, w.to(dtype), None, 2, 1, 1, dim).float().sum().backward()

        def sampled(x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
            F.conv2d(x, w.to(dtype), None, 1, 1, 1, dim)[..., ::2, ::2].float().sum().backward()

        fns[f"strided {dtype_name}"] = strided
        fns[f"sampled {dtype_name}"] = sampled
    return fns


def small_map_steps(dim: int, size: int, stride: int, batch: int) -> dict[str, Callable[[], None]]:
    """Depthwise 3x3 conv on a small map, oneDNN's against the tap-matrix product, fp32 and bf16."""
    w = torch.randn(dim, 1, 3, 3, requires_grad=True)
    fns = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(batch, dim, size, size, dtype=dtype, requires_grad=True)

        def onednn(x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
            F.conv2d(x, w.to(dtype), None, stride, 1, 1, dim).float().sum().backward()

        def matmul(x: torch.Tensor = x, dtype: torch.dtype = dtype) -> None:
            depthwise_matmul(x, w.to(dtype), stride, 1).float().sum().backward()

        fns[f"oneDNN {dtype_name}"] = onednn
        fns[f"matmul {dtype_name}"] = matmul
    return fns


def attention_steps(shape: tuple[int, int, int, int]) -> dict[str, Callable[[], None]]:
    """``scaled_dot_product_attention`` forward + backward, flash against math kernel, fp32 and bf16."""
    fns = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            def run(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v, kernel: SDPBackend = kernel) -> None:
                with sdpa_kernel(kernel):
                    F.scaled_dot_product_attention(q, k, v).float().sum().backward()

            fns[f"{'flash' if kernel == SDPBackend.FLASH_ATTENTION else 'math'} {dtype_name}"] = run
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(ap, rounds=5, steps=3, per="precision")
    ap.add_argument("--kernel", action="store_true", help="also time the depthwise convs and attention kernels")
    args = ap.parse_args()
    start_steps(args)
    rows = []
    for config in args.configs:
        med = alternate(train_step(config, args.batch), args.rounds, args.steps, args.batch)
        rows.append([config, round(med["fp32"]), round(med["bf16"]), f"{med['bf16'] / med['fp32']:.2f}x"])
        print(rows[-1], flush=True)
    print("\n" + markdown_table(["config", "fp32 img/s", "bf16 img/s", "bf16 / fp32"], rows))
    if args.kernel:
        rows = []
        for dim, size in ((32, 7), (96, 4), (192, 2), (32, 14)):
            med = alternate(conv_steps(dim, size, args.batch), args.rounds, args.steps * 3, args.batch)
            rows.append([f"{dim} x {size}x{size}", *[f"{1e3 * args.batch / med[k]:.1f}" for k in med]])
        print("\n# depthwise 3x3 stride-2 conv, forward + backward, ms per batch")
        print(markdown_table(["channels x map", *med], rows))
        rows = []
        for dim, size, stride in SMALL_MAPS:
            med = alternate(small_map_steps(dim, size, stride, args.batch), args.rounds, args.steps * 3, args.batch)
            rows.append([f"{dim} x {size}x{size} / {stride}", *[f"{1e3 * args.batch / med[k]:.1f}" for k in med]])
        print("\n# depthwise 3x3 conv on small maps, oneDNN against the tap-matrix product (cpu_kernels."
              "depthwise_matmul), forward + backward, ms per batch (channels x map / stride)")
        print(markdown_table(["channels x map / stride", *med], rows))
        rows = []
        for heads, length, head_dim in ((3, 13, 64), (4, 50, 32), (3, 100, 64), (3, 160, 64), (6, 197, 64)):
            med = alternate(attention_steps((args.batch, heads, length, head_dim)), args.rounds, args.steps, args.batch)
            rows.append([f"{heads} x {length} x {head_dim}", *[f"{1e3 * args.batch / med[k]:.1f}" for k in med]])
        print("\n# scaled_dot_product_attention, forward + backward, ms per batch (heads x tokens x head dim)")
        print(markdown_table(["shape", *med], rows))


if __name__ == "__main__":
    main()
