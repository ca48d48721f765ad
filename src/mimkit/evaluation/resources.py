"""What a pre-training config costs: parameters, FLOPs, peak memory and images/s (``mimkit resources``).

The costs the papers print beside their accuracies: memory and pre-training time per method in
"MAE-based Hybrid Convolutional ViT for Self-Supervised Learning", pre-training GPU-days in Chen et
al., "Mixed Autoencoder for Self-supervised Visual Representation Learning" (CVPR 2023). Every
config is measured in its own child process, so that one model's memory high-water mark is not
another's, on synthetic batches (the cost of a step does not depend on the pixels), with the
engine's own :func:`~mimkit.engine.step.train_step`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mimkit.errors import ConfigError

#: The columns of :func:`resources_table`, and the keys of a row.
COLUMNS = (
    ("config", "config"), ("img_size", "px"), ("encoder_params", "encoder params"), ("total_params", "total params"),
    ("train_gflop_per_img", "train GFLOP/img"), ("infer_gflop_per_img", "encoder GFLOP/img"),
    ("train_img_per_s", "train img/s"), ("infer_img_per_s", "inference img/s"),
    ("peak_mib", "peak MiB"),
)


def cpu_flags() -> str:
    """``avx512_bf16``, ``avx512`` or ``avx2``: which kind of CPU host measured (bf16 is native on the first)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), platform.machine())


def config_spec(spec: str, img_size: int, overrides: list[str]):
    """The config a spec names: ``CONFIG`` or ``CONFIG@BACKBONE`` (that backbone's preset swapped in).

    Args:
        spec: A packaged config name or YAML path, optionally ``@`` a registered backbone name.
        img_size: ``data.img_size`` to measure at (0 = the config's own).
        overrides: ``key=value`` settings applied to every config.

    """
    from mimkit.config import load_yaml, resolve_config_path
    from mimkit.models import compose_config

    name, at, backbone = spec.partition("@")
    if at and not backbone.strip():
        from mimkit.backbones import BACKBONES

        raise ConfigError(f"{spec!r}: nothing after '@'; name a registered backbone ({', '.join(sorted(BACKBONES))}) "
                          "or leave out '@' to measure the config as it is")
    layers = [load_yaml(resolve_config_path(name))]
    if backbone:
        layers.append({"backbone": {"name": backbone}})
    if img_size:
        layers.append({"data": {"img_size": img_size}})
    cfg = compose_config(layers, overrides)
    if cfg.method.name == "finetune" and not cfg.method.num_classes:
        # A head of some size (a classifier's cost barely depends on it); no dataset is read here.
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, num_classes=10))
    return cfg


