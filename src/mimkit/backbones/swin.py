"""Swin Transformer encoder with the timm backbone interface and an attention restriction input.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
timm's ``WindowAttention`` (with its relative position bias) and ``PatchMerging`` do the work; the
block here adds what MixMAE needs (Liu et al., "MixMAE: Mixed and Masked Autoencoder for Efficient
Pretraining of Hierarchical Vision Transformers", CVPR 2023): a per-token group label, so that
inside a window a token attends only to tokens of its own image, and an optional frozen sin-cos
absolute position embedding after the patch embedding. Shifted windows are optional (MixMAE's
released model uses none); a stage whose map is no larger than its window attends globally, and a
map that is not a whole number of windows (a small crop) is padded, the padding masked out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from timm.models.swin_transformer import PatchMerging, WindowAttention, window_partition, window_reverse
from torch import nn

from mimkit.backbones.layers.init import trunc_normal_init
from mimkit.backbones.layers.intermediates import plan_intermediates
from mimkit.backbones.layers.norm import layer_norm
from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.errors import ConfigError
from mimkit.masking.kinds import Mask, MixPairs, check_mask
from mimkit.schema import check_heads, check_positive


def window_attention_mask(ids: torch.Tensor, window: int) -> torch.Tensor:
    """Additive attention mask letting a token see only tokens with the same id in its window.

    Args:
        ids: ``[B, H, W]`` int64 token ids (a shift region, an image label, or both combined);
            ``B`` is 1 when the ids are shared by the batch.
        window: Window side; divides ``H`` and ``W``.

    Returns:
        ``[B * num_windows, window^2, window^2]`` float32: 0 where the ids match, the float32 minimum
        elsewhere (every token matches itself, so no row is empty and the softmax stays finite).

    """
    flat = window_partition(ids.unsqueeze(-1).float(), (window, window)).flatten(1)  # [B*nW, T]
    same = flat.unsqueeze(2) == flat.unsqueeze(1)
    return torch.zeros(same.shape, dtype=torch.float32, device=ids.device).masked_fill_(
        ~same, torch.finfo(torch.float32).min)


def shift_regions(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's region ids ``[1, H, W]`` of a map cyclically shifted by ``shift``: tokens that were not
    neighbours before the shift get different ids, so a shifted window does not join them.
    """
    ids = torch.zeros(1, height, width, dtype=torch.long, device=device)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            ids[:, hs, ws] = count
            count += 1
    return ids


def stage_windows(img_size: int, patch_size: int, num_stages: int, window_size: int | Sequence[int]) -> list[int]:
    """Each stage's window for a backbone built at ``img_size``: ``window_size``, or the whole map
    where the map is smaller.
    """
    windows = [window_size] * num_stages if isinstance(window_size, int) else list(window_size)
    side = img_size // patch_size
    out = []
    for win in windows:
        out.append(min(win, max(side, 1)))
        side //= 2
    return out


