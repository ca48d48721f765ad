"""Convolutional token embedding with an inpainting-style update mask.

Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions", ECCV 2018; used at
every CvT stage by the hybrid CvT-MAE ("MAE-based Hybrid Convolutional ViT for Self-Supervised
Learning").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.backbones.layers.norm import layer_norm


def window_count(visible: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Number of visible image pixels under each conv window, in float32 whatever the autocast state.

    Args:
        visible: ``[N, 1, H, W]`` with 1 = visible, 0 = masked.
        kernel: Conv kernel side k.
        stride: Conv stride.
        padding: Conv zero padding (padding pixels are not image pixels and never count).

    Returns:
        ``[N, 1, H', W']`` float32 counts in ``[0, k * k]``.

    """
    with torch.autocast(visible.device.type, enabled=False):
        ones = torch.ones(1, 1, kernel, kernel, device=visible.device, dtype=torch.float32)
        return F.conv2d(visible.float(), ones, stride=stride, padding=padding)


#: How an embedding's output mask follows from its input's: ``window`` (the partial convolution's
#: update mask: a token is visible when its window holds a visible input, so the visible region grows
#: by the kernel's overhang at every stage) or ``cell`` (when its own ``stride x stride`` cell does: a
#: hidden block of the last stage's grid stays hidden at every stage, as ConvMAE masks).
PROPAGATIONS = ("window", "cell")


def update_ratio(visible: torch.Tensor, kernel: int, stride: int, padding: int,
                 propagate: str = "window") -> tuple[torch.Tensor, torch.Tensor]:
    """Partial-convolution re-weighting and the next mask, in float32.

    The ratio is (image pixels in the window) / (visible image pixels in the window), so zero padding
    keeps its plain-convolution meaning: with nothing masked the ratio is exactly 1 everywhere,
    borders included (the hybrid CvT-MAE's source code divided by k*k and so rescaled every border
    token). A window with no visible pixel gets ratio 0 and is masked in the next stage; the
    denominator is clamped, so there is no inf or NaN under autocast. With ``propagate="cell"`` a
    token is visible only where its own cell holds a visible input (:data:`PROPAGATIONS`), and a
    hidden token's ratio is 0 even when its window reaches a visible neighbour.

    Args:
        visible: ``[N, 1, H, W]`` with 1 = visible.
        kernel: Conv kernel side.
        stride: Conv stride.
        padding: Conv zero padding.
        propagate: ``window`` or ``cell``.

    Returns:
        ``(ratio [N, 1, H', W'], next visible mask [N, 1, H', W'])``, both float32.

    """
    if propagate not in PROPAGATIONS:
        raise ValueError(f"propagate must be one of {', '.join(PROPAGATIONS)}, got {propagate!r}")
    cnt = window_count(visible, kernel, stride, padding)
    inside = window_count(torch.ones_like(visible[:1], dtype=torch.float32), kernel, stride, padding)
    next_visible = (cnt > 0).float()
    if propagate == "cell":
        cells = F.max_pool2d(visible.float(), stride, stride, ceil_mode=True)
        rows, cols = cnt.shape[-2:]
        cells = F.pad(cells, (0, max(0, cols - cells.shape[-1]), 0, max(0, rows - cells.shape[-2])))
        next_visible = next_visible * cells[..., :rows, :cols]
    return inside / cnt.clamp(min=1.0) * next_visible, next_visible


#: Where an embedding applies the update mask's re-weighting ``r`` (see :class:`ConvEmbed`).
REWEIGHTS = ("pre_norm", "post_norm", "mask_only")


