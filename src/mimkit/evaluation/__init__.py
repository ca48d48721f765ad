"""Evaluation through the backbone interface only: kNN and linear probe on frozen features."""

from mimkit.evaluation.features import dataset_features, extract_features
from mimkit.evaluation.knn import knn_accuracy
from mimkit.evaluation.linear_probe import linear_probe
from mimkit.evaluation.runner import load_run_encoder, resolve_subject

__all__ = ["dataset_features", "extract_features", "knn_accuracy", "linear_probe", "load_run_encoder",
           "resolve_subject"]
