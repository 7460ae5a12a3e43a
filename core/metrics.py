"""Evaluation metrics: ROC AUC and log loss, computed exactly over all predictions."""
from __future__ import annotations

import math

import torch


def roc_auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores averaged); NaN if one class is absent."""
    labels = labels.flatten().double()
    scores = scores.flatten().double()
    positives = labels.sum().item()
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return math.nan
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks over runs of equal scores
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    rank_sum = ranks[labels > 0.5].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def log_loss(labels: torch.Tensor, logits: torch.Tensor) -> float:
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()).item()


def calibration(labels: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(mean predicted probability, observed positive rate): equal for a calibrated model."""
    return torch.sigmoid(logits.double()).mean().item(), labels.double().mean().item()
