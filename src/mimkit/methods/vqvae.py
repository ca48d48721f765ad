"""Visual tokenizers that mimkit trains itself: an image to one discrete code per patch.

BEiT predicts, at its masked patches, the codes a tokenizer gives the whole image (Bao et al., "BEiT:
BERT Pre-Training of Image Transformers", ICLR 2022, with DALL-E's dVAE). Here the tokenizer is a run
of its own on the same unlabelled images: the config's backbone encodes the image to its token grid
(so the grid is the BEiT backbone's patch grid when the two match), a linear map takes each token to
``code_dim`` features, an :class:`~mimkit.methods.quantizer.EMAQuantizer` replaces it by its nearest
code, and data2vec 2.0's convolutional decoder predicts from the codes

- ``target=pixels``: the patch's pixels, with a squared error (a VQ-VAE: van den Oord et al.,
  "Neural Discrete Representation Learning", NeurIPS 2017);
- ``target=teacher``: a teacher run's features of the patch, with a cosine loss, on a codebook on
  the unit sphere (BEiT v2's VQ-KD: Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized
  Visual Tokenizers", 2022). The teacher is another mimkit run (``method.teacher``: DINO's, data2vec
  2.0's), a frozen helper (:mod:`mimkit.methods.helpers`).

With ``source=patches`` nothing is encoded: the codes are k-means centroids of the image's own patches
(normalised as the method sees them), moved by the same moving average, which is online k-means; only
a decoder of the codes back to pixels trains, for the loss and the pictures, and the backbone is kept
for its grid alone, frozen (the zero-training codebook of Yan et al., "Centroid-centered Modeling for
Efficient Vision Transformer Pre-training", 2023).

The commitment term ``|z - sg(code)|^2`` keeps the encoder near its codes; the codes move by their
moving average after each optimizer step. The log carries the batch's code perplexity and the share
of codes in use, and warns when too few are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimkit.data.batch import Batch
from mimkit.errors import ConfigError
from mimkit.methods.base import MethodConfig, PretrainMethod, PretrainOutput
from mimkit.methods.decoders import ConvDecoder
from mimkit.methods.helpers import build_helper, load_helper_weights
from mimkit.methods.losses import patchify, unpatchify
from mimkit.methods.quantizer import EMAQuantizer
from mimkit.schema import check_positive, require

log = logging.getLogger(__name__)

#: What a tokenizer's decoder predicts from the codes (``method.target``).
TARGETS = ("pixels", "teacher")
#: What is quantised (``method.source``): the encoder's tokens, or the image's patches as they are.
SOURCES = ("encoder", "patches")


def grid_of(encoder: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The token grid ``encoder`` gives an image of ``height x width`` (its patch grid, or a CvT's last stage)."""
    return tuple(encoder.grid_size(height, width))


def patch_side(encoder: nn.Module) -> int:
    """Pixels along the side of a token's patch: the ViT's patch size, or the side of the image a
    hierarchical encoder is built for over its grid's side.
    """
    size = getattr(encoder, "img_size", None)
    if size is None:
        return encoder.patch_size
    side = size if isinstance(size, int) else size[0]
    return side // grid_of(encoder, side, side)[0]


