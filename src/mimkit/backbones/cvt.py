"""Convolutional vision transformer (CvT) encoder that accepts a dense pixel mask.

Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021. The per-stage
update mask is the hybrid CvT-MAE's ("MAE-based Hybrid Convolutional ViT for Self-Supervised
Learning"): a partial convolution (Liu et al., "Image Inpainting for Irregular Holes Using Partial
Convolutions", ECCV 2018) at each stage's token embedding. There is no positional embedding and no
class token, so any input size works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mimkit.backbones.layers.conv_attention import ConvBlock
from mimkit.backbones.layers.init import trunc_normal_init
from mimkit.backbones.layers.intermediates import plan_intermediates
from mimkit.backbones.layers.norm import layer_norm
from mimkit.backbones.layers.partial_conv import REWEIGHTS, ConvEmbed, update_ratio
from mimkit.errors import ConfigError
from mimkit.masking.kinds import Mask, MixPairs, PixelMask, TokenMask, check_mask, token_mask_to_pixels
from mimkit.schema import check_heads, check_positive

#: How a masked image goes through the CvT: ``none`` (a plain CvT on the masked image) or the mask
#: propagated through every stage with the re-weighting of ``ConvEmbed`` (``pre_norm``, ``post_norm``,
#: ``mask_only``).
UPDATE_MASKS = ("none", *REWEIGHTS)


class CvTStage(nn.Module):
    """A convolutional token embedding followed by ``depth`` convolutional-attention blocks."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, kernel: int, stride: int,
                 padding: int, mlp_ratio: float, kv_stride: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        self.embed = ConvEmbed(in_chans, dim, kernel, stride, padding)
        self.blocks = nn.ModuleList(
            ConvBlock(dim, num_heads, mlp_ratio, kv_stride, drop_path[i]) for i in range(depth)
        )

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor | None = None, reweight: str = "pre_norm", sparse: bool = False,
        propagate: str = "window",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map ``[N, C, H, W]`` (and mask ``[N, 1, H, W]``) to ``[N, D, H', W']`` (and its mask).

        ``sparse`` (with a mask): the blocks run on the visible tokens only
        (:mod:`mimkit.backbones.layers.sparse`), and the others are zero in the output map;
        ``propagate`` says which tokens are visible (:data:`~mimkit.backbones.layers.partial_conv.PROPAGATIONS`).
        """
        x, visible = self.embed(x, visible, reweight, propagate)
        n, d, h, w = x.shape
        # With every token of every image visible the sparse stage is the dense one, without the packing.
        if sparse and visible is not None and len(self.blocks) and not bool((visible != 0).all()):
            packing = self.blocks[0].attn.sparse_stage(visible)
            tokens = packing.tokens.gather(x)  # [N, L, D]
            for block in self.blocks:
                tokens = block(tokens, h, w, sparse=packing)
            return packing.tokens.scatter(tokens), visible
        tokens = x.flatten(2).transpose(1, 2)  # [N, H'W', D]
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return tokens.transpose(1, 2).reshape(n, d, h, w), visible

    def forward_mixed(self, x: torch.Tensor, labels_in: torch.Tensor, labels_out: torch.Tensor,
                      reweight: str = "pre_norm", embed: torch.Tensor | None = None) -> torch.Tensor:
        """A two-image mix ``[N, C, H, W]`` to ``[N, D, H', W']``, every token computed from its own
        label's inputs only; ``embed [2, D]`` (optional) is added by label to the embedded tokens.
        """
        x = self.embed.forward_mixed(x, labels_in, labels_out, reweight)
        if embed is not None:
            x = x + embed.to(x.dtype)[labels_out].permute(0, 3, 1, 2)
        n, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, h, w, labels_out)
        return tokens.transpose(1, 2).reshape(n, d, h, w)


class ConvVisionTransformer(nn.Module):
    """Hierarchical CvT encoder with the timm backbone interface.

    ``forward_features`` returns the normalised last-stage tokens, ``forward_head`` their mean;
    ``forward_stages`` returns every stage's map for a U-Net decoder. A ``visible`` pixel mask
    (1 = visible) zeroes the masked pixels and, as ``update_mask`` says, re-weights every stage's
    convolutional embedding like a partial convolution (:data:`UPDATE_MASKS`).

    Example:
        >>> cvt = ConvVisionTransformer(in_chans=1, dims=(16, 32, 64), num_heads=(1, 2, 2),
        ...                             depths=(1, 1, 1), kernels=(3, 3, 3), strides=(2, 2, 2),
        ...                             paddings=(1, 1, 1))
        >>> [m.shape[-1] for m in cvt.forward_stages(torch.randn(2, 1, 28, 28))]
        [14, 7, 4]
        >>> cvt.forward_head(cvt.forward_features(torch.randn(2, 1, 28, 28)), pre_logits=True).shape
        torch.Size([2, 64])

    """

    #: The kinds of mask ``forward_features`` takes (:mod:`mimkit.masking.kinds`); a token mask
    #: hides its tokens' pixels and goes through the update mask like a pixel mask; a pair mix keeps
    #: its two images apart in every convolution and attention.
    mask_kinds = frozenset({"pixels", "token_mask", "mix"})
    uses_mask_token = False

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        dims: Sequence[int] = (64, 192, 384),
        num_heads: Sequence[int] = (1, 3, 6),
        depths: Sequence[int] = (1, 2, 10),
        kernels: Sequence[int] = (7, 3, 3),
        strides: Sequence[int] = (4, 2, 2),
        paddings: Sequence[int] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        kv_stride: int = 2,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
    ) -> None:
        """Build the encoder.

        Args:
            img_size: Nominal input size (kept for the config; any size works at run time).
            in_chans: Input channels.
            dims: Token width per stage.
            num_heads: Attention heads per stage.
            depths: Blocks per stage.
            kernels: Kernel of each stage's convolutional embedding.
            strides: Stride of each stage's embedding (the stage's downsampling).
            paddings: Zero padding of each stage's embedding.
            mlp_ratio: MLP hidden width / D.
            kv_stride: Stride of the key/value conv projections.
            drop_path_rate: Stochastic depth, linearly increasing over all blocks.
            num_classes: Size of the classification head; 0 = no head.

        """
        super().__init__()
        lengths = {len(dims), len(num_heads), len(depths), len(kernels), len(strides), len(paddings)}
        if len(lengths) != 1:
            raise ConfigError(
                "dims, num_heads, depths, kernels, strides and paddings need one entry per stage; got "
                f"{list(dims)}, {list(num_heads)}, {list(depths)}, {list(kernels)}, {list(strides)}, "
                f"{list(paddings)}"
            )
        check_positive("backbone", in_chans=in_chans, dims=list(dims), num_heads=list(num_heads),
                       depths=list(depths), kernels=list(kernels), strides=list(strides), mlp_ratio=mlp_ratio,
                       kv_stride=kv_stride)
        if any(p < 0 for p in paddings):
            raise ConfigError(f"backbone.paddings must be >= 0, got {list(paddings)}")
        for i, (dim, heads) in enumerate(zip(dims, num_heads, strict=True)):
            check_heads(f"backbone.dims[{i}]", dim, f"backbone.num_heads[{i}]", heads)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"backbone.drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.dims = tuple(dims)
        self.strides = tuple(strides)
        self.embed_dim = self.num_features = dims[-1]
        self.num_prefix_tokens = 0  # no class token: every output token is a patch token (timm's attribute)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # numbers, also under meta
        self.stages = nn.ModuleList()
        start, prev = 0, in_chans
        for i, dim in enumerate(dims):
            self.stages.append(CvTStage(prev, dim, depths[i], num_heads[i], kernels[i], strides[i],
                                        paddings[i], mlp_ratio, kv_stride, dpr[start:start + depths[i]]))
            start, prev = start + depths[i], dim
        self.norm = layer_norm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(trunc_normal_init)

    def forward_stages(
        self, x: torch.Tensor, visible: torch.Tensor | None = None, update_mask: str = "pre_norm",
        sparse: bool = False, propagate: str = "window",
    ) -> list[torch.Tensor]:
        """Every stage's output map.

        Args:
            x: Images ``[N, C, H, W]``.
            visible: Optional pixel mask ``[N, 1, H, W]``, 1 = visible (float, any dtype).
            update_mask: One of :data:`UPDATE_MASKS`: ``none`` encodes ``x * visible`` as a plain
                CvT (no mask propagation, no per-stage zeroing, the ablation's control);
                ``pre_norm``, ``post_norm`` or ``mask_only`` propagate the mask through every
                stage's embedding and re-weight there as
                :class:`~mimkit.backbones.layers.partial_conv.ConvEmbed` describes.
            sparse: With ``visible`` and a propagated mask: every stage's blocks compute only the
                tokens whose embedding window held visible input, and the convolutions read the
                others as empty (:mod:`mimkit.backbones.layers.sparse`); those tokens are zero in
                the returned maps (the last one then goes through the final norm, as every map
                does). The cost then follows the hidden share of each stage.
            propagate: Which tokens of a stage are visible: ``window`` (the partial convolution's
                update mask, whose visible region grows at every stage) or ``cell`` (those whose own
                cell holds visible input: a hole of the last stage's grid stays a hole), see
                :data:`~mimkit.backbones.layers.partial_conv.PROPAGATIONS`.

        Returns:
            ``[N, D_i, H_i, W_i]`` for each stage ``i``; the last one passed through the final norm, so
            the decoder and the evaluation see the same features.

        """
        if update_mask not in UPDATE_MASKS:
            raise ConfigError(f"update_mask must be one of {', '.join(UPDATE_MASKS)}, got {update_mask!r}")
        if update_mask == "none" and visible is not None:
            if sparse:
                raise ConfigError("the sparse mode computes where the propagated mask is visible; it needs "
                                  f"update_mask in {', '.join(REWEIGHTS)}, got 'none'")
            x, visible = x * visible.to(x.dtype), None
        maps = []
        for stage in self.stages:
            x, visible = stage(x, visible, update_mask if visible is not None else "pre_norm", sparse, propagate)
            maps.append(x)
        maps[-1] = self.norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return maps

    def stage_visible(self, visible: torch.Tensor, propagate: str = "window") -> list[torch.Tensor]:
        """Every stage's propagated mask ``[N, 1, H_i, W_i]`` (float32, 1 = visible as ``propagate``
        says) for a pixel mask ``[N, 1, H, W]``: where the sparse mode computes.
        """
        masks = []
        for stage in self.stages:
            embed = stage.embed
            _, visible = update_ratio(visible, embed.kernel, embed.stride, embed.padding, propagate)
            masks.append(visible)
        return masks

    def stage_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """Every stage's token grid for an input of ``height x width`` pixels."""
        grids = []
        for stage in self.stages:
            k, st, pad = stage.embed.kernel, stage.embed.stride, stage.embed.padding
            height, width = (height + 2 * pad - k) // st + 1, (width + 2 * pad - k) // st + 1
            grids.append((height, width))
        return grids

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The last stage's token grid for an input of ``height x width`` pixels (the tokens of
        :meth:`forward_features`, and the grid a :class:`TokenMask` or :class:`MixPairs` is given on).
        """
        return self.stage_grids(height, width)[-1]

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Token width of each stage."""
        return self.dims

    #: Mixing cells may have any size: every convolution reads one image's pixels only.
    mix_unit = 1

    def forward_mixed(self, x: torch.Tensor, mix: MixPairs) -> list[torch.Tensor]:
        """Every stage's map of a two-image mix, the images kept apart (MixMAE on the CvT).

        Liu et al., "MixMAE: Mixed and Masked Autoencoder for Efficient Pretraining of Hierarchical
        Vision Transformers", CVPR 2023, applied to a convolutional transformer: the labels (drawn on
        the last stage's grid) are upsampled to the pixels and to every stage, each embedding is a
        partial convolution per label (:meth:`ConvEmbed.forward_mixed`), and each attention computes
        its depthwise q/k/v projections per label and attends within the label. In training mode
        the BatchNorm of those projections still pools statistics over the batch, as it does for any
        batch; in evaluation mode a token's output depends on its own image alone (tested).

        Args:
            x: The mixed images ``[N, C, H, W]`` (:func:`~mimkit.masking.mixing.mix_pairs` with the
                labels upsampled to the pixels).
            mix: Labels on the last stage's grid, the mix embedding, the update-mask placement.

        Returns:
            ``[N, D_i, H_i, W_i]`` per stage, the last through the final norm.

        """
        if mix.update_mask not in REWEIGHTS:
            raise ConfigError(f"a mixed input needs update_mask in {', '.join(REWEIGHTS)} (each image's pixels "
                              f"masked for the other), got {mix.update_mask!r}")
        labels = mix.stage_labels(tuple(x.shape[-2:]))
        maps = []
        for s, (stage, grid) in enumerate(zip(self.stages, self.stage_grids(*x.shape[-2:]), strict=True)):
            out_labels = mix.stage_labels(grid)
            x = stage.forward_mixed(x, labels, out_labels, mix.update_mask,
                                    None if mix.embeds is None else mix.embeds[s])
            maps.append(x)
            labels = out_labels
        maps[-1] = self.norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return maps

    def forward_features(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Normalised last-stage tokens ``[N, H_last * W_last, D]`` of images ``[N, C, H, W]``.

        Args:
            x: Images.
            mask: Optional :class:`PixelMask`, or a :class:`TokenMask` ``[N, H_last * W_last]`` on
                the last stage's grid, whose tokens' pixels are hidden (nearest-neighbour upsampling)
                and propagated with the ``pre_norm`` update mask; its ``token`` is not used.

        """
        check_mask(self, mask)
        if isinstance(mask, MixPairs):
            return self.forward_mixed(x, mask)[-1].flatten(2).transpose(1, 2)
        if isinstance(mask, TokenMask):
            mask = PixelMask(token_mask_to_pixels(mask.mask.view(-1, *self.grid_size(*x.shape[-2:])),
                                                  *x.shape[-2:]).to(x.dtype))
        visible, update = (mask.visible, mask.update_mask) if isinstance(mask, PixelMask) else (None, "pre_norm")
        return self.forward_stages(x, visible, update)[-1].flatten(2).transpose(1, 2)

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

        The intermediates are stages, as for timm's hierarchical backbones: each stage starts with a
        convolutional embedding that changes the width and the resolution, so the stage ends are the
        feature pyramid (the maps :meth:`forward_stages` gives the U-Net decoder).
        :meth:`forward_last_blocks` gives the last stage's blocks one by one.

        The arguments and the return value are timm's (:mod:`mimkit.backbones.layers.intermediates`).

        Raises:
            ValueError: ``indices`` outside the stages, or an unknown ``output_fmt``.

        """
        take, run = plan_intermediates(len(self.stages), indices, "stage", output_fmt, stop_early, intermediates_only)
        last = len(self.stages) - 1
        outs = []
        for i, stage in enumerate(self.stages[:run]):
            x, _ = stage(x)
            if i in take:
                y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if norm and i == last else x
                outs.append(y.contiguous() if output_fmt == "NCHW" else y.flatten(2).transpose(1, 2))
        if intermediates_only:
            return outs
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).flatten(2).transpose(1, 2), outs

    def forward_last_blocks(self, x: torch.Tensor, indices: int = 1) -> list[torch.Tensor]:
        """The last ``indices`` blocks of the last stage, through the final norm, each ``[N, L_last, D]``
        like :meth:`forward_features`' output (:mod:`mimkit.backbones.layers.intermediates`).
        """
        last = self.stages[-1]
        if not 1 <= indices <= len(last.blocks):
            raise ValueError(f"indices must be in [1, {len(last.blocks)}] (the last stage's depth), got {indices}")
        for stage in self.stages[:-1]:
            x, _ = stage(x)
        x, _ = last.embed(x)
        _, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        outs = []
        for i, block in enumerate(last.blocks):
            tokens = block(tokens, h, w)
            if i >= len(last.blocks) - indices:
                outs.append(self.norm(tokens))
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
        """No extra exemptions: there is no position embedding or class token."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Regexes grouping parameters by depth, as timm uses for layer-wise lr decay."""
        return {
            "stem": r"^stages\.0\.embed",
            "blocks": r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)\.embed", None),
                (r"^norm", (99999,)),
            ],
        }