class ConvEmbed(nn.Module):
    """Conv2d + LayerNorm over channels; with a mask, a partial convolution that re-weights windows.

    With ``visible`` given, the input is zeroed where masked, the next mask is ``[cnt > 0]`` and the
    re-weighting ``r = n / max(cnt, 1) * [cnt > 0]`` (``cnt`` the visible and ``n`` all image pixels
    in the window, see :func:`update_ratio`) is applied as ``reweight`` says:

    - ``pre_norm``: ``LN(conv(x * M) * r + b)``, the plain partial-convolution order. LayerNorm over
      channels removes a per-token scale, ``LN(r z + b) = LN(z + b / r)``, so this only scales the
      bias by the visible fraction.
    - ``post_norm``: ``LN(conv(x * M) + b) * r``, the hybrid CvT-MAE source code's order: a token's
      magnitude carries how much of its window was visible, and fully hidden windows are zero.
    - ``mask_only``: ``LN(conv(x * M) + b)``, the mask propagated and the input zeroed, no re-weighting.

    Without a mask it is a plain conv + LayerNorm, whatever ``reweight`` says.

    Example:
        >>> emb = ConvEmbed(3, 32, kernel=3, stride=2, padding=1)
        >>> y, m = emb(torch.randn(2, 3, 28, 28), torch.ones(2, 1, 28, 28))
        >>> y.shape, m.shape
        (torch.Size([2, 32, 14, 14]), torch.Size([2, 1, 14, 14]))

    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        """Build the embedding.

        Args:
            in_chans: Input channels.
            dim: Output channels (token width).
            kernel: Conv kernel side.
            stride: Conv stride (the stage's downsampling).
            padding: Conv zero padding.

        """
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = layer_norm(dim)

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor | None = None, reweight: str = "pre_norm",
        propagate: str = "window",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed ``x [N, C, H, W]`` under an optional mask ``visible [N, 1, H, W]`` (1 = visible).

        Args:
            x: Input map.
            visible: Optional mask; masked pixels of ``x`` are zeroed before the convolution.
            reweight: ``pre_norm``, ``post_norm`` or ``mask_only`` (see the class docstring).
            propagate: How the next mask follows from ``visible`` (:data:`PROPAGATIONS`).

        Returns:
            ``(tokens as a map [N, D, H', W'], next visible mask [N, 1, H', W'] float32 or None)``.

        """
        if reweight not in REWEIGHTS:
            raise ValueError(f"reweight must be one of {', '.join(REWEIGHTS)}, got {reweight!r}")
        ratio = next_visible = None
        if visible is not None:
            x = x * visible.to(x.dtype)
            ratio, next_visible = update_ratio(visible, self.kernel, self.stride, self.padding, propagate)
        # The bias is added after a pre-norm re-weighting, so it is kept out of the convolution.
        y = F.conv2d(x, self.proj.weight, None, self.stride, self.padding)
        if ratio is not None and reweight == "pre_norm":
            y = (y.float() * ratio).to(y.dtype)
        y = y + self.proj.bias.view(1, -1, 1, 1).to(y.dtype)
        y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if ratio is not None and reweight == "post_norm":
            y = (y.float() * ratio).to(y.dtype)
        return y, next_visible

    def forward_mixed(self, x: torch.Tensor, labels_in: torch.Tensor, labels_out: torch.Tensor,
                      reweight: str = "pre_norm") -> torch.Tensor:
        """Embed a two-image mix without carrying one image into the other's positions.

        Each output token is computed from the input pixels of its own label only: the embedding
        runs once per label on the input with the other label's pixels hidden (a partial convolution
        with ``reweight``), and every output position takes the run of its label.

        Args:
            x: Mixed input ``[N, C, H, W]``.
            labels_in: ``[N or 1, H, W]`` int64 labels (0 or 1) of the input positions.
            labels_out: ``[N or 1, H', W']`` labels of the output positions.
            reweight: ``pre_norm``, ``post_norm`` or ``mask_only``.

        Returns:
            Tokens as a map ``[N, D, H', W']``.

        """
        runs = [self.forward(x, (labels_in == g).unsqueeze(1).to(x.dtype), reweight)[0] for g in (0, 1)]
        return torch.where((labels_out == 1).unsqueeze(1), runs[1], runs[0])
