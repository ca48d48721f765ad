"""Masking strategies as pure functions, each tested on its own."""

from mimkit.masking.block import block_masking
from mimkit.masking.pixel import pixel_block_mask
from mimkit.masking.random import TokenMask, num_kept, random_masking

__all__ = ["TokenMask", "block_masking", "num_kept", "pixel_block_mask", "random_masking"]
