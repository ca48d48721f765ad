"""What an encoder looks at and what its patch features tell apart: attention maps and PCA feature maps.

Attention maps as Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV
2021) draw them: the last block's attention of the class token over the patches, averaged over the
heads. A backbone without a class token (the CvT) gets the attention each key position receives,
averaged over all queries. PCA feature maps as Oquab et al., "DINOv2: Learning Robust Visual
Features without Supervision" (TMLR 2024) draw them: the first three principal components of the
patch features of all the images together, as red, green and blue.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.transforms import Normalize
from mimkit.errors import ConfigError
from mimkit.viz.reconstructions import save_grid

log = logging.getLogger(__name__)


def last_attention(encoder: nn.Module) -> nn.Module:
    """The attention module of the encoder's last block (the last module named ``*attn`` with heads).

    Raises:
        ConfigError: The encoder has no such module.

    """
    found = [m for name, m in encoder.named_modules() if name.endswith("attn") and hasattr(m, "num_heads")]
    if not found:
        raise ConfigError(f"{type(encoder).__name__} has no attention block to draw; --attention needs a ViT or CvT")
    return found[-1]


@contextlib.contextmanager
def recorded_attention(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the attention probabilities ``[N, heads, Q, K]`` (float32) of each call of ``module``.

    The module's ``scaled_dot_product_attention`` call is watched while the module runs (timm's
    ``Attention`` is held on its fused path for it); its output is the kernel's own, unchanged.
    """
    maps: list[torch.Tensor] = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        logits = q.float() @ k.float().transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else logits + attn_mask.float())
        maps.append(logits.softmax(-1))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    fused = getattr(module, "fused_attn", None)
    hooks = [module.register_forward_pre_hook(lambda *_: setattr(F, "scaled_dot_product_attention", recording)),
             module.register_forward_hook(lambda *_: setattr(F, "scaled_dot_product_attention", original))]
    if fused is not None:
        module.fused_attn = True
    try:
        yield maps
    finally:
        for hook in hooks:
            hook.remove()
        F.scaled_dot_product_attention = original
        if fused is not None:
            module.fused_attn = fused


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="nearest")


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention over the image, each map scaled to [0, 1].

    Args:
        encoder: A ViT (class-token attention) or CvT (attention received, averaged over queries), in
            eval mode.
        images: Normalised images ``[N, C, H, W]``.

    Returns:
        ``[N, 1, H, W]`` maps, each image's from its smallest weight (0) to its largest (1).

    Raises:
        ConfigError: The encoder has no global attention in its last block (a Swin's windows).

    """
    n, _, height, width = images.shape
    with recorded_attention(last_attention(encoder)) as maps:
        encoder.forward_features(images)
    attn = maps[-1]  # [N, heads, Q, K]
    if attn.shape[0] != n:
        raise ConfigError(f"{type(encoder).__name__} attends within windows ({attn.shape[0]} attention maps for "
                          f"{n} images); --attention draws a ViT's or CvT's global attention")
    prefix = int(getattr(encoder, "num_prefix_tokens", 0))
    weights = attn[:, :, 0, prefix:] if prefix else attn.mean(2)  # [N, heads, K]
    weights = weights.mean(1)
    keys = weights.shape[-1]
    gh = max(1, round(math.sqrt(keys * height / width)))
    if keys % gh:
        raise ConfigError(f"{keys} attended positions do not form a grid of the image's aspect {height}x{width}")
    grid = weights.reshape(n, 1, gh, keys // gh)
    low = grid.amin(dim=(2, 3), keepdim=True)
    high = grid.amax(dim=(2, 3), keepdim=True)
    return _upsample((grid - low) / (high - low).clamp_min(1e-12), (height, width))


@torch.no_grad()
def pca_maps(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The first three principal components of the last block's patch features, as colour maps.

    The components are fitted to the patch features of all ``images`` together, so one colour means
    the same direction in feature space in every image.

    Args:
        encoder: A backbone with timm's ``forward_intermediates`` (every mimkit backbone), in eval mode.
        images: Normalised images ``[N, C, H, W]``, N >= 1.

    Returns:
        ``[N, 3, H, W]`` in [0, 1]: each component scaled from its 1st to its 99th percentile over
        all the images.

    """
    n, _, height, width = images.shape
    feats = encoder.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW",
                                          intermediates_only=True)[-1].float()  # [N, D, h, w]
    _, dim, gh, gw = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(-1, dim)
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = x @ vh[:3].T  # [N h w, <=3]
    comps = F.pad(comps, (0, 3 - comps.shape[1]))
    low, high = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    comps = ((comps - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return _upsample(comps.reshape(n, gh, gw, 3).permute(0, 3, 1, 2), (height, width))


def _heat(maps: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` in [0, 1] as RGB ``[N, 3, H, W]`` through matplotlib's ``inferno``."""
    rgb = matplotlib.colormaps["inferno"](maps[:, 0].cpu().numpy())[..., :3]
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float()


def save_feature_maps(encoder: nn.Module, images: torch.Tensor, normalize: Normalize, folder: Path,
                      title: str = "") -> list[Path]:
    """Write ``attention.png`` (where a ViT or CvT has global attention) and ``pca.png`` to ``folder``.

    Args:
        encoder: The evaluated module of a run (a method's ``eval_module``); put in eval mode.
        images: Normalised images ``[N, C, H, W]``.
        normalize: Their normalisation (to draw the originals).
        folder: Where the PNGs go.
        title: Figure title.

    Returns:
        The PNGs written; a Swin's windowed attention gives ``pca.png`` only.

    """
    encoder.eval()
    original = normalize.denormalize(images)
    written = []
    try:
        attention = attention_maps(encoder, images)
    except ConfigError as err:
        log.warning("no attention.png: %s", err)
        attention = None
    if attention is not None:
        overlay = 0.45 * original.expand(-1, 3, -1, -1) + 0.55 * _heat(attention)
        written.append(save_grid([original, _heat(attention), overlay], ["image", "attention", "overlay"],
                                 folder / "attention.png", f"{title}: last block's attention".strip(": ")))
    written.append(save_grid([original, pca_maps(encoder, images)], ["image", "PCA of patch features"],
                             folder / "pca.png", f"{title}: first 3 principal components".strip(": ")))
    return written


__all__ = ["attention_maps", "last_attention", "pca_maps", "recorded_attention", "save_feature_maps"]
