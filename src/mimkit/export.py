"""Release a trained encoder: ``mimkit export`` writes it, :func:`load_encoder` reads it back.

An export folder holds

- ``encoder.safetensors`` and ``encoder.json``: the evaluated module's weights (the encoder, or the
  teacher's for methods that evaluate one) and what is needed to build and feed it: the backbone's
  registry name and settings, the input size and channels, and the per-channel normalisation the
  run trained with. :func:`load_encoder` needs nothing else.
- ``model.safetensors`` and ``config.yaml``: the whole method (decoder included) and the run's
  resolved config, so the folder is itself a checkpoint every command reads (``mimkit visualize``
  draws reconstructions from a released model, ``mimkit knn`` and ``mimkit finetune`` take it).
- ``timm/`` for ViT backbones: a folder in the layout of timm's ``save_for_hf`` that timm's own
  loader reads, ``timm.create_model("local-dir:<export>/timm", pretrained=True)``: the same weights
  keyed for timm's ``VisionTransformer`` (the fixed sin-cos position embedding written out as its
  ``pos_embed``), the ``create_model`` arguments that give the same features, and a
  ``pretrained_cfg`` with the input size, channels, mean and std, for ``resolve_model_data_config``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mimkit.backbones import check_backbone_cfg, create_backbone
from mimkit.backbones.vit import VisionTransformer
from mimkit.engine.checkpoint import (
    MODEL_FILE,
    build_for_weights,
    check_weights,
    load_weights,
    read_safetensors,
    resolve_checkpoint,
)
from mimkit.engine.run_folder import CONFIG_FILE, check_room, check_writable, run_config_for
from mimkit.errors import CheckpointError, ConfigError
from mimkit.schema import is_number, require

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"
#: What an export folder holds; ``--overwrite`` replaces a folder holding nothing else.
EXPORT_FILES = frozenset({ENCODER_WEIGHTS, ENCODER_META, MODEL_FILE, CONFIG_FILE, "timm"})
FORMAT = "mimkit-encoder"
FORMAT_VERSION = 1
#: timm's ViT with mimkit's choices: mean of the patch tokens after the final norm, no fc norm, no head.
_TIMM_VIT_DEFAULTS = {"class_token": True, "global_pool": "avg", "fc_norm": False, "num_classes": 0,
                      "no_embed_class": False, "dynamic_img_size": False}


def timm_vit_weights(encoder: VisionTransformer, img_size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Mimkit's ViT as timm's ``VisionTransformer``: its state dict and ``create_model`` arguments.

    The parameter names are timm's already (the blocks are timm's ``Block``); timm learns a position
    embedding ``[1, 1 + L, D]`` where mimkit adds one (fixed sin-cos, or learned) to the patch tokens
    only, so it is written out for ``img_size``, with zeros at the class token.

    Args:
        encoder: A mimkit :class:`~mimkit.backbones.vit.VisionTransformer`.
        img_size: The input side the position embedding is written for.

    Returns:
        ``(state_dict, model_args)`` for ``timm.create_model(timm_architecture(model_args), **model_args)``.

    """
    gh, gw = encoder.grid_size(img_size, img_size)
    # timm's model is created without a head (num_classes=0): the features are what is released.
    state = {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    pos = encoder.positions(gh, gw).detach().float().cpu().reshape(1, gh * gw, encoder.embed_dim)
    pos = torch.cat([torch.zeros(1, 1, encoder.embed_dim), pos], dim=1)
    state["pos_embed"] = pos.to(state["cls_token"].dtype).contiguous()
    block = encoder.blocks[0]
    args = {
        "img_size": img_size, "patch_size": encoder.patch_size, "in_chans": encoder.in_chans,
        "embed_dim": encoder.embed_dim, "depth": len(encoder.blocks), "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None, **_TIMM_VIT_DEFAULTS,
    }
    if encoder.global_pool == "token":
        args["global_pool"] = "token"
    return state, args


def timm_architecture(model_args: dict[str, Any]) -> str:
    """The timm ViT entry point nearest in width; ``model_args`` override its shape whatever it is."""
    widths = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
              1024: "vit_large_patch16_224"}
    return widths.get(model_args["embed_dim"], "vit_base_patch16_224")


def timm_hub_config(model_args: dict[str, Any], mean: list[float], std: list[float]) -> dict[str, Any]:
    """The ``config.json`` of timm for an exported ViT, in the layout ``timm.models.save_for_hf`` writes.

    Args:
        model_args: From :func:`timm_vit_weights`.
        mean: Per-channel mean the encoder was trained with (pixels in [0, 1]).
        std: Per-channel standard deviation.

    Returns:
        ``architecture`` and ``model_args`` (read by ``create_model("local-dir:...")``), and a
        ``pretrained_cfg`` that ``timm.data.resolve_model_data_config`` turns into the input
        pipeline: ``input_size`` ``(C, H, W)``, ``mean``, ``std``, bicubic, no crop margin.

    """
    size = model_args["img_size"]
    return {
        "architecture": timm_architecture(model_args), "num_classes": 0, "num_features": model_args["embed_dim"],
        "global_pool": model_args["global_pool"], "model_args": model_args,
        "pretrained_cfg": {"input_size": [model_args["in_chans"], size, size], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center", "mean": mean,
                           "std": std, "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"},
    }