class SwinBlock(nn.Module):
    """Pre-norm window-attention block on ``[N, H, W, C]`` maps, optionally shifted, optionally
    restricted to same-label tokens.
    """

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float,
                 drop_path: float, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = layer_norm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size=window, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, H, W, C]`` to the same shape; ``labels [N or 1, H, W]`` restrict attention to equal labels.

        A map that is not a whole number of windows is padded at the bottom and right (as Swin
        does); the padding tokens are masked out, so no real token attends to them.
        """
        n, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = -h % ws, -w % ws
        y = self.norm1(x)
        ids = labels  # tokens attend where their ids match: the image label, the padding, the shift region
        if pad_h or pad_w:
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
            real = torch.ones(1, h, w, dtype=torch.long, device=x.device) if labels is None else labels + 1
            ids = F.pad(real, (0, pad_w, 0, pad_h))  # 0: padding
        hp, wp = h + pad_h, w + pad_w
        shift = self.shift if min(hp, wp) > ws else 0  # one window across: nothing to shift (as Swin)
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            regions = shift_regions(hp, wp, ws, shift, x.device)
            ids = regions if ids is None else torch.roll(ids, (-shift, -shift), dims=(1, 2)) * 9 + regions
        mask = None if ids is None else window_attention_mask(ids, ws)
        out = self.attn(window_partition(y, (ws, ws)).view(-1, ws * ws, c), mask)
        out = window_reverse(out.view(-1, ws, ws, c), (ws, ws), hp, wp)
        if shift:
            out = torch.roll(out, (shift, shift), dims=(1, 2))
        x = x + self.drop_path(out[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Optional 2x2 patch merging, then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window: int, shifted: bool,
                 mlp_ratio: float, drop_path: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, norm_layer=layer_norm) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, window // 2 if shifted and i % 2 else 0, mlp_ratio, drop_path[i])
            for i in range(depth)
        )


class SwinTransformer(nn.Module):
    """Hierarchical window-attention encoder with the timm backbone interface.

    ``forward_features`` returns the normalised last-stage tokens ``[N, L_last, D]``, ``forward_head``
    their mean. With a :class:`~mimkit.masking.MixPairs` mask, every block's attention is limited to
    tokens with the same label (the image they come from) and the mix embedding is added at each
    stage's input. Patch merging joins 2x2 tokens, which MixMAE keeps within one image by drawing its
    labels on the last stage's grid.

    Example:
        >>> swin = SwinTransformer(img_size=32, patch_size=2, in_chans=1, embed_dims=(16, 32),
        ...                        depths=(1, 1), num_heads=(1, 2), window_size=8)
        >>> swin.forward_features(torch.randn(2, 1, 32, 32)).shape  # 16x16 -> 8x8 tokens
        torch.Size([2, 64, 32])

    """

    #: The kinds of mask ``forward_features`` takes (:mod:`mimkit.masking.kinds`).
    mask_kinds = frozenset({"mix"})
    uses_mask_token = False

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        shifted: bool = True,
        abs_pos_embed: bool = False,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        """Build the encoder.

        Args:
            img_size: Training resolution; it fixes each stage's window (``window_size``, or the whole
                map where the map is smaller). A map of another size is padded to whole windows.
            patch_size: Side of the first, non-overlapping patch embedding.
            in_chans: Input channels.
            embed_dims: Token width per stage (each later stage starts with a 2x2 patch merging).
            depths: Blocks per stage.
            num_heads: Attention heads per stage.
            window_size: Window side, one for all stages or one per stage; a stage whose map is
                smaller uses the whole map as its window.
            shifted: Shift every second block's windows by half a window (Swin); MixMAE uses none.
            abs_pos_embed: Add a frozen 2-D sin-cos position embedding after the patch embedding
                (MixMAE's choice; Swin itself relies on the relative position bias alone).
            mlp_ratio: MLP hidden width / D.
            drop_path_rate: Stochastic depth, linearly increasing over all blocks.
            num_classes: Size of the classification head; 0 = no head.

        """
        super().__init__()
        windows = [window_size] * len(embed_dims) if isinstance(window_size, int) else list(window_size)
        lengths = {len(embed_dims), len(depths), len(num_heads), len(windows)}
        if len(lengths) != 1:
            raise ConfigError("backbone.embed_dims, depths, num_heads and window_size need one entry per stage; got "
                              f"{list(embed_dims)}, {list(depths)}, {list(num_heads)}, {windows}")
        check_positive("backbone", img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                       embed_dims=list(embed_dims), depths=list(depths), num_heads=list(num_heads),
                       window_size=windows, mlp_ratio=mlp_ratio)
        for i, (dim, heads) in enumerate(zip(embed_dims, num_heads, strict=True)):
            check_heads(f"backbone.embed_dims[{i}]", dim, f"backbone.num_heads[{i}]", heads)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"backbone.drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if abs_pos_embed and embed_dims[0] % 4:
            raise ConfigError(f"backbone.abs_pos_embed needs embed_dims[0] divisible by 4, got {embed_dims[0]}")
        self.patch_size, self.in_chans, self.img_size = patch_size, in_chans, img_size
        self.embed_dims = tuple(embed_dims)
        self.embed_dim = self.num_features = embed_dims[-1]
        self.num_prefix_tokens = 0
        self.abs_pos_embed = abs_pos_embed
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dims[0], norm_layer=layer_norm, strict_img_size=False,
                                      output_fmt="NHWC")
        if img_size % patch_size:
            raise ConfigError(f"backbone.img_size {img_size} is not divisible by backbone.patch_size {patch_size}")
        self.windows = stage_windows(img_size, patch_size, len(embed_dims), windows)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # numbers, also under meta
        self.stages = nn.ModuleList()
        start = 0
        for i, dim in enumerate(embed_dims):
            self.stages.append(SwinStage(embed_dims[i - 1] if i else dim, dim, depths[i], num_heads[i],
                                         self.windows[i], shifted, mlp_ratio, dpr[start:start + depths[i]],
                                         downsample=i > 0))
            start += depths[i]
        self.norm = layer_norm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(trunc_normal_init)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Token width of each stage."""
        return self.embed_dims

    @property
    def mix_unit(self) -> int:
        """Pixels a side of one last-stage token: a mixing cell must be a whole number of them, or a
        patch or a merged group would hold both images.
        """
        return self.patch_size * 2 ** (len(self.stages) - 1)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The last stage's token grid for an input of ``height x width`` pixels (patch merging
        rounds an odd map up).
        """
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not divisible by patch_size {self.patch_size}")
        height, width = height // self.patch_size, width // self.patch_size
        for _ in self.stages[1:]:
            height, width = -(-height // 2), -(-width // 2)
        return height, width

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` to the first stage's input ``[N, H / p, W / p, D0]``."""
        self.grid_size(*x.shape[-2:])
        tokens = self.patch_embed(x)
        if self.abs_pos_embed:
            h, w = tokens.shape[1:3]
            tokens = tokens + sincos_2d(h, w, tokens.shape[-1], x.device).view(1, h, w, -1).to(tokens.dtype)
        return tokens

    def forward_stages(self, x: torch.Tensor, mask: MixPairs | None = None) -> list[torch.Tensor]:
        """Every stage's output ``[N, H_i, W_i, D_i]`` (the last through the final norm).

        Args:
            x: Images ``[N, C, H, W]`` (mixed ones with a ``mask``).
            mask: Optional :class:`MixPairs`: labels on the last stage's grid.

        """
        check_mask(self, mask)
        tokens = self._patch_tokens(x)
        maps = []
        for s, stage in enumerate(self.stages):
            tokens = stage.downsample(tokens)
            labels = None
            if mask is not None:
                size, cells = tuple(tokens.shape[1:3]), tuple(mask.labels.shape[-2:])
                if size != tuple(c * 2 ** (len(self.stages) - 1 - s) for c in cells):
                    raise ValueError(
                        f"a {cells[0]}x{cells[1]} mix does not tile stage {s}'s {size[0]}x{size[1]} map: patch merging "
                        "would join the two images; mix on the last stage's grid of an image whose side is a "
                        f"multiple of {self.mix_unit} px")
                labels = mask.stage_labels(size)  # [N or 1, H, W]
                if mask.embeds is not None:
                    tokens = tokens + mask.embeds[s].to(tokens.dtype)[labels]
            for block in stage.blocks:
                tokens = block(tokens, labels)
            maps.append(tokens)
        maps[-1] = self.norm(maps[-1])
        return maps

    def forward_features(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Normalised last-stage tokens ``[N, H_last * W_last, D]`` of images ``[N, C, H, W]``."""
        return self.forward_stages(x, mask)[-1].flatten(1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs beside the final features, in timm's ``forward_intermediates`` convention.

        As in timm's Swin, the intermediates are stages (each after its patch merging and blocks);
        :meth:`forward_last_blocks` gives the last stage's blocks one by one.

        The arguments and the return value are timm's (:mod:`mimkit.backbones.layers.intermediates`).

        Raises:
            ValueError: ``indices`` outside the stages, or an unknown ``output_fmt``.

        """
        take, run = plan_intermediates(len(self.stages), indices, "stage", output_fmt, stop_early, intermediates_only)
        last = len(self.stages) - 1
        tokens = self._patch_tokens(x)
        outs = []
        for i, stage in enumerate(self.stages[:run]):
            tokens = stage.downsample(tokens)
            for block in stage.blocks:
                tokens = block(tokens)
            if i in take:
                y = self.norm(tokens) if norm and i == last else tokens  # [N, H_i, W_i, D_i]
                outs.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y.flatten(1, 2))
        if intermediates_only:
            return outs
        return self.norm(tokens).flatten(1, 2), outs

    def forward_last_blocks(self, x: torch.Tensor, indices: int = 1) -> list[torch.Tensor]:
        """The last ``indices`` blocks of the last stage, through the final norm, each ``[N, L_last, D]``
        like :meth:`forward_features`' output (:mod:`mimkit.backbones.layers.intermediates`).
        """
        last = self.stages[-1]
        if not 1 <= indices <= len(last.blocks):
            raise ValueError(f"indices must be in [1, {len(last.blocks)}] (the last stage's depth), got {indices}")
        tokens = self._patch_tokens(x)
        for stage in self.stages[:-1]:
            tokens = stage.downsample(tokens)
            for block in stage.blocks:
                tokens = block(tokens)
        tokens = last.downsample(tokens)
        outs = []
        for i, block in enumerate(last.blocks):
            tokens = block(tokens)
            if i >= len(last.blocks) - indices:
                outs.append(self.norm(tokens).flatten(1, 2))
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean-pool tokens ``[N, L, D]`` to ``[N, D]`` (``pre_logits``) or to class logits."""
        pooled = x.mean(dim=1)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` to logits (or pooled features when there is no head)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position bias tables (2-D, so timm's 1-D rule would decay them)."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Regexes grouping parameters by depth, as timm uses for layer-wise lr decay."""
        return {
            "stem": r"^patch_embed",
            "blocks": r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }


