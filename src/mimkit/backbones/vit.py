"""Vision Transformer encoder with the timm backbone interface, MAE-style token dropping and a mask-token path.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; the fixed sin-cos position
embedding and initialisation follow He et al., "Masked Autoencoders Are Scalable Vision
Learners", CVPR 2022. A learned position embedding (``pos_embed="learned"``) takes the weights of
ViTs that learned one (DINO's, timm's supervised ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.backbones.layers.cpu_kernels import attention_kernel
from mimkit.backbones.layers.homologous_attention import homologous_block
from mimkit.backbones.layers.intermediates import plan_intermediates
from mimkit.backbones.layers.norm import layer_norm
from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.errors import ConfigError
from mimkit.masking.kinds import KeepTokens, Mask, MixGroups, TokenMask, check_mask
from mimkit.masking.mixing import mix_groups
from mimkit.schema import check_heads, check_positive

#: An intermediate of :meth:`VisionTransformer.forward_intermediates`: patch tokens, or with
#: ``return_prefix_tokens`` the pair ``(patch tokens, prefix tokens)``.
Intermediate = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class VisionTransformer(nn.Module):
    """A plain ViT whose ``forward_features`` can run on a subset of patch tokens or with masked tokens replaced.

    Example:
        >>> vit = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=64,
        ...                         depth=2, num_heads=2)
        >>> tokens = vit.forward_features(torch.randn(2, 1, 28, 28))  # [2, 1 + 49, 64]
        >>> vit.forward_head(tokens, pre_logits=True).shape
        torch.Size([2, 64])

    """

    #: The kinds of mask ``forward_features`` takes (:mod:`mimkit.masking.kinds`).
    mask_kinds = frozenset({"keep_idx", "token_mask", "groups"})
    #: A :class:`TokenMask`'s token replaces the masked patch embeddings (a method owns it).
    uses_mask_token = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        num_classes: int = 0,
        pos_embed: str = "sincos",
    ) -> None:
        """Build the encoder.

        Args:
            img_size: Training resolution (other sizes divisible by the patch work too).
            patch_size: Side of a square patch in pixels.
            in_chans: Input channels.
            embed_dim: Token width D.
            depth: Number of transformer blocks.
            num_heads: Attention heads per block.
            mlp_ratio: MLP hidden width / D.
            qkv_bias: Bias in the q/k/v projection.
            drop_path_rate: Stochastic depth, linearly increasing over the blocks.
            global_pool: ``avg`` (mean of patch tokens) or ``token`` (the class token).
            num_classes: Size of the classification head; 0 = no head.
            pos_embed: ``sincos``, the fixed 2-D sin-cos embedding (MAE's), or ``learned``, a parameter
                ``[1, L, D]`` for the ``img_size`` grid that starts as the sin-cos one and is
                resampled (bicubic) for other grids; the class token has none of its own.

        """
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ConfigError(f"backbone.global_pool must be 'avg' or 'token', got {global_pool!r}")
        if pos_embed not in POS_EMBEDS:
            raise ConfigError(f"backbone.pos_embed must be one of {', '.join(POS_EMBEDS)}, got {pos_embed!r}")
        check_positive("backbone", patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                       num_heads=num_heads, mlp_ratio=mlp_ratio)
        check_heads("backbone.embed_dim", embed_dim, "backbone.num_heads", num_heads)
        if img_size % patch_size:
            raise ConfigError(f"backbone.img_size {img_size} is not divisible by backbone.patch_size {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"backbone.drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            strict_img_size=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed: nn.Parameter | None = None
        if pos_embed == "learned":
            grid = self.patch_embed.grid_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # numbers, also under a meta device
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=layer_norm)
            for i in range(depth)
        ])
        self.norm = layer_norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE initialises the patch projection like a linear layer, not like a conv.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:  # starts as the fixed embedding it stands in for; built here, not cached
            grid = list(self.patch_embed.grid_size)
            with torch.no_grad():
                self.pos_embed.copy_(build_sincos2d_pos_embed(grid, dim=self.embed_dim, device=self.pos_embed.device)
                                     .unsqueeze(0))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an input of ``height x width`` pixels."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input {height}x{width} is not divisible by patch_size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def embed(self, x: torch.Tensor, token_mask: TokenMask | None = None) -> torch.Tensor:
        """Patch tokens with position embedding, no class token.

        Args:
            x: Images ``[N, C, H, W]``.
            token_mask: Optional; its masked patch embeddings are replaced by its token before the
                position embedding is added (BEiT's and iBOT's order).

        Returns:
            Tokens ``[N, L, D]`` with ``L = (H / p) * (W / p)``.

        """
        gh, gw = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)  # [N, L, D]
        if token_mask is not None:
            if token_mask.token is None or token_mask.mask.shape != tokens.shape[:2]:
                raise ValueError(f"a token mask for {gh}x{gw} patches needs mask [N, {gh * gw}] and a token "
                                 f"[{self.embed_dim}], got mask {tuple(token_mask.mask.shape)}")
            hidden = token_mask.mask.bool().unsqueeze(-1)  # [N, L, 1]
            tokens = torch.where(hidden, token_mask.token.to(tokens.dtype).view(1, 1, -1), tokens)
        return tokens + self.positions(gh, gw).to(tokens.dtype)

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """The position embedding ``[1, gh * gw, D]`` of a ``gh x gw`` patch grid.

        An input of another size than the encoder's (DINO's local crops) spans the same positions:
        the sin-cos function is evaluated over the encoder's extent, a learned grid is resampled to it.
        """
        extent = tuple(self.patch_embed.grid_size)
        if self.pos_embed is None:
            return sincos_2d(gh, gw, self.embed_dim, self.cls_token.device, extent)
        if (gh, gw) == extent:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, [gh, gw], list(extent), num_prefix_tokens=0)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # A learned grid saved at another image size (pre-trained at 64 px, used at 224) is resampled
        # to this one, bicubic, as timm resamples its position embeddings on load.
        key = prefix + "pos_embed"
        if self.pos_embed is not None and key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            saved = state_dict[key]
            side = math.isqrt(saved.shape[1])
            if saved.dim() == 3 and side * side == saved.shape[1] and saved.shape[2] == self.embed_dim:
                state_dict[key] = resample_abs_pos_embed(saved.float(), list(self.patch_embed.grid_size),
                                                         [side, side], num_prefix_tokens=0).to(saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward_features(self, x: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """Encode images: all patch tokens, only those a :class:`KeepTokens` keeps (MAE), all of
        them with a :class:`TokenMask`'s replaced by its token, or groups of images mixed into one
        sequence each (:class:`MixGroups`, MixedAE).

        Args:
            x: Images ``[N, C, H, W]``.
            mask: Optional :class:`KeepTokens` (indices ``[N, K]``), :class:`TokenMask` (``[N, L]``)
                or :class:`MixGroups` (``source [N / G, L]``).

        Returns:
            Normalised tokens ``[N, 1 + K, D]`` (class token first; ``K = L`` unless tokens are
            dropped), or ``[N / G, 1 + L, D]`` for mixed groups.

        """
        check_mask(self, mask)
        if isinstance(mask, MixGroups):
            return self._forward_groups(x, mask)
        tokens = self.embed(x, mask if isinstance(mask, TokenMask) else None)  # [N, L, D]
        if isinstance(mask, KeepTokens):
            index = mask.idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.gather(tokens, 1, index)  # [N, K, D]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat([cls, tokens], dim=1)
        with attention_kernel(tokens, tokens.shape[1], tokens.shape[1]):
            return self.norm(self.blocks(tokens))

    def _forward_groups(self, x: torch.Tensor, mix: MixGroups) -> torch.Tensor:
        """MixedAE's encoder: images ``[N, C, H, W]`` to mixed sequences ``[N / G, 1 + L, D]``."""
        tokens = mix_groups(self.embed(x), mix.source)  # [N/G, L, D], positions embedded per image
        if mix.seg_embed is not None:
            tokens = tokens + mix.seg_embed.to(tokens.dtype)[mix.source]
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        k = mix.source.shape[1] * mix.source.shape[0] // x.shape[0] + 1  # L / G tokens per image, and the class
        with attention_kernel(tokens, tokens.shape[1], tokens.shape[1]):
            for i, block in enumerate(self.blocks):
                if i < mix.topk_from:
                    tokens = block(tokens)
                    continue
                tokens, recognition = homologous_block(block, tokens, k, mix.source)
                if mix.stats is not None:
                    mix.stats[i] = recognition
        return self.norm(tokens)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Intermediate] | tuple[torch.Tensor, list[Intermediate]]:
        """Block outputs beside the final features, in timm's ``forward_intermediates`` convention.

        Args:
            x: Images ``[N, C, H, W]``.
            indices: Which blocks: None = all, an int ``n`` = the last ``n``, a sequence = those block
                indices (negative ones count from the end). The outputs come in block order.
            return_prefix_tokens: Return each intermediate as ``(patch tokens, class token [N, 1, D])``.
            norm: Pass the intermediates through the final norm; False gives the raw block outputs.
            stop_early: With ``intermediates_only``, skip the blocks after the deepest one taken
                (without it, every block runs, since the final features need them all).
            output_fmt: ``NCHW`` (patch tokens as maps ``[N, D, H / p, W / p]``) or ``NLC`` (patch
                tokens ``[N, L, D]``); the class token is left out of both unless
                ``return_prefix_tokens``.
            intermediates_only: Return the intermediates alone.

        Returns:
            ``(final, intermediates)``: ``final`` is what :meth:`forward_features` returns for ``x``
            (``[N, 1 + L, D]``, for :meth:`forward_head`); or the intermediates alone.

        Raises:
            ValueError: ``indices`` outside the blocks, or an unknown ``output_fmt``.

        """
        take, run = plan_intermediates(len(self.blocks), indices, "block", output_fmt, stop_early, intermediates_only)
        gh, gw = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        outs = []
        with attention_kernel(tokens, tokens.shape[1], tokens.shape[1]):
            for i, block in enumerate(self.blocks[:run]):
                tokens = block(tokens)
                if i in take:
                    outs.append(self.norm(tokens) if norm else tokens)
        k = self.num_prefix_tokens
        patches = [t[:, k:] for t in outs]
        if output_fmt == "NCHW":
            patches = [t.reshape(t.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        inter = list(zip(patches, [t[:, :k] for t in outs], strict=True)) if return_prefix_tokens else patches
        if intermediates_only:
            return inter
        return self.norm(tokens), inter

    def forward_last_blocks(self, x: torch.Tensor, indices: int = 1) -> list[torch.Tensor]:
        """Outputs of the last ``indices`` blocks, each through the final norm and laid out like
        :meth:`forward_features`' output, so :meth:`forward_head` pools each as it pools the features
        (DINO's evaluation on the last blocks).

        Args:
            x: Images ``[N, C, H, W]``.
            indices: How many of the last blocks.

        Returns:
            ``indices`` tensors ``[N, 1 + L, D]``, shallowest first; the last equals :meth:`forward_features`.

        """
        if not 1 <= indices <= len(self.blocks):
            raise ValueError(f"indices must be in [1, {len(self.blocks)}] (the depth), got {indices}")
        outs = self.forward_intermediates(x, indices, return_prefix_tokens=True, norm=True, output_fmt="NLC",
                                          intermediates_only=True)
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in outs]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens ``[N, 1 + L, D]`` to ``[N, D]`` (``pre_logits``) or to class logits."""
        pooled = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` to logits (or pooled features when there is no head)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay beyond the 1-D rule."""
        return {"cls_token"} if self.pos_embed is None else {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Regexes grouping parameters by depth, as timm uses for layer-wise lr decay."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }


#: The position embeddings a ViT can have (``backbone.pos_embed``).
POS_EMBEDS = ("sincos", "learned")

VIT_PRESETS: dict[str, dict[str, int]] = {
    # Small-image presets (28-64 px inputs).
    "vit_micro_p2": dict(embed_dim=128, depth=4, num_heads=4, patch_size=2, img_size=28),
    "vit_micro_p4": dict(embed_dim=128, depth=4, num_heads=4, patch_size=4, img_size=28),
    "vit_tiny_p2": dict(embed_dim=192, depth=6, num_heads=3, patch_size=2, img_size=28),
    "vit_tiny_p4": dict(embed_dim=192, depth=6, num_heads=3, patch_size=4, img_size=28),
    "vit_small_p4": dict(embed_dim=384, depth=12, num_heads=6, patch_size=4, img_size=32),
    # The standard ImageNet sizes.
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16, img_size=224),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16, img_size=224),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, img_size=224),
}
