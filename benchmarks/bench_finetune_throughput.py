"""Fine-tuning throughput: mimkit's ``finetune`` step against timm's own VisionTransformer in a plain loop.

Both sides train the same ViT (by default the ``mae_fmnist`` encoder: 28 px grey, patch 4, 192-d,
depth 6, 3 heads, drop path 0.1) with a linear head on the mean of the patch tokens, cross-entropy
with label smoothing 0.1 and AdamW over timm's layer-decay parameter groups (0.75), under bf16
autocast where asked. mimkit's side is the engine's own step (``mimkit.engine.step.train_step``
on the ``finetune`` method: it also takes the gradient norm and checks it every step and applies
the scheduled lr per group, which the plain loop does not); timm's side is
``timm.create_model`` and four lines of loop. Timing alternates between the two in one process,
round after round, so machine noise hits both alike; the figure is the median over rounds and the
ratio mimkit / timm.

Usage:
    python benchmarks/bench_finetune_throughput.py --precision fp32 bf16 --rounds 5 --steps 5
    python benchmarks/bench_finetune_throughput.py --img-size 224 --patch 16 --chans 3 --batch 32   # ViT-Ti/16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from torch.nn.attention import SDPBackend, sdpa_kernel

from mimkit.evaluation.resources import cpu_flags


def build(which: str, a: argparse.Namespace) -> torch.nn.Module:
    """mimkit's ``finetune`` method around its ViT, or timm's ``VisionTransformer`` of the same shape."""
    if which == "mimkit":
        from mimkit.backbones import create_backbone
        from mimkit.methods import create_method

        enc = create_backbone("vit_tiny_p4", img_size=a.img_size, in_chans=a.chans, embed_dim=a.dim, depth=a.depth,
                              num_heads=a.heads, patch_size=a.patch, drop_path_rate=0.1)
        return create_method({"name": "finetune", "num_classes": 10, "layer_decay": 0.75, "label_smoothing": 0.1},
                             enc)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=a.img_size, patch_size=a.patch,
                             in_chans=a.chans, embed_dim=a.dim, depth=a.depth, num_heads=a.heads, num_classes=10,
                             global_pool="avg", fc_norm=False, drop_path_rate=0.1)


def make_step(which: str, model: torch.nn.Module, precision: str, device: torch.device):
    """One training step on ``(images, labels)``: the engine's for mimkit, a plain loop for timm."""
    if which == "mimkit":
        from mimkit.data import Batch
        from mimkit.engine.step import train_step

        opt = torch.optim.AdamW(model.param_groups(0.05), lr=5e-4, betas=(0.9, 0.999))

        def engine_step(x: torch.Tensor, y: torch.Tensor) -> None:
            train_step(model, model, [Batch(x, y)], opt, device=device, precision=precision, lr=5e-4, step=0,
                       total_steps=1)

        return engine_step
    groups = param_groups_layer_decay(model, 0.05, layer_decay=0.75)
    for g in groups:
        g["lr"] = 5e-4 * g.pop("lr_scale", 1.0)
        g.pop("param_names", None)
    opt = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.999))
    math = which == "timm_math_attention"

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"))
            if math:
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device) -> float:
    """Images per second over ``steps`` calls of ``step``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--chans", type=int, default=1)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timm-math-attention", action="store_true",
                    help="also time timm's model with the math attention kernel forced (mimkit's bf16 CPU choice)")
    args = ap.parse_args()
    names = ["mimkit", "timm"] + (["timm_math_attention"] if args.timm_math_attention else [])
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {w: build(w, args).to(device).train() for w in names}
    params = {w: sum(p.numel() for p in m.parameters()) for w, m in models.items()}
    x = torch.randn(args.batch, args.chans, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    host = cpu_flags() if device.type == "cpu" else device.type
    print(f"# {platform.node()} ({host}), torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, batch {args.batch}, {args.img_size} px, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# parameters: mimkit {params['mimkit']:,}  timm {params['timm']:,}")
    results = []
    for precision in args.precision:
        steps = {w: make_step(w, m, precision, device) for w, m in models.items()}
        for w in steps:  # warm-up: allocator, kernels, autocast caches
            steps[w](x, y)
            steps[w](x, y)
        rates: dict[str, list[float]] = {w: [] for w in steps}
        for _ in range(args.rounds):
            for w in names:
                rates[w].append(time_steps(steps[w], x, y, args.steps, device))
        med = {w: statistics.median(r) for w, r in rates.items()}
        row = {"precision": precision, **{f"{w}_img_s": v for w, v in med.items()},
               "ratio": med["mimkit"] / med["timm"], "rounds": args.rounds, "steps": args.steps}
        if args.timm_math_attention:
            row["ratio_vs_timm_math_attention"] = med["mimkit"] / med["timm_math_attention"]
        results.append(row)
        print(json.dumps(row))
    extra = " timm, math attention img/s | ratio to it |" if args.timm_math_attention else ""
    print(f"\n| precision | mimkit img/s | timm img/s | ratio |{extra}")
    print("|---" * (4 + 2 * args.timm_math_attention) + "|")
    for r in results:
        line = f"| {r['precision']} | {r['mimkit_img_s']:.0f} | {r['timm_img_s']:.0f} | {r['ratio']:.2f}x |"
        if args.timm_math_attention:
            line += f" {r['timm_math_attention_img_s']:.0f} | {r['ratio_vs_timm_math_attention']:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
