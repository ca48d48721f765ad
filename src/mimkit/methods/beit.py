"""BEiT: the masked patches' visual tokens predicted from the rest of the image.

Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022 (microsoft/unilm's ``beit``).
A frozen tokenizer gives every patch of the whole image a code; the encoder sees the image with
BEiT's block masks (about 40 % of the patches, each masked embedding replaced by a learned mask
token on the ViT, its pixels hidden on the CvT), and a linear head over the vocabulary predicts the
codes of the masked patches with a cross-entropy. There is no teacher to move: the tokenizer is
another run (``method.tokenizer``: a :class:`~mimkit.methods.vqvae.VQTokenizer` run, pixels for
BEiT's dVAE, a teacher's features for BEiT v2's VQ-KD), a frozen helper
(:mod:`mimkit.methods.helpers`) saved with the method.

Its grid must be the encoder's: on the ViT, a tokenizer whose grid is the patch grid; on the CvT,
whose masks are drawn on its last stage's grid (as data2vec's are), a tokenizer with that grid. BEiT
names no CvT; this is mimkit's reading of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.masking import TokenMask, block_masks
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.helpers import build_helper, freeze, load_helper_weights
from mimkit.methods.vqvae import VQTokenizer, grid_of
from mimkit.schema import require


class BEiT(PretrainMethod):
    """Encoder on block-masked images + a linear head over a frozen tokenizer's vocabulary.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> def vit():
        ...     return create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
        >>> tokenizer = VQTokenizer(vit(), VQTokenizer.Config(num_codes=16, code_dim=8, decoder_dim=16))
        >>> beit = BEiT(vit(), BEiT.Config(), tokenizer=tokenizer)
        >>> out = beit(torch.randn(2, 1, 28, 28))
        >>> out.loss.ndim, out.mask.shape, "mlm_acc" in out.logs
        (0, torch.Size([2, 49]), True)

    """

    @dataclass
    class Config(MethodConfig):
        """BEiT's settings (``method:`` in a config); the defaults are for 28-32 px images on a CPU."""

        tokenizer: str = ""
        """The tokenizer run folder (a ``vqvae`` run)."""
        tokenizer_settings: dict[str, Any] = field(default_factory=dict)
        """The tokenizer run's settings, copied from it when the settings are composed (do not write them)."""
        mask_ratio: float = 0.4
        """Fraction of the patches masked in blocks (BEiT: 75 of 196)."""
        mask_min_block: int = 4
        """Smallest block in patches: BEiT's 16 is a twelfth of its 14 x 14 grid, 4 about that of a 7 x 7
        one (a block of 16 there is a third of the grid)."""
        mask_max_aspect: float = 1 / 0.3

        #: Helper runs and where their settings are recorded (:mod:`mimkit.methods.helpers`).
        helpers: ClassVar[dict[str, str]] = {"tokenizer": "tokenizer_settings"}

        def __post_init__(self) -> None:
            super().__post_init__()
            require(0.0 < self.mask_ratio < 1.0, "method.mask_ratio", "in (0, 1)", self.mask_ratio)
            require(self.mask_min_block >= 1, "method.mask_min_block", ">= 1", self.mask_min_block)
            require(self.mask_max_aspect >= 1.0, "method.mask_max_aspect", ">= 1", self.mask_max_aspect)

    mask_kind = "token_mask"

    def __init__(self, encoder: nn.Module, cfg: Config, tokenizer: VQTokenizer | None = None) -> None:
        """The ``encoder``, a learned mask token where the backbone takes one, the head over the
        vocabulary, and the frozen tokenizer (built from its recorded settings, or given).
        """
        super().__init__()
        self.check_encoder(encoder)
        self.cfg = cfg
        self.encoder = encoder
        if tokenizer is None:
            if not cfg.tokenizer_settings:
                raise ConfigError("method.tokenizer: name the tokenizer run whose codes BEiT predicts (train one "
                                  "first: mimkit pretrain --config vqvae_fmnist)")
            tokenizer = build_helper(cfg.tokenizer_settings, "method.tokenizer_settings")
        if not isinstance(tokenizer, VQTokenizer):
            raise ConfigError(f"method.tokenizer: a {type(tokenizer).__name__} run is no tokenizer; name a run of "
                              "method vqvae")
        self.tokenizer = freeze(tokenizer)
        self.mask_token = None
        if getattr(encoder, "uses_mask_token", False):
            self.mask_token = nn.Parameter(torch.zeros(encoder.num_features))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.num_features, tokenizer.cfg.num_codes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse an image on which the tokenizer's grid is not the encoder's."""
        own, theirs = grid_of(self.encoder, height, width), grid_of(self.tokenizer.encoder, height, width)
        if own != theirs:
            raise ConfigError(f"method.tokenizer: on {height} x {width} images the tokenizer gives a {theirs[0]} x "
                              f"{theirs[1]} grid of codes and the encoder a {own[0]} x {own[1]} grid of tokens; "
                              "train a tokenizer whose backbone has the encoder's grid")
        self.tokenizer.check_image_size(height, width)

    def train(self, mode: bool = True) -> BEiT:
        """Train mode for everything but the tokenizer, which stays in evaluation mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    def load_helpers(self) -> None:
        """A fresh run's start: the tokenizer's weights from its run."""
        c = self.cfg
        load_helper_weights(self.tokenizer, c.tokenizer, c.tokenizer_settings, "method.tokenizer")

    def draw_masks(self, n: int, height: int, width: int) -> torch.Tensor:
        """``[n, height * width]`` bool BEiT block masks at ``mask_ratio``, from the global RNG."""
        c = self.cfg
        return block_masks(n, height, width, c.mask_ratio, min_block=c.mask_min_block, max_aspect=c.mask_max_aspect)

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Cross-entropy of the head's predictions at the masked patches against the tokenizer's codes."""
        images = Batch.of(batch).images
        n = images.shape[0]
        codes = self.tokenizer.tokenize(images)  # [N, L], of the whole image
        masks = self.draw_masks(n, *grid_of(self.encoder, *images.shape[-2:])).to(images.device)  # [N, L]
        tokens = self.encoder.forward_features(images, TokenMask(masks, self.mask_token))
        logits = self.head(tokens[:, self.encoder.num_prefix_tokens:][masks]).float()  # [M, K]
        target = codes[masks]  # [M]
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = float((logits.argmax(-1) == target).float().mean())
            # what always answering the batch's most frequent code would score: the floor of mlm_acc
            prior = float(torch.bincount(target, minlength=logits.shape[-1]).max() / max(1, target.numel()))
        logs = {"mlm_acc": acc, "majority_acc": prior, "masked": float(masks.float().mean())}
        return PretrainOutput(loss, logs, None, masks.float())


__all__ = ["BEiT"]