def export_checkpoint(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the export folder of a run's newest checkpoint (or of a given checkpoint) to ``out``.

    Args:
        run: A run folder or checkpoint.
        out: The export folder to create.
        overwrite: Replace ``out`` if it holds an earlier export (never a run or other files).

    Returns:
        ``out``.

    Raises:
        ConfigError: ``out`` is not empty and ``overwrite`` is not set.
        CheckpointError: No complete checkpoint, or weights that do not fit the run's config.

    """
    from mimkit.data import build_dataset, normalizer_for
    from mimkit.engine.continuation import load_run_config
    from mimkit.models import backbone_settings, method_from_config

    ckpt = resolve_checkpoint(run)
    out = Path(out)
    check_writable(out, "the export", "choose a writable --out")
    # The whole model, the encoder and timm's copy of it: at most three times the checkpoint's weights.
    check_room(out, 3 * (ckpt / MODEL_FILE).stat().st_size + (1 << 20), "the export", "choose --out on another disk")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the export")
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise ConfigError(f"--out {out} holds the checkpoint being exported ({ckpt}); choose a folder outside it")
    if out.is_dir() and any((out / name).exists() for name in (".lock", "checkpoints", "metrics.jsonl")):
        raise ConfigError(f"--out {out} holds a run: an export never replaces a run, even with --overwrite; "
                          "choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"export folder {out} already holds files; pass --overwrite to replace them, "
                          "or choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    if foreign:
        raise ConfigError(f"--out {out} holds files that are not an export ({', '.join(foreign[:5])}); --overwrite "
                          "replaces only an earlier export: choose another --out")
    cfg_path = run_config_for(ckpt)
    cfg = load_run_config(cfg_path)
    method = build_for_weights(lambda: method_from_config(cfg), ckpt / MODEL_FILE, settings=cfg_path)
    load_weights(method, ckpt)
    encoder = method.eval_module.eval()
    # A run stores the statistics it trained with; one from before that is read from its data again.
    mean, std = normalizer_for(None if cfg.data.mean else build_dataset(cfg.data, "train"), cfg.data).stats()
    settings = backbone_settings(cfg)
    settings.pop("drop_path_rate", None)  # a training-time setting; an exported encoder is for inference
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "backbone": {"name": cfg.backbone["name"], **settings}, "num_features": int(encoder.num_features),
        "input": {"img_size": settings["img_size"], "channels": settings["in_chans"], "mean": mean, "std": std,
                  "range": "pixels in [0, 1], then (x - mean) / std per channel"},
        "source": {"checkpoint": str(ckpt.resolve()), "method": cfg.method.name,
                   "module": method.eval_module_name, "dataset": cfg.data.name},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
    }
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / ENCODER_WEIGHTS))
    (tmp / ENCODER_META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(ckpt / MODEL_FILE, tmp / MODEL_FILE)
    shutil.copyfile(cfg_path, tmp / CONFIG_FILE)
    if isinstance(encoder, VisionTransformer):
        state, args = timm_vit_weights(encoder, settings["img_size"])
        (tmp / "timm").mkdir()
        save_file(state, str(tmp / "timm" / "model.safetensors"))
        (tmp / "timm" / "config.json").write_text(json.dumps(timm_hub_config(args, mean, std), indent=2) + "\n")
    # The old export is moved aside, not deleted, until the new one is in place.
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _check_input(spec: dict[str, Any]) -> None:
    """Refuse an ``input`` entry whose size, channels or normalisation could not feed the encoder."""
    size, channels = spec.get("img_size"), spec.get("channels")
    require(is_number(size) and isinstance(size, int) and size > 0, "input.img_size", "a positive integer", size)
    require(channels in (1, 3), "input.channels", "1 or 3", channels)
    for key in ("mean", "std"):
        values = spec.get(key)
        ok = isinstance(values, list) and len(values) == channels and all(is_number(v) for v in values)
        require(ok and (key == "mean" or min(values) > 0), f"input.{key}",
                f"{channels} finite number(s){' above 0' if key == 'std' else ''}", values)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The encoder of an export folder, in eval mode, without the run it came from.

    Example:
        >>> enc = load_encoder("exports/cvt_mae_fmnist_s4")  # doctest: +SKIP
        >>> feats = enc.forward_head(enc.forward_features(images), pre_logits=True)  # [N, num_features]

    Args:
        path: An export folder (``mimkit export``) or its ``encoder.json``.
        device: Where to put the weights.

    Returns:
        The backbone with the backbone interface (``forward_features``, ``forward_head``); its
        expected input normalisation is in ``encoder.json`` (and on the module as ``input_stats``).

    Raises:
        CheckpointError: Not an export folder, or weights that do not fit the recorded backbone.

    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    meta_file = folder / ENCODER_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_file}: not a mimkit export ({err}); `mimkit export RUN --out DIR` writes "
                              "one") from None
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"this mimkit reads {FORMAT!r} up to version {FORMAT_VERSION}")
    missing = [k for k in ("backbone", "input") if not isinstance(meta.get(k), dict)]
    if missing or "name" not in meta.get("backbone", {}):
        raise CheckpointError(f"{meta_file}: no {' or '.join(missing) or 'backbone name'} entry; it is not a "
                              "complete mimkit export")
    settings = dict(meta["backbone"])
    try:  # checked as the same settings typed on the command line would be
        check_backbone_cfg(settings)
        _check_input(meta["input"])
    except ConfigError as err:
        raise CheckpointError(f"{meta_file}: {err}") from None
    name = settings.pop("name")
    weights = folder / ENCODER_WEIGHTS
    try:
        encoder = build_for_weights(lambda: create_backbone(name, **settings), weights)
    except ConfigError as err:  # a value the builder itself refuses (a zero depth, heads that do not divide)
        raise CheckpointError(f"{meta_file}: {err}") from None
    encoder.load_state_dict(check_weights(encoder, read_safetensors(weights), weights))
    encoder.input_stats = meta["input"]
    return encoder.to(device).eval()


__all__ = ["ENCODER_META", "ENCODER_WEIGHTS", "export_checkpoint", "load_encoder", "timm_vit_weights"]
