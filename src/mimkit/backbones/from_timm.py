"""Released ViT weights into mimkit's ViT: ``init=timm:NAME``, ``init=local-dir:PATH``, ``init=hf-hub:ID``.

MAE's maintainers advise continuing pre-training from a released encoder rather than from random
weights when data or compute is small (facebookresearch/mae issue 204). timm reads the weights
(its own pretrained tags, a folder in the layout of ``timm.models.save_for_hf`` such as a mimkit
export's ``timm/``, or a Hugging Face hub repository), resampling the position embedding to the
encoder's grid and adapting the first convolution to its channels; this module checks the shapes
against mimkit's :class:`~mimkit.backbones.vit.VisionTransformer` and renames what differs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mimkit.backbones.layers.pos_embed import sincos_2d
from mimkit.backbones.vit import VisionTransformer
from mimkit.errors import ConfigError

log = logging.getLogger(__name__)

#: The prefixes of an ``init`` that names released weights rather than a mimkit run.
TIMM_SOURCES = ("timm:", "local-dir:", "hf-hub:")
#: How far a position embedding may be from the sin-cos one and still be read as it.
SINCOS_TOLERANCE = 1e-4


def is_timm_source(init: str) -> bool:
    """Whether ``init`` names timm or hub weights (``timm:NAME``, ``local-dir:PATH``, ``hf-hub:ID``)."""
    return init.startswith(TIMM_SOURCES)


def _shape(model: nn.Module) -> dict[str, object]:
    """The sizes that must agree between two ViTs for weights to carry over."""
    block = model.blocks[0]
    patch = model.patch_embed.patch_size
    return {"patch": patch[0] if isinstance(patch, (tuple, list)) else patch, "width": model.embed_dim,
            "depth": len(model.blocks), "heads": block.attn.num_heads, "mlp": block.mlp.fc1.out_features}


def create_timm_vit(source: str, encoder: VisionTransformer) -> nn.Module:
    """Timm's pretrained ViT named by ``source``, built for ``encoder``'s input size and channels.

    Raises:
        ConfigError: timm cannot create or load it (no network, a wrong name or folder), in one line.

    """
    import timm

    name = source.removeprefix("timm:")
    size = list(encoder.patch_embed.img_size)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, img_size=size, in_chans=encoder.in_chans)
    except Exception as err:  # timm raises many kinds (download, parse, shape); all mean the same to a user
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"init={source}: timm cannot load it ({type(err).__name__}: {first}); give a timm model "
                          "name with pretrained weights in reach (timm:NAME needs the network or the Hugging Face "
                          "cache), a folder timm saved (local-dir:PATH, e.g. a mimkit export's timm/), or "
                          "hf-hub:ORG/NAME") from None


def timm_vit_state(encoder: VisionTransformer, model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Timm ViT weights renamed and reshaped for ``encoder``: a state dict it loads strictly (head aside).

    timm adds a position embedding ``[1, P + L, D]`` to its ``P`` prefix tokens too; mimkit adds one to
    the patch tokens only, so the class token's share is folded into ``cls_token`` (its sum is all the
    class token ever gets). A learned patch embedding goes to a ``pos_embed="learned"`` encoder; a
    sin-cos encoder takes only one equal to its own at its own grid (a mimkit export's). MAE's released
    weights hold a fixed sin-cos embedding too, but with sines and cosines in another order, so they
    load as a learned one.

    Args:
        encoder: The mimkit ViT to load.
        model: timm's ``VisionTransformer`` (from :func:`create_timm_vit`).
        source: The ``init`` it came from, for messages.

    Raises:
        ConfigError: Not a ViT, other sizes, parts mimkit's ViT has not (register tokens, layer scale,
            a pre-norm, q/k norms), or a learned position embedding for a sin-cos encoder; each named.

    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(model, TimmViT):
        raise ConfigError(f"init={source} is timm's {type(model).__name__}, not a VisionTransformer: only ViT "
                          "weights load into mimkit's ViT")
    theirs, ours = _shape(model), _shape(encoder)
    if theirs != ours:
        show = ", ".join(f"{k} {v}" for k, v in theirs.items())
        raise ConfigError(f"init={source} is a ViT of {show}; the backbone here has "
                          f"{', '.join(f'{k} {v}' for k, v in ours.items())}: choose the backbone of its size "
                          "(e.g. backbone.name=vit_small_patch16 for a ViT-S/16, with backbone.patch_size to match)")
    if getattr(model, "num_reg_tokens", 0):
        raise ConfigError(f"init={source} has {model.num_reg_tokens} register tokens, which mimkit's ViT has not")
    if not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity):
        raise ConfigError(f"init={source} normalises before its blocks (norm_pre), which mimkit's ViT does not")
    state = dict(model.state_dict())
    pos = state.pop("pos_embed", None)
    if pos is None:
        raise ConfigError(f"init={source} has no absolute position embedding (pos_embed), which mimkit's ViT needs")
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = tuple(encoder.patch_embed.grid_size)
    patch_pos = pos[:, prefix:].float()
    if "cls_token" in state and prefix:
        state["cls_token"] = state["cls_token"] + pos[:, :1]
    elif "cls_token" not in state:
        log.warning("init=%s has no class token: the encoder keeps its own (random) one", source)
        state["cls_token"] = encoder.cls_token.detach().clone()
    if "norm.weight" not in state and "fc_norm.weight" in state:
        log.warning("init=%s normalises after pooling (fc_norm): its weights become the final norm, which mimkit "
                    "applies to the tokens before pooling", source)
        state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
    if encoder.pos_embed is not None:
        state["pos_embed"] = patch_pos
    else:
        fixed = sincos_2d(grid[0], grid[1], encoder.embed_dim, torch.device("cpu"))
        gap = float((patch_pos.cpu() - fixed).abs().max())
        if gap > SINCOS_TOLERANCE:
            raise ConfigError(f"init={source} has a learned position embedding (it differs from the fixed sin-cos one "
                              f"by up to {gap:.3g}); set backbone.pos_embed=learned to keep it")
    skip = ("head.", "head_drop.", "fc_norm.")
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    expected = {k for k in encoder.state_dict() if not k.startswith("head.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        scale = "; layer scale (ls1/ls2)" if any(".ls1." in k for k in unexpected) else ""
        raise ConfigError(f"init={source}: its ViT is built otherwise than mimkit's (missing here: "
                          f"{', '.join(missing[:5]) or 'none'}; not in mimkit's ViT: "
                          f"{', '.join(unexpected[:5]) or 'none'}{scale})")
    own = encoder.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ConfigError(f"init={source}: shapes differ from the backbone's ({'; '.join(wrong[:3])})")
    return state


def load_timm_weights(encoder: nn.Module, source: str) -> None:
    """Load the released ViT named by ``source`` into ``encoder`` (a mimkit ViT), head aside.

    Raises:
        ConfigError: ``encoder`` is not a ViT, or the weights cannot be loaded or do not fit
            (:func:`create_timm_vit`, :func:`timm_vit_state`).

    """
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"init={source} loads timm or hub ViT weights; this backbone is a "
                          f"{type(encoder).__name__}: use a ViT backbone (vit_*), or a mimkit run as init")
    state = timm_vit_state(encoder, create_timm_vit(source, encoder), source)
    with torch.no_grad():
        encoder.load_state_dict({k: v.to(encoder.cls_token.dtype) for k, v in state.items()}, strict=False)
    log.info("initialised the encoder from %s (%d tensors)", source, len(state))


__all__ = ["TIMM_SOURCES", "create_timm_vit", "is_timm_source", "load_timm_weights", "timm_vit_state"]
