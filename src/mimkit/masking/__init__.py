"""Masking strategies as pure functions, each tested on its own, and the typed kinds of mask a backbone takes."""

from mimkit.masking.block import block_masks, inverse_block_masks
from mimkit.masking.kinds import (
    MASK_KINDS,
    KeepTokens,
    Mask,
    MixGroups,
    MixPairs,
    PixelMask,
    TokenMask,
    check_mask,
    token_mask_to_pixels,
)
from mimkit.masking.mixing import (
    GroupMix,
    group_assignment,
    mix_groups,
    mix_pairs,
    pair_mask,
    unmix_groups,
    unmix_pairs,
)
from mimkit.masking.pixel import pixel_block_mask
from mimkit.masking.random import ShuffleMask, num_kept, random_masking

__all__ = [
    "MASK_KINDS", "GroupMix", "KeepTokens", "Mask", "MixGroups", "MixPairs", "PixelMask", "ShuffleMask", "TokenMask",
    "block_masks", "check_mask", "group_assignment", "inverse_block_masks", "mix_groups",
    "mix_pairs", "num_kept", "pair_mask", "pixel_block_mask", "random_masking", "token_mask_to_pixels",
    "unmix_groups", "unmix_pairs",
]
