"""Agreement between predicted and reference scores, and classification metrics, in plain numpy.

Undefined statistics (fewer than 2 valid pairs, a constant side) are ``None``, never NaN and never an exception, so
a result dict always serialises to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

INVALID = "invalid"
"""Column of :func:`classification_metrics`' confusion matrix for unparsed or unknown predictions."""


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:  # a constant side: correlation undefined
        return None
    return float(np.clip(float(dx @ dy) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (as in Spearman's rho)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    new_run = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # (n,) True where a run of equal values starts
    starts = np.flatnonzero(new_run)
    run = np.cumsum(new_run) - 1  # (n,) run index of each sorted item
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends - 1) / 2.0 + 1.0  # (runs,)
    ranks = np.empty(len(x))
    ranks[order] = mean_rank[run]
    return ranks


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float | None:
    """Kendall's tau-b, O(n^2) over pairs one row at a time (n is a few thousand at most here)."""
    n = len(x)
    if n < 2:
        return None
    concordance = 0.0  # sum over pairs of sign(dx) * sign(dy) = concordant - discordant
    untied_x = untied_y = 0
    for i in range(n - 1):
        sx = np.sign(x[i + 1:] - x[i])  # (n - i - 1,)
        sy = np.sign(y[i + 1:] - y[i])
        concordance += float(sx @ sy)
        untied_x += int(np.count_nonzero(sx))
        untied_y += int(np.count_nonzero(sy))
    if untied_x == 0 or untied_y == 0:
        return None
    return float(np.clip(concordance / math.sqrt(untied_x * untied_y), -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of tie-averaged ranks); None with < 2 pairs or a constant side."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return _pearson(_average_ranks(a), _average_ranks(b)) if len(a) >= 2 else None


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (ties corrected, as scipy's default); None with < 2 pairs or a constant side."""
    return _kendall_tau_b(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))


def quadratic_weighted_kappa(a: Sequence[int], b: Sequence[int], min_rating: int, max_rating: int) -> float | None:
    """Cohen's kappa with quadratic weights between two raters' integer ratings.

    Args:
        a: first rater's ratings, integers within [min_rating, max_rating].
        b: second rater's ratings, same length.
        min_rating: lowest possible rating.
        max_rating: highest possible rating.

    Returns:
        Kappa in [-1, 1], or ``None`` when undefined (no ratings, a single category, or both raters constant on
        the same rating so that chance agreement is perfect).
    """
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} ratings but b has {len(b)}; they must pair up")
    if max_rating < min_rating:
        raise ValueError(f"max_rating {max_rating} is below min_rating {min_rating}")
    ra, rb = np.asarray(a), np.asarray(b)
    for name, r in (("a", ra), ("b", rb)):
        if r.size and (not np.all(np.equal(np.mod(r, 1), 0)) or r.min() < min_rating or r.max() > max_rating):
            raise ValueError(f"{name} must hold integers within [{min_rating}, {max_rating}]")
    k = max_rating - min_rating + 1
    if len(ra) == 0 or k < 2:
        return None
    ia, ib = ra.astype(np.int64) - min_rating, rb.astype(np.int64) - min_rating
    observed = np.zeros((k, k))
    np.add.at(observed, (ia, ib), 1.0)  # (k, k) counts of (a, b) rating pairs
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / len(ra)  # independent raters, same marginals
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    denom = float((weights * expected).sum())
    if denom == 0.0:
        return None
    return float(1.0 - (weights * observed).sum() / denom)


def _bins(scores: np.ndarray, max_score: float) -> np.ndarray:
    """Scores to ratings 0..10: the nearest multiple of max_score / 10, half up, clipped to the scale."""
    return np.clip(np.floor(scores * 10.0 / max_score + 0.5), 0, 10).astype(np.int64)


def agreement(pred: Sequence[float | None], target: Sequence[float], max_score: float) -> dict[str, Any]:
    """How well predicted scores agree with reference scores.

    A prediction of ``None`` or NaN (an unparsed answer) is invalid; every statistic but ``valid_rate`` is over
    the valid pairs only. QWK bins both sides on a 0..10 scale: ``round(score / (max_score / 10))``, half up,
    clipped to [0, 10], so out-of-range predictions land on the nearest end.

    Args:
        pred: predicted scores, ``None`` where the answer could not be read.
        target: reference scores, same length, all finite.
        max_score: the scale's maximum (100 for the total, 40 for coverage, ...).

    Returns:
        ``n``, ``n_valid``, ``valid_rate`` (None when n is 0), ``mae``, ``rmse``, ``pearson``, ``spearman``,
        ``kendall_tau`` (tau-b), ``qwk``; MAE and RMSE are None without valid pairs, the others with fewer than 2
        valid pairs or when undefined (a constant side).
    """
    if len(pred) != len(target):
        raise ValueError(f"{len(pred)} predictions but {len(target)} targets; they must pair up")
    if not max_score > 0:
        raise ValueError(f"max_score must be positive, got {max_score}")
    t = np.asarray(target, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise ValueError("target scores must all be finite numbers")
    p = np.array([np.nan if v is None else float(v) for v in pred], dtype=np.float64)
    valid = np.isfinite(p)
    pv, tv = p[valid], t[valid]
    n, n_valid = len(p), int(valid.sum())
    out: dict[str, Any] = {"n": n, "n_valid": n_valid, "valid_rate": n_valid / n if n else None}
    err = pv - tv
    out["mae"] = float(np.abs(err).mean()) if n_valid else None
    out["rmse"] = float(np.sqrt((err**2).mean())) if n_valid else None
    out["pearson"] = _pearson(pv, tv)
    out["spearman"] = spearman(pv, tv)
    out["kendall_tau"] = kendall_tau(pv, tv)
    out["qwk"] = quadratic_weighted_kappa(_bins(pv, max_score), _bins(tv, max_score), 0, 10) if n_valid >= 2 else None
    return out


def classification_metrics(
    pred: Sequence[Hashable | None], true: Sequence[Hashable], labels: Sequence[Hashable]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores and the confusion matrix of a classifier's answers.

    A prediction that is ``None`` or not one of ``labels`` counts as wrong and lands in the ``"invalid"`` column.
    Precision, recall or F1 with a zero denominator is 0.0.

    Args:
        pred: predicted labels, ``None`` where the answer could not be read.
        true: reference labels, each one of ``labels``.
        labels: the classes, in the order of the matrix rows and columns.

    Returns:
        ``n``, ``n_invalid``, ``accuracy``, ``macro_f1`` (mean F1 over ``labels``), ``per_class``
        (label -> precision, recall, f1, support), ``labels``, ``columns`` (``labels`` + ``"invalid"``) and
        ``confusion_matrix``: list of rows, one per true label, counts per predicted column.
    """
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions but {len(true)} reference labels; they must pair up")
    labels = list(labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be distinct and non-empty, got {labels}")
    index = {label: i for i, label in enumerate(labels)}
    unknown = [t for t in true if t not in index]
    if unknown:
        raise ValueError(f"reference label {unknown[0]!r} is not one of labels {labels}")
    k = len(labels)
    matrix = np.zeros((k, k + 1), dtype=np.int64)  # (true, predicted + invalid)
    for p, t in zip(pred, true):
        column = index.get(p, k) if p is not None else k
        matrix[index[t], column] += 1
    n = len(true)
    correct = np.diag(matrix[:, :k])  # (k,)
    predicted = matrix[:, :k].sum(axis=0)  # (k,) valid predictions per class
    support = matrix.sum(axis=1)  # (k,)
    per_class: dict[Hashable, dict[str, float | int]] = {}
    f1s = []
    for i, label in enumerate(labels):
        precision = correct[i] / predicted[i] if predicted[i] else 0.0
        recall = correct[i] / support[i] if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                            "support": int(support[i])}
        f1s.append(float(f1))
    return {
        "n": n,
        "n_invalid": int(matrix[:, k].sum()),
        "accuracy": float(correct.sum() / n) if n else None,
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
        "labels": labels,
        "columns": [*labels, INVALID],
        "confusion_matrix": matrix.tolist(),
    }
