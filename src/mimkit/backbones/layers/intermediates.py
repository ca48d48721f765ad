"""timm's ``forward_intermediates`` convention, read the same way on every backbone.

``forward_intermediates(x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
intermediates_only=False)`` returns ``(final, intermediates)``, or the intermediates alone:

* ``final`` is what ``forward_features(x)`` returns, for ``forward_head``;
* ``indices``: None = all blocks (the ViT) or stages (the hierarchical CvT and Swin), an int ``n``
  = the last ``n``, a sequence = those positions, negative ones counting from the end; the
  outputs come in depth order;
* ``norm`` passes the intermediates through the final norm (on the hierarchical backbones only
  the last stage has its width, as in timm); False gives the raw outputs data2vec's targets need;
* ``output_fmt``: ``NCHW`` maps ``[N, D_i, H_i, W_i]`` or ``NLC`` tokens ``[N, L_i, D_i]``;
* ``stop_early`` with ``intermediates_only`` skips what comes after the deepest position taken.

``forward_last_blocks(x, n)`` gives the last ``n`` blocks (of the last stage), normed and laid out
like ``forward_features``' output, for the multi-block evaluation features.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

#: The layouts ``forward_intermediates`` returns its intermediates in (timm's ``output_fmt``).
OUTPUT_FMTS = ("NCHW", "NLC")


def check_output_fmt(output_fmt: str) -> None:
    """Refuse an ``output_fmt`` other than those of :data:`OUTPUT_FMTS`."""
    if output_fmt not in OUTPUT_FMTS:
        raise ValueError(f"output_fmt must be one of {', '.join(OUTPUT_FMTS)}, got {output_fmt!r}")


def take_indices(count: int, indices: int | Sequence[int] | None, unit: str) -> list[int]:
    """The positions ``forward_intermediates`` takes, read as timm reads its ``indices``.

    Args:
        count: How many blocks (or stages) there are.
        indices: None = all; an int ``n`` = the last ``n``; a sequence = those positions, negative
            ones counting from the end.
        unit: What is counted (``block``, ``stage``), for the message.

    Returns:
        Distinct positions in ``[0, count)``, ascending (the order the outputs are produced in).

    Raises:
        ValueError: An int outside ``[1, count]``, a position outside ``[-count, count)``, or no position.

    """
    valid = (f"indices must be in [1, {count}] (the last n of the {count} {unit}s) or a list of {unit} "
             f"indices in [{-count}, {count - 1}]")
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(f"{valid}, got {indices}")
        return list(range(count - indices, count))
    taken = set()
    for i in indices:
        i = operator.index(i)
        if not -count <= i < count:
            raise ValueError(f"{valid}, got {list(indices)}")
        taken.add(i % count)
    if not taken:
        raise ValueError(f"{valid}, got an empty list")
    return sorted(taken)


def plan_intermediates(count: int, indices: int | Sequence[int] | None, unit: str, output_fmt: str,
                       stop_early: bool, intermediates_only: bool) -> tuple[list[int], int]:
    """The positions to return and how many blocks (or stages) to run, the arguments checked.

    Returns:
        ``(take, run)``: :func:`take_indices`' positions, and ``count`` or, with ``stop_early`` and
        ``intermediates_only``, one past the deepest position taken.

    """
    check_output_fmt(output_fmt)
    take = take_indices(count, indices, unit)
    return take, take[-1] + 1 if stop_early and intermediates_only else count


__all__ = ["OUTPUT_FMTS", "check_output_fmt", "plan_intermediates", "take_indices"]
