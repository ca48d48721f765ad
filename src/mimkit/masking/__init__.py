"""Masking strategies as pure functions, each tested on its own, and the typed kinds of mask a backbone takes."""

from mimkit.masking.block import block_masking
from mimkit.masking.kinds import MASK_KINDS, KeepTokens, Mask, PixelMask, TokenMask, check_mask, token_mask_to_pixels
from mimkit.masking.pixel import pixel_block_mask
from mimkit.masking.random import ShuffleMask, num_kept, random_masking

__all__ = ["MASK_KINDS", "KeepTokens", "Mask", "PixelMask", "ShuffleMask", "TokenMask", "block_masking", "check_mask",
           "num_kept", "pixel_block_mask", "random_masking", "token_mask_to_pixels"]
