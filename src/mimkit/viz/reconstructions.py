"""PNG grids of masked-autoencoder reconstructions, and of the views a method without one trains on."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mimkit.data.transforms import Normalize  # noqa: E402
from mimkit.methods import PretrainMethod  # noqa: E402

ROWS = ("original", "encoder input", "reconstruction", "reconstruction + visible")
#: The rows of a method that hides nothing (a tokenizer decoding its codes).
WHOLE_ROWS = ("original", "decoded")


@torch.no_grad()
def reconstruction_panels(method: PretrainMethod, images: torch.Tensor, normalize: Normalize) -> list[torch.Tensor]:
    """The four rows of the figure as ``[N, C, H, W]`` tensors in [0, 1].

    Args:
        method: A method with :meth:`~mimkit.methods.PretrainMethod.reconstruct`.
        images: Normalised images ``[N, C, H, W]``.
        normalize: The normalisation the images went through (to map back to pixels).

    Returns:
        ``[original, masked input, reconstruction, reconstruction pasted into the visible pixels]``, or
        ``[original, reconstruction]`` for a method that hides nothing (a tokenizer).

    """
    method.eval()
    out = method(images)
    recon, mask = method.reconstruct(images, out)  # both in normalised space; mask 1 = hidden
    original = normalize.denormalize(images)
    shown = normalize.denormalize(recon)
    if out.mask is None and out.inputs is None:  # nothing hidden: the image and what its codes decode to
        return [original, shown]
    # what the encoder saw: the image greyed where hidden, or the mixed images of a mixing method
    masked = original * (1 - mask) + 0.5 * mask if out.inputs is None else normalize.denormalize(out.inputs)
    pasted = original * (1 - mask) + shown * mask
    return [original, masked, shown, pasted]


def save_reconstructions(method: PretrainMethod, images: torch.Tensor, normalize: Normalize, path: Path,
                         title: str = "") -> Path:
    """Write the reconstruction grid (rows: original, masked, reconstruction, pasted; or original and
    decoded for a method that hides nothing) to ``path``.
    """
    panels = reconstruction_panels(method, images, normalize)
    return save_grid(panels, ROWS if len(panels) == len(ROWS) else WHOLE_ROWS, path, title)


def save_views(views: tuple[torch.Tensor, ...], normalize: Normalize, path: Path, title: str = "") -> Path:
    """Write the augmented views a method trains on, one row per view, to ``path``.

    For a method without a pixel reconstruction (DINO, iBOT) these crops are what its encoder sees.

    Args:
        views: Normalised views ``[N, C, S_v, S_v]``, one tensor per view (sizes may differ); each row
            is labelled with its view's number and side.
        normalize: The normalisation the views went through (to map back to pixels).
        path: The PNG to write.
        title: The figure title.

    """
    names = [f"view {i + 1} ({v.shape[-1]} px)" for i, v in enumerate(views)]
    return save_grid([normalize.denormalize(v) for v in views], names, path, title)


def save_grid(panels: list[torch.Tensor], names: tuple[str, ...] | list[str], path: Path, title: str = "") -> Path:
    """Write rows of images (``[N, C, H, W]`` in [0, 1], one tensor per row) as a labelled PNG grid."""
    n = panels[0].shape[0]
    fig, axes = plt.subplots(len(panels), n, figsize=(1.3 * n, 1.4 * len(panels)), squeeze=False)
    for r, (panel, name) in enumerate(zip(panels, names, strict=True)):
        for c in range(n):
            ax = axes[r][c]
            img = panel[c].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