CVT_PRESETS: dict[str, dict[str, object]] = {
    # Small-image presets (28-64 px inputs); _s2: every stage halves the map, 28 px -> 14, 7, 4.
    "cvt_micro_s2": dict(dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 1, 2), kernels=(3, 3, 3),
                         strides=(2, 2, 2), paddings=(1, 1, 1), img_size=28),
    "cvt_tiny_s2": dict(dims=(32, 96, 192), num_heads=(1, 2, 3), depths=(1, 2, 4), kernels=(3, 3, 3),
                        strides=(2, 2, 2), paddings=(1, 1, 1), img_size=28),
    # CvT-13's 7x7/4 first embedding on a small image (28 px -> 7, 4, 2): a quarter of cvt_tiny_s2's
    # stage-1 tokens, so it trains much faster on a CPU (BENCHMARKS.md, sections 6, 8 and 9).
    "cvt_tiny_s4": dict(dims=(32, 96, 192), num_heads=(1, 2, 3), depths=(1, 2, 4), kernels=(7, 3, 3),
                        strides=(4, 2, 2), paddings=(2, 1, 1), img_size=28),
    "cvt_small_s2": dict(dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 2, 6), kernels=(3, 3, 3),
                         strides=(2, 2, 2), paddings=(1, 1, 1), img_size=64),
    # The published ImageNet models.
    "cvt_13": dict(dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 2, 10), kernels=(7, 3, 3),
                   strides=(4, 2, 2), paddings=(2, 1, 1), img_size=224),
    "cvt_21": dict(dims=(64, 192, 384), num_heads=(1, 3, 6), depths=(1, 4, 16), kernels=(7, 3, 3),
                   strides=(4, 2, 2), paddings=(2, 1, 1), img_size=224),
}