class VQTokenizer(PretrainMethod):
    """Encoder -> codes -> decoder, trained to predict the image's pixels or a teacher's features.

    Example:
        >>> from mimkit.backbones import create_backbone
        >>> enc = create_backbone("vit_tiny_p4", img_size=28, in_chans=1, embed_dim=32, depth=1, num_heads=2)
        >>> tok = VQTokenizer(enc, VQTokenizer.Config(num_codes=16, code_dim=8, decoder_dim=16))
        >>> out = tok(torch.randn(4, 1, 28, 28))
        >>> out.pred.shape, tok.tokenize(torch.randn(2, 1, 28, 28)).shape
        (torch.Size([4, 49, 16]), torch.Size([2, 49]))

    """

    @dataclass
    class Config(MethodConfig):
        """A tokenizer's settings (``method:`` in a config); the defaults are for 28-32 px images on a CPU."""

        num_codes: int = 512
        """Codebook size K (BEiT's dVAE: 8192 at ImageNet scale)."""
        code_dim: int = 32
        decay: float = 0.99
        """Weight of the old average in each codebook update."""
        commitment: float = 0.25
        """Weight of the commitment term (VQ-VAE: 0.25; VQ-KD: 1)."""
        normalize: bool = False
        """Codes on the unit sphere, nearest by cosine (VQ-KD's codebook)."""
        kmeans_iters: int = 10
        """Lloyd iterations of the k-means start on the first batch (0: random vectors of it)."""
        dead_threshold: float = 1.0
        """A code used less than this many times per step on average restarts at a vector of the step (0: never)."""
        min_usage: float = 0.5
        """The log warns when fewer than this share of the codes is in use."""
        decoder_dim: int = 128
        decoder_depth: int = 3
        decoder_kernel: int = 3
        decoder_groups: int = 16
        source: str = "encoder"
        """``encoder`` (its tokens through a linear map to ``code_dim``) or ``patches`` (the pixels of each
        token's patch: k-means of patches, no encoder trained; ``code_dim`` is then the patch's size)."""
        target: str = "pixels"
        """``pixels`` (a VQ-VAE) or ``teacher`` (VQ-KD: the features of ``method.teacher``)."""
        teacher: str = ""
        """The teacher run folder of ``target=teacher``; its evaluated encoder gives the targets."""
        teacher_settings: dict[str, Any] = field(default_factory=dict)
        """The teacher run's settings, copied from it when the settings are composed (do not write them)."""

        #: Helper runs and where their settings are recorded (:mod:`mimkit.methods.helpers`).
        helpers: ClassVar[dict[str, str]] = {"teacher": "teacher_settings"}

        def __post_init__(self) -> None:
            super().__post_init__()
            check_positive("method", num_codes=self.num_codes, code_dim=self.code_dim, decoder_dim=self.decoder_dim,
                           decoder_kernel=self.decoder_kernel, decoder_groups=self.decoder_groups)
            require(self.target in TARGETS, "method.target", " or ".join(TARGETS), self.target)
            require(self.source in SOURCES, "method.source", " or ".join(SOURCES), self.source)
            require(0.0 <= self.decay < 1.0, "method.decay", "in [0, 1)", self.decay)
            require(self.decoder_kernel % 2 == 1, "method.decoder_kernel", "odd", self.decoder_kernel)
            for key in ("commitment", "dead_threshold", "kmeans_iters", "decoder_depth"):
                require(getattr(self, key) >= 0, f"method.{key}", ">= 0", getattr(self, key))
            require(0.0 <= self.min_usage <= 1.0, "method.min_usage", "in [0, 1]", self.min_usage)
            if self.target == "teacher" and not (self.teacher or self.teacher_settings):
                raise ConfigError("method.target=teacher needs method.teacher: the folder of a run whose encoder "
                                  "gives the targets (a DINO or data2vec 2.0 run)")

    mask_kind = None

    def __init__(self, encoder: nn.Module, cfg: Config) -> None:
        """The ``encoder``, its projection to codes, the quantiser, the decoder and, for VQ-KD, the teacher."""
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.teacher: nn.Module | None = None
        self.patch = patch_side(encoder)
        pixels = encoder.in_chans * self.patch**2  # a token's patch of pixels
        if cfg.target == "teacher":
            if not cfg.teacher_settings:
                raise ConfigError("method.teacher_settings: empty; they are read from method.teacher's run when the "
                                  "settings are composed (mimkit.load_config), not written by hand")
            # Only the teacher's evaluated encoder gives targets: its heads and its own teacher stay out.
            helper = build_helper(cfg.teacher_settings, "method.teacher_settings")
            self._teacher_prefix = f"{helper.eval_module_name}."
            self.teacher = helper.eval_module
            out_dim = self.teacher.num_features
        else:
            out_dim = pixels
        code_dim = cfg.code_dim
        self.to_code: nn.Module | None = None
        if cfg.source == "patches":  # the encoder gives the grid and nothing else: it never trains
            encoder.requires_grad_(False)
            code_dim = pixels
        else:
            self.to_code = nn.Linear(encoder.num_features, code_dim)
        self.quantizer = EMAQuantizer(cfg.num_codes, code_dim, cfg.decay, normalize=cfg.normalize,
                                      kmeans_iters=cfg.kmeans_iters, dead_threshold=cfg.dead_threshold)
        self.decoder = ConvDecoder(code_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_kernel,
                                   cfg.decoder_groups, out_dim=out_dim)

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse an image that the encoder's token grid does not cut into its patches exactly."""
        (gh, gw), p = grid_of(self.encoder, height, width), self.patch
        if (gh * p, gw * p) != (height, width):
            raise ConfigError(f"method {self.cfg.name or 'vqvae'}: a {height} x {width} image gives the encoder a "
                              f"{gh} x {gw} token grid, which does not cut it into {p} px patches; use "
                              f"{gh * p} x {gw * p} or a backbone whose grid divides the image")
        if self.teacher is not None:
            theirs = grid_of(self.teacher, height, width)
            if theirs != (gh, gw):
                raise ConfigError(f"method.teacher: on {height} x {width} images the teacher gives a {theirs[0]} x "
                                  f"{theirs[1]} grid of features and the tokenizer a {gh} x {gw} grid of codes; give "
                                  "the tokenizer a backbone with the teacher's grid")

    def train(self, mode: bool = True) -> VQTokenizer:
        """Train mode for everything but the teacher (and an encoder that only gives the grid), which
        stay in evaluation mode.
        """
        super().train(mode)
        for frozen in (self.teacher, self.encoder if self.to_code is None else None):
            if frozen is not None:
                frozen.eval()
        return self

    def load_helpers(self) -> None:
        """A fresh run's start: the teacher's weights from its run."""
        if self.teacher is not None:
            c = self.cfg
            ckpt = load_helper_weights(self.teacher, c.teacher, c.teacher_settings, "method.teacher",
                                       self._teacher_prefix)
            log.info("teacher loaded from %s", ckpt)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """What is quantised, ``[N, L, code_dim]``: the encoder's tokens mapped to codes, or the patches."""
        if self.to_code is None:
            return patchify(images.float(), self.patch)
        tokens = self.encoder.forward_features(images)
        return self.to_code(tokens[:, self.encoder.num_prefix_tokens:])

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """The codes ``[N, L]`` (int64) of ``images [N, C, H, W]``; the codebook is left as it is."""
        z = self.encode(images)
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(z).codes
        finally:
            self.quantizer.train(was)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: patch pixels ``[N, L, p*p*C]`` or the teacher's tokens ``[N, L, D_t]``."""
        if self.teacher is None:
            return patchify(images.float(), self.patch)
        return self.teacher.forward_features(images)[:, self.teacher.num_prefix_tokens:].float()

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:
        """Reconstruction loss of the decoded codes, plus the commitment term."""
        images = Batch.of(batch).images
        grid = grid_of(self.encoder, *images.shape[-2:])
        q = self.quantizer(self.encode(images))  # codes with straight-through gradients, [N, L, C] float32
        pred = self.decoder(q.vectors, grid).float()  # [N, L, out]
        target = self.targets(images)
        if target.shape != pred.shape:
            raise ConfigError(f"the tokenizer predicts {tuple(pred.shape)} where its target is "
                              f"{tuple(target.shape)}: the teacher's token grid must be the encoder's {grid}")
        if self.teacher is None:
            rec = F.mse_loss(pred, target)
        else:
            rec = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        loss = rec + self.cfg.commitment * q.commitment
        logs = {"loss_rec": float(rec.detach()), "commitment": float(q.commitment.detach()),
                "perplexity": q.perplexity, "usage": self.quantizer.usage()}
        return PretrainOutput(loss, logs, pred.detach() if self.teacher is None else None, None)

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the codebook by the step's averages; warn when too few codes are in use."""
        self.quantizer.update()
        every = max(1, min(200, total_steps // 10))
        usage = self.quantizer.usage()
        main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        if main and (step + 1) % every == 0 and usage < self.cfg.min_usage:
            log.warning("step %d: codebook collapse: %.0f%% of the %d codes in use (< method.min_usage %.0f%%); "
                        "raise method.dead_threshold, or lower method.num_codes or optim.base_lr",
                        step + 1, 100 * usage, self.cfg.num_codes, 100 * self.cfg.min_usage)

    def discard_step(self) -> None:
        """Drop the skipped step's codebook sums."""
        self.quantizer.discard()

    @property
    def reconstructs_pixels(self) -> bool:
        """A pixel tokenizer decodes pixels; VQ-KD decodes a teacher's features."""
        return self.teacher is None

    def reconstruct(self, images: torch.Tensor, out: PretrainOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded pixels of a pixel tokenizer, and an empty mask (nothing is hidden)."""
        if out.pred is None:
            raise NotImplementedError("a VQ-KD tokenizer predicts a teacher's features, not pixels")
        grid = grid_of(self.encoder, *images.shape[-2:])
        rec = unpatchify(out.pred, self.patch, images.shape[1], grid)
        return rec.to(images.dtype), torch.zeros_like(images[:, :1])


__all__ = ["SOURCES", "TARGETS", "VQTokenizer", "grid_of", "patch_side"]