SWIN_PRESETS: dict[str, dict[str, object]] = {
    # Small-image presets. 28 px, patch 2 -> a 14x14 grid, then 7x7; window 7: four local windows, then
    # one global window (the design note's small MixMAE setting, at 28 px instead of 28 padded to 32).
    "swin_tiny_p2": dict(img_size=28, patch_size=2, embed_dims=(48, 96), depths=(2, 4), num_heads=(2, 4),
                         window_size=7, shifted=False, abs_pos_embed=True),
    # Three stages at 32 px: 16x16, 8x8, 4x4 (only 16 mixing cells at the last stage).
    "swin_tiny3_p2": dict(img_size=32, patch_size=2, embed_dims=(48, 96, 192), depths=(2, 2, 2),
                          num_heads=(2, 4, 8), window_size=8, shifted=False, abs_pos_embed=True),
    # The published ImageNet models (Swin-T/S/B, window 7, shifted windows).
    "swin_t": dict(img_size=224, patch_size=4, embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2),
                   num_heads=(3, 6, 12, 24), window_size=7),
    "swin_s": dict(img_size=224, patch_size=4, embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2),
                   num_heads=(3, 6, 12, 24), window_size=7),
    "swin_b": dict(img_size=224, patch_size=4, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                   num_heads=(4, 8, 16, 32), window_size=7),
    # MixMAE's released Swin-B/W14 (windows 14, 14, 14, 7; no shifted windows).
    "swin_b_w14": dict(img_size=224, patch_size=4, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                       num_heads=(4, 8, 16, 32), window_size=(14, 14, 14, 7), shifted=False, abs_pos_embed=True),
}
