"""Helpers shared by the benchmark scripts: the frozen-feature evaluation and Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence

from mimkit.evaluation.runner import Subject, features_for, run_knn, run_linprobe, write_result


def evaluate_subject(subject: Subject, train_fraction: float = 1.0) -> dict[str, float]:
    """KNN (k = 20, 200; T = 0.07) and the 100-epoch linear probe, as ``mimkit knn`` / ``linprobe`` run them.

    The JSON results are written beside the checkpoint (or in the baseline's folder) as the CLI does.
    """
    feats = features_for(subject, "auto", "auto", 512, progress=False, train_fraction=train_fraction)
    knn = run_knn(subject, (20, 200), 0.07, feats)
    lin = run_linprobe(feats, 100, 0.1, 1024, 0)
    suffix = "" if train_fraction == 1.0 else f"-frac{train_fraction:g}"
    write_result(subject, f"knn{suffix}", knn)
    write_result(subject, f"linprobe{suffix}", lin)
    return {"knn20": knn["top1_k20"], "knn200": knn["top1_k200"], "linprobe": lin["top1"]}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats are printed with two decimals."""
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
