"""Pre-training throughput and peak memory: mimkit's MAE vs HuggingFace ViTMAEForPreTraining.

Both models get the identical configuration (ViT 192-d, depth 6, 3 heads, MLP 768; decoder 128-d x 2,
4 heads, MLP 512; 32 px RGB, patch 4, mask 0.75, per-patch normalised target) and the same AdamW
step under bf16 autocast where asked; mimkit's side is the engine's own training step
(``mimkit.engine.step.train_step``: it also measures the gradient norm every step, which the plain HF
loop does not), and its model picks its CPU attention kernel itself
(``mimkit.backbones.layers.cpu_kernels``). Timing alternates between the two in one process, round
after round, so machine noise hits both alike; the reported figure is the median over rounds and
the ratio mimkit / HF. Peak memory is the peak resident set (VmHWM) of a fresh child process per
model (CPU; it includes the ~500 MiB of the torch runtime that both share) or the CUDA allocator's
peak.

``--compile`` adds mimkit's model under ``torch.compile`` as a contender in the same rounds;
``--hf-math-attention`` adds HF's model with the math attention kernel forced (the choice mimkit's
model makes for these short sequences in bf16 on a CPU), to tell that choice apart from the rest.

Usage:
    python benchmarks/bench_throughput.py --precision fp32 bf16 --rounds 5 --steps 5 [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CFG = dict(img=32, chans=3, patch=4, dim=192, depth=6, heads=3, dec_dim=128, dec_depth=2, dec_heads=4, mask=0.75)


def build(which: str) -> torch.nn.Module:
    if which == "mimkit_compiled":
        return torch.compile(build("mimkit"))
    if which == "hf_math_attention":
        return build("hf")
    if which == "mimkit":
        from mimkit.backbones import create_backbone
        from mimkit.methods import create_method

        enc = create_backbone("vit_tiny_p4", img_size=CFG["img"], in_chans=CFG["chans"], embed_dim=CFG["dim"],
                              depth=CFG["depth"], num_heads=CFG["heads"], patch_size=CFG["patch"])
        return create_method({"name": "mae", "mask_ratio": CFG["mask"], "decoder_dim": CFG["dec_dim"],
                              "decoder_depth": CFG["dec_depth"], "decoder_heads": CFG["dec_heads"],
                              "norm_pix_loss": True}, enc)
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf = ViTMAEConfig(
        image_size=CFG["img"], patch_size=CFG["patch"], num_channels=CFG["chans"], hidden_size=CFG["dim"],
        num_hidden_layers=CFG["depth"], num_attention_heads=CFG["heads"], intermediate_size=4 * CFG["dim"],
        decoder_hidden_size=CFG["dec_dim"], decoder_num_hidden_layers=CFG["dec_depth"],
        decoder_num_attention_heads=CFG["dec_heads"], decoder_intermediate_size=4 * CFG["dec_dim"],
        mask_ratio=CFG["mask"], norm_pix_loss=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTMAEForPreTraining(hf)


def make_step(which: str, model: torch.nn.Module, precision: str, device: torch.device):
    if which.startswith("mimkit"):
        # mimkit's side is the engine's own step (its AdamW groups, autocast, grad norm, after_step).
        from mimkit.data import Batch
        from mimkit.engine.step import train_step

        method = getattr(model, "_orig_mod", model)
        opt = torch.optim.AdamW(method.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))

        def engine_step(x: torch.Tensor) -> None:
            train_step(model, method, [Batch(x)], opt, device=device, precision=precision, lr=1e-4, step=0,
                       total_steps=1)

        return engine_step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    force_math = which == "hf_math_attention"

    def ctx() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"))
        if force_math:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def step(x: torch.Tensor) -> None:
        with ctx():
            loss = model(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, x: torch.Tensor, steps: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(x)
    sync(device)
    return steps * x.shape[0] / (time.perf_counter() - t)


def peak_memory_child(which: str, precision: str, batch: int, device: str) -> float:
    """Run a few steps of one model in a fresh process and return its peak memory in MiB."""
    code = (
        "import sys, json, torch; sys.path.insert(0, 'benchmarks');"
        "import bench_throughput as b, common;"
        f"dev = torch.device('{device}'); m = b.build('{which}').to(dev); m.train();"
        f"s = b.make_step('{which}', m, '{precision}', dev);"
        f"x = torch.randn({batch}, 3, 32, 32, device=dev); s(x); s(x);"
        "peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == 'cuda' else common.vm_hwm_mib();"
        "print(json.dumps(peak))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time mimkit under torch.compile")
    ap.add_argument("--hf-math-attention", action="store_true",
                    help="also time HF's model with the math attention kernel forced")
    args = ap.parse_args()
    names = (["mimkit", "hf"] + (["mimkit_compiled"] if args.compile else [])
             + (["hf_math_attention"] if args.hf_math_attention else []))
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {w: build(w).to(device).train() for w in names}
    params = {w: sum(p.numel() for p in m.parameters()) for w, m in models.items()}
    x = torch.randn(args.batch, CFG["chans"], CFG["img"], CFG["img"], device=device)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, batch {args.batch}")
    print(f"# parameters: mimkit {params['mimkit']:,}  hf {params['hf']:,}")
    results = []
    for precision in args.precision:
        steps = {w: make_step(w, m, precision, device) for w, m in models.items()}
        for w in steps:  # warm-up: allocator, kernels, autocast caches, compilation (twice: recompiles)
            steps[w](x)
            steps[w](x)
        rates: dict[str, list[float]] = {w: [] for w in steps}
        for _ in range(args.rounds):
            for w in names:
                rates[w].append(time_steps(steps[w], x, args.steps, device))
        med = {w: statistics.median(r) for w, r in rates.items()}
        row = {"precision": precision, "mimkit_img_s": med["mimkit"], "hf_img_s": med["hf"],
               "ratio": med["mimkit"] / med["hf"], "rounds": args.rounds, "steps": args.steps}
        if args.compile:
            row |= {"compiled_img_s": med["mimkit_compiled"], "compiled_ratio": med["mimkit_compiled"] / med["hf"]}
        if args.hf_math_attention:
            row |= {"hf_math_attention_img_s": med["hf_math_attention"],
                    "ratio_vs_hf_math_attention": med["mimkit"] / med["hf_math_attention"]}
        if not args.no_memory:
            for w in ("mimkit", "hf"):
                row[f"{w}_peak_mib"] = peak_memory_child(w, precision, args.batch, args.device)
        results.append(row)
        print(json.dumps(row))
    print("\n| precision | mimkit img/s | HF img/s | ratio | mimkit peak MiB | HF peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['precision']} | {r['mimkit_img_s']:.0f} | {r['hf_img_s']:.0f} | {r['ratio']:.2f}x | "
              f"{r.get('mimkit_peak_mib', float('nan')):.0f} | {r.get('hf_peak_mib', float('nan')):.0f} |")
    if args.hf_math_attention:
        print("\n| precision | mimkit img/s | HF, math attention img/s | ratio |\n|---|---|---|---|")
        for r in results:
            print(f"| {r['precision']} | {r['mimkit_img_s']:.0f} | {r['hf_math_attention_img_s']:.0f} | "
                  f"{r['ratio_vs_hf_math_attention']:.2f}x |")
    if args.compile:
        print("\n| precision | mimkit compiled img/s | HF img/s | ratio |\n|---|---|---|---|")
        for r in results:
            print(f"| {r['precision']} | {r['compiled_img_s']:.0f} | {r['hf_img_s']:.0f} | "
                  f"{r['compiled_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
