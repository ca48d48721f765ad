"""The one contract between a pre-training method and the training engine.

The engine calls ``method(batch)`` with a :class:`~mimkit.data.Batch` (images, and labels where the
dataset has them) and reads ``out.loss`` (and ``out.logs`` for logging). It never runs a method's
backward, never passes it method settings, never computes its schedules and never reaches into its
submodules. The hooks are optional: :meth:`PretrainMethod.after_step` once per optimizer step with
the step and the current schedule length, :meth:`PretrainMethod.param_groups` for the optimizer
(a group may carry ``lr_scale`` and ``weight_decay_end``, which the engine applies), and
:attr:`PretrainMethod.eval_module_name`, the module evaluation reads through the backbone interface.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from mimkit.data.batch import Batch
from mimkit.data.views import ViewSpec, expand_views, parse_views
from mimkit.errors import ConfigError
from mimkit.masking.kinds import as_kinds


@dataclass
class MethodConfig:
    """The settings every method has; a method's ``Config`` extends it (``method:`` in a config).

    Attributes:
        name: The method's name in the registry (``mimkit.methods.METHODS``); set when a config is read.
        views: The augmented views of each training image, one dict per kind of view with the
            fields of :class:`~mimkit.data.views.ViewSpec` (``count`` views of each); the data
            pipeline builds them. One view by default: a random resized crop and a flip.

    """

    name: str = ""
    views: list[dict[str, Any]] = field(default_factory=lambda: [{}])

    #: How many views the method trains on (None: any number).
    num_views: ClassVar[int | None] = 1

    def __post_init__(self) -> None:
        specs = parse_views(self.views)
        n = len(expand_views(specs))
        if self.num_views is not None and n != self.num_views:
            raise ConfigError(f"method.views: this method trains on {self.num_views} view(s) of each image, "
                              f"method.views declares {n}")
        if n == 0:
            raise ConfigError("method.views: at least one view is needed, got an empty list")

    @property
    def view_specs(self) -> list[ViewSpec]:
        """The views as :class:`~mimkit.data.views.ViewSpec`, one per kind (``count`` not expanded)."""
        return parse_views(self.views)


@dataclass
class PretrainOutput:
    """What a method's forward returns.

    Attributes:
        loss: Scalar training loss.
        logs: Extra scalars to log (detached floats or 0-d tensors).
        pred: The method's prediction, e.g. ``[N, L, p*p*C]`` patch pixels for MAE.
        mask: The mask the prediction was made under, e.g. ``[N, L]`` with 1 = masked.
        inputs: What the encoder was shown when it is not the masked image (MixMAE's mixed pairs),
            ``[N, C, H, W]`` in the normalised input space; None otherwise.

    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    inputs: torch.Tensor | None = None


class PretrainMethod(nn.Module):
    """Base of every method: an ``encoder`` plus whatever the method needs to train it.

    A method defines a nested ``Config`` dataclass with its settings; ``METHODS[name](encoder,
    cfg)`` builds it. Subclasses implement :meth:`forward` and, for visualisation,
    :meth:`reconstruct`.
    """

    encoder: nn.Module
    #: The kind of mask the method hands its encoder (one of :data:`~mimkit.masking.MASK_KINDS`:
    #: ``keep_idx`` drops tokens, ``token_mask`` replaces them by a learned token, ``pixels`` is a
    #: dense visible-pixel mask); None for a method that masks nothing and takes any backbone; a
    #: tuple for a method that can hand several, in its order of preference (:meth:`pick_mask_kind`).
    #: Backbones list the kinds they take in ``mask_kinds``.
    mask_kind: str | tuple[str, ...] | None = "keep_idx"
    #: Every training batch must hold a multiple of this many images (images mixed in pairs or groups).
    batch_multiple: int = 1

    def check_encoder(self, encoder: nn.Module) -> None:
        """Refuse an encoder that cannot take this method's kind of mask, naming the ones that can."""
        if self.mask_kind is not None:
            self.pick_mask_kind(encoder)

    def pick_mask_kind(self, encoder: nn.Module) -> str:
        """The first of the method's mask kinds that ``encoder`` takes.

        Raises:
            ConfigError: The encoder takes none of them; the message lists the backbones that do.

        """
        kinds = getattr(encoder, "mask_kinds", frozenset())
        wanted = as_kinds(self.mask_kind) or ()
        for kind in wanted:
            if kind in kinds:
                return kind
        from mimkit.backbones import backbones_taking

        raise ConfigError(
            f"{type(self).__name__} needs a backbone taking {' or '.join(map(repr, wanted))} masks; "
            f"{type(encoder).__name__} takes {', '.join(sorted(kinds)) or 'none'}. Valid backbones: "
            f"{', '.join(backbones_taking(self.mask_kind))}"
        )

    @property
    def views(self) -> list[ViewSpec]:
        """The views the loader must build for this method (a single default view without a config)."""
        cfg = getattr(self, "cfg", None)
        return cfg.view_specs if isinstance(cfg, MethodConfig) else [ViewSpec()]

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse (with a :class:`ConfigError`) training images this method cannot mask; all sizes by default."""

    def forward(self, batch: Batch | torch.Tensor) -> PretrainOutput:  # pragma: no cover - abstract
        """Compute the pre-training loss on a :class:`~mimkit.data.Batch` (or bare images ``[N, C, H, W]``)."""
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Per-optimizer-step hook (an EMA teacher, a centre, a schedule); a no-op by default.

        Args:
            step: The optimizer step just taken, counting from 0.
            total_steps: The schedule's current length; under ``train.budget_minutes`` it is
                re-estimated as the run goes, so schedules should be functions of ``step / total_steps``.

        """

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook between backward and the optimizer (gradients all-reduced, not yet clipped); a no-op by default.

        A method may set gradients to None here to keep parameters out of this step entirely (DINO's
        frozen last layer): AdamW then neither moves them nor decays them nor counts the step.
        """

    def discard_step(self) -> None:
        """Hook for a step the engine skipped (a non-finite loss or gradient): drop what the step's
        forward passes left pending (a teacher centre's sums); a no-op by default.
        """

    def load_helpers(self) -> None:
        """Hook at the start of a fresh run (not a continuation): read the weights of the frozen
        helpers the method names from their runs (:mod:`mimkit.methods.helpers`); a no-op by default.
        """

    def encoder_loaded(self) -> None:
        """Hook after the engine loaded pre-trained weights into ``encoder`` (``init``); a no-op by
        default. A teacher-student method copies the student into its teacher here.
        """

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` of :meth:`upgrade_state_dict`'s keys, so that old checkpoints load."""
        return super().load_state_dict(self.upgrade_state_dict(state_dict), strict=strict, assign=assign)

    def upgrade_state_dict(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        """``weights`` (tensors, or their shapes) of an older checkpoint under today's names.

        A submodule with an ``upgrade_keys(state_dict, prefix)`` static method says how its keys were
        named before; every path that reads a checkpoint (resume, evaluation, export, ``visualize``)
        goes through this, so old runs keep working. A state dict's ``_metadata`` is kept.
        """
        metadata = getattr(weights, "_metadata", None)
        weights = OrderedDict(weights)
        if metadata is not None:
            weights._metadata = metadata  # type: ignore[attr-defined]
        for name, module in self.named_modules():
            if name and hasattr(module, "upgrade_keys"):
                module.upgrade_keys(weights, f"{name}.")
        return weights

    #: The attribute evaluation and export read (a backbone): the encoder, or a teacher's for DINO.
    eval_module_name: str = "encoder"

    @property
    def eval_module(self) -> nn.Module:
        """The module kNN, the linear probe, fine-tuning and export use."""
        return getattr(self, self.eval_module_name)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: timm's split, no decay on 1-D parameters and biases.

        The encoder's ``no_weight_decay()`` names are exempted too. A method may return its own
        groups; each may carry ``lr_scale`` (multiplies the scheduled lr: layer-wise decay, a
        frozen part at 0) and ``weight_decay_end`` (the engine moves the group's weight decay from
        its ``weight_decay`` to this value on a cosine over the schedule, as DINO does).

        Args:
            weight_decay: ``optim.weight_decay``.

        """
        # The trained encoder's exemptions: the evaluated module may be a teacher without gradients.
        skip: set[str] = set()
        if hasattr(self.encoder, "no_weight_decay"):
            skip = {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=skip)

    @property
    def reconstructs_pixels(self) -> bool:
        """Whether :meth:`reconstruct` gives pixels (``mimkit visualize`` shows them; else the views)."""
        return type(self).reconstruct is not PretrainMethod.reconstruct

    def reconstruct(
        self, images: torch.Tensor, out: PretrainOutput
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``out.pred``/``out.mask`` back to image space for visualisation.

        Args:
            images: The normalised input ``[N, C, H, W]``.
            out: This method's output on ``images``.

        Returns:
            ``(reconstruction [N, C, H, W], pixel mask [N, 1, H, W] with 1 = masked)``, both in
            the normalised input space.

        """
        raise NotImplementedError(f"{type(self).__name__} has no pixel reconstruction")