def measure(spec: str, img_size: int = 0, batch: int = 64, steps: int = 5, precision: str = "auto",
            overrides: list[str] | None = None, breakdown: int = 0) -> dict[str, Any]:
    """Measure one config in this process (call it in a fresh process for a true memory peak).

    Args:
        spec: ``CONFIG`` or ``CONFIG@BACKBONE`` (see :func:`config_spec`).
        img_size: Input side (0 = the config's).
        batch: Images per training step and per inference pass (rounded up to a whole number of a
            mixing method's sets, :attr:`~mimkit.methods.PretrainMethod.batch_multiple`).
        steps: Timed steps after two warm-up steps; the median is reported.
        precision: ``auto``, ``bf16`` or ``fp32`` for the timed steps (FLOPs are counted in fp32).
        overrides: ``key=value`` settings for the config.
        breakdown: Also the forward FLOPs of every module down to this many levels of its dotted
            name below the method (:func:`module_flops`), as ``forward_gflop_by_module`` beside the
            whole forward's ``forward_gflop_per_img``; 0: not.

    Returns:
        A row with the :data:`COLUMNS` keys and the settings measured under.

    """
    from mimkit.data import Batch
    from mimkit.data.batch import whole_sets
    from mimkit.data.views import expand_views, views_batch
    from mimkit.engine.distributed import resolve_device
    from mimkit.engine.optim import build_optimizer
    from mimkit.engine.precision import autocast, grad_scaler, resolve_precision
    from mimkit.engine.step import train_step
    from mimkit.models import check_method_input, method_from_config

    cfg = config_spec(spec, img_size, overrides or [])
    device = resolve_device(cfg.train.device)
    prec = resolve_precision(precision, device)
    size, channels = cfg.data.img_size, cfg.data.channels
    method = method_from_config(cfg).train()
    multiple = method.batch_multiple  # a method mixing images in sets measures whole sets
    batch = whole_sets(batch, multiple, up=True)
    check_method_input(cfg, method, batch)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, channels, size, size, generator=gen)
    labels = torch.randint(0, int(getattr(cfg.method, "num_classes", 0) or 10), (batch,), generator=gen)
    data = Batch(images, labels)
    specs = expand_views(method.views)
    if len(specs) > 1 or any(v.size for v in specs):  # the method's own views, at their sizes (multi-crop, crops)
        pixels = torch.randint(0, 256, images.shape, generator=gen).float()
        views = tuple(v / 127.5 - 1 for v in views_batch(pixels, method.views, size, gen))
        data = Batch(views[0], labels, views if len(views) > 1 else ())
    encoder = method.eval_module
    row: dict[str, Any] = {
        "config": spec, "method": cfg.method.name, "backbone": cfg.backbone["name"], "img_size": size,
        "channels": channels, "batch": batch, "device": str(device), "precision": prec,
        "threads": torch.get_num_threads(), "cpu": cpu_flags(),
        "encoder_params": sum(p.numel() for p in encoder.parameters()),
        "total_params": sum(p.numel() for p in method.parameters()),
    }
    # FLOPs per image do not depend on the batch: counted on two images, on the CPU. FlopCounterMode
    # has no formula for the CPU flash-attention kernel and would count its attention as free;
    # under the math kernel attention is matmuls, which it counts.
    few = data.first(max(2, multiple))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        method(few).loss.backward()
    row["train_gflop_per_img"] = fc.get_total_flops() / few.size / 1e9
    if breakdown:
        # The forward alone: torch's module tracker nests the forward passes of modules, but in the
        # backward it charges some modules' gradients to others (a dropout, the block beside them).
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            method(few)
        row["forward_gflop_per_img"] = fc.get_total_flops() / few.size / 1e9
        row["forward_gflop_by_module"] = module_flops(fc.get_flop_counts(), breakdown, few.size)
    method.zero_grad(set_to_none=True)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        encoder.eval().forward_features(few.images)
    row["infer_gflop_per_img"] = fc.get_total_flops() / few.size / 1e9
    method.discard_step()  # the counting passes took no step: a centre's or codebook's sums would stay on the CPU
    method.to(device).train()
    optimizer = build_optimizer(method, cfg.optim, 1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()  # the peak of the training and inference steps, not of building or counting

    def timed(fn) -> float:
        times = []
        for i in range(steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:  # the first steps warm up the allocator and pick kernels
                times.append(time.perf_counter() - t0)
        return batch / sorted(times)[len(times) // 2]

    scaler = grad_scaler(device, prec)
    row["train_img_per_s"] = timed(lambda: train_step(method, method, [data], optimizer, device=device,
                                                       precision=prec, lr=1e-4, step=0, total_steps=1,
                                                       scaler=scaler))
    encoder.eval()
    on_device = images.to(device)

    def infer() -> None:
        with torch.no_grad(), autocast(device, prec):
            encoder.forward_head(encoder.forward_features(on_device), pre_logits=True)

    row["infer_img_per_s"] = timed(infer)
    if device.type == "cuda":
        row["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        row["peak_kind"] = "CUDA max allocated"
    else:
        peak = peak_rss_mib()
        row["peak_mib"] = round(peak) if peak == peak else peak
        row["peak_kind"] = "process peak RSS"
    return row


def module_flops(counts: dict[str, dict[Any, int]], depth: int, images: int) -> dict[str, float]:
    """GFLOP per image of each module that computed in a forward pass, from
    ``FlopCounterMode.get_flop_counts()``. A module whose ``forward`` is not called (an encoder
    whose ``forward_stages`` is) is not listed; its children are.

    Args:
        counts: FLOPs by module name (the root's class name, then the dotted path of attribute
            names, ``CvTMAE.encoder.stages.0``; ``Global`` the whole count) and by operator.
        depth: Keep the modules whose path below the root has at most this many parts
            (``encoder.stages.0`` has 3); a module holds its children's FLOPs.
        images: Images the counts were taken over.

    Returns:
        ``{path below the root: GFLOP per image}`` in the order the modules first computed; what ran
        outside the root (none in a method's forward) is left out.

    """
    rows = {}
    for name, ops in counts.items():
        parts = name.split(".")[1:]
        if name != "Global" and 0 < len(parts) <= depth:
            rows[".".join(parts)] = sum(ops.values()) / images / 1e9
    return rows


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current resident set.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident set of this process in MiB (Linux ``VmHWM``; NaN where there is none).

    ``ru_maxrss`` would be wrong in a child: Linux carries it over from the parent across fork +
    exec, so every child would report its (larger) parent's peak.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_configs(specs: list[str], img_size: int = 0, batch: int = 64, steps: int = 5, precision: str = "auto",
                    overrides: list[str] | None = None, threads: int = 0, breakdown: int = 0) -> list[dict[str, Any]]:
    """:func:`measure` each config in a child process of its own; a failure names the config.

    Args:
        specs: Config specs (``CONFIG`` or ``CONFIG@BACKBONE``).
        img_size: Input side (0 = each config's).
        batch: Images per step.
        steps: Timed steps (median).
        precision: ``auto``, ``bf16`` or ``fp32``.
        overrides: ``key=value`` settings for every config.
        threads: Torch CPU threads in each child (0 = torch's default).
        breakdown: Forward FLOPs by module down to this depth (see :func:`measure`); 0: not.

    Raises:
        ConfigError: A spec that does not resolve (checked before anything is measured), or a
            child that failed (its last error line quoted).

    """
    for spec in specs:  # refuse a bad list up front, not after an hour of measuring the good ones
        config_spec(spec, img_size, overrides or [])
    rows = []
    for spec in specs:
        args = {"spec": spec, "img_size": img_size, "batch": batch, "steps": steps, "precision": precision,
                "overrides": overrides or [], "breakdown": breakdown}
        code = ("import json, sys, torch\n"
                f"if {threads}: torch.set_num_threads({threads})\n"
                "from mimkit.evaluation.resources import measure\n"
                "print(json.dumps(measure(**json.loads(sys.argv[1]))))")
        res = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"measuring {spec} at {img_size or 'its'} px, batch {batch} failed: {last}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def resources_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with the host and settings they were measured under."""
    def cell(key: str, v: Any) -> str:
        if key.endswith("_params"):
            return f"{v:,}"
        if key.endswith("gflop_per_img"):
            return f"{v:.3f}"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    shared = [f"{k} {rows[0][k]}" for k in ("batch", "device", "cpu", "precision", "threads", "peak_kind")
              if all(r[k] == rows[0][k] for r in rows)]
    lines.append("\n" + ", ".join([*shared, time.strftime("%Y-%m-%d %H:%M")]))
    for r in rows:
        if "forward_gflop_by_module" in r:
            lines += ["", f"Forward FLOPs of {r['config']} at {r['img_size']} px by module (a module holds its "
                      "children's; a training step's backward costs about twice each trained module's forward):",
                      "", "| module | forward GFLOP/img | share of the forward |", "|---|---|---|"]
            total = r["forward_gflop_per_img"]
            lines += [f"| {'&nbsp;' * 2 * name.count('.')}{name} | {g:.3f} | {g / total:.1%} |"
                      for name, g in r["forward_gflop_by_module"].items() if g > 0]
    return "\n".join(lines)


__all__ = ["COLUMNS", "config_spec", "cpu_flags", "measure", "measure_configs", "module_flops", "peak_rss_mib",
           "resources_table"]
