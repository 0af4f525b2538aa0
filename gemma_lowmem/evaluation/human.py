"""Agreement of automatic scores with human judgments of summaries (SummEval style), in plain numpy.

A SummEval-style file holds one row per (document, system) summary with expert ratings from 1 to 5 on coherence,
consistency, fluency and relevance. Summary-level correlation, as in the SummEval paper: for each document, rank
correlation between a metric and a human dimension over that document's system summaries; then the mean over the
documents where it is defined (at least 2 scored summaries, neither side constant).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma_lowmem.data.records import read_records
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.metrics import kendall_tau, spearman

HUMAN_DIMENSIONS = ("coherence", "consistency", "fluency", "relevance")
FIELDS = ("doc_id", "system_id", "article", "summary", "references", *HUMAN_DIMENSIONS)
RATING_RANGE = (1.0, 5.0)


@dataclass
class Judgment:
    """One rated summary.

    Attributes:
        doc_id: the source document.
        system_id: the system that wrote the summary.
        article: the source document's text.
        summary: the rated summary.
        reference: the first reference summary.
        ratings: human dimension -> rating in [1, 5] (averaged over annotators where the file holds a mean).
        where: the file and line, for messages.
    """

    doc_id: str
    system_id: str
    article: str
    summary: str
    reference: str
    ratings: dict[str, float]
    where: str

    @property
    def mean_rating(self) -> float:
        """The mean of the four human dimensions."""
        return sum(self.ratings.values()) / len(self.ratings)


def _first_reference(value: Any, where: str) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and isinstance(value[0], str) and value[0].strip():
        return value[0]
    raise UserError(f"{where}: field 'references' must be a non-empty list of texts whose first one is not empty, "
                    f"got {str(value)[:60]!r}")


def _rating(value: Any, name: str, where: str) -> float:
    low, high = RATING_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: field '{name}' must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{where}: field '{name}' = {value:g} is outside the rating scale {low:g}-{high:g}")
    return float(value)


def read_judgments(path: str | Path) -> list[Judgment]:
    """Read a SummEval-style JSONL file of rated summaries.

    Each line: ``doc_id``, ``system_id``, ``article``, ``summary``, ``references`` (a list of texts; the first one
    is used), and ``coherence``, ``consistency``, ``fluency``, ``relevance`` (numbers from 1 to 5).

    Args:
        path: the ``.jsonl`` file.

    Returns:
        The judgments in file order.

    Raises:
        UserError: naming the file, line and field of a missing or malformed value, or a repeated
            (doc_id, system_id) pair.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path}: human judgments must be a .jsonl file (one rated summary per line)")
    records = read_records(path, required=FIELDS, text_fields=("article",))
    # read_records skips blank lines: map each record back to its line for the messages below.
    lines = [n for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1) if line.strip()]
    judgments: list[Judgment] = []
    seen: dict[tuple[str, str], str] = {}
    for record, line in zip(records, lines):
        where = f"{path}: line {line}"
        ids = []
        for name in ("doc_id", "system_id"):
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
                raise UserError(f"{where}: field '{name}' must be a non-empty text or integer, got {value!r}")
            ids.append(str(value))
        if not isinstance(record["summary"], str):
            raise UserError(f"{where}: field 'summary' must be text, got {type(record['summary']).__name__}")
        judgments.append(Judgment(
            doc_id=ids[0], system_id=ids[1], article=record["article"], summary=record["summary"],
            reference=_first_reference(record["references"], where),
            ratings={name: _rating(record[name], name, where) for name in HUMAN_DIMENSIONS}, where=where,
        ))
        key = (ids[0], ids[1])
        if key in seen:
            raise UserError(f"{where}: doc_id {ids[0]!r} with system_id {ids[1]!r} was already given at "
                            f"{seen[key]}; keep one row per (doc_id, system_id)")
        seen[key] = f"line {line}"
    return judgments


def summary_level_correlations(
    doc_ids: Sequence[Hashable], metric: Sequence[float | None], human: Sequence[float]
) -> dict[str, Any]:
    """Summary-level Spearman and Kendall between a metric and a human rating, averaged over documents.

    Args:
        doc_ids: the document of each summary.
        metric: the metric's score of each summary; None (an unreadable evaluator answer) drops that summary.
        human: the human rating of each summary.

    Returns:
        ``spearman`` and ``kendall``: the mean over documents where the correlation is defined (None when it is
        defined for none); ``documents``: how many documents that is; ``documents_total``: how many there are.
    """
    if not len(doc_ids) == len(metric) == len(human):
        raise ValueError(f"lengths differ: {len(doc_ids)} doc_ids, {len(metric)} metric, {len(human)} human scores")
    groups: dict[Hashable, list[int]] = {}
    for i, doc in enumerate(doc_ids):
        groups.setdefault(doc, []).append(i)
    rhos, taus = [], []
    for members in groups.values():
        kept = [i for i in members if metric[i] is not None and math.isfinite(metric[i])]
        m, h = [float(metric[i]) for i in kept], [float(human[i]) for i in kept]
        rho, tau = spearman(m, h), kendall_tau(m, h)
        if rho is not None and tau is not None:  # both are undefined exactly when a side is constant
            rhos.append(rho)
            taus.append(tau)
    return {"spearman": float(np.mean(rhos)) if rhos else None, "kendall": float(np.mean(taus)) if taus else None,
            "documents": len(rhos), "documents_total": len(groups)}


def correlation_matrix(
    doc_ids: Sequence[Hashable], metrics: dict[str, Sequence[float | None]], humans: dict[str, Sequence[float]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """:func:`summary_level_correlations` of every metric with every human dimension.

    Args:
        doc_ids: the document of each summary.
        metrics: metric name -> score of each summary (None: dropped).
        humans: human dimension name -> rating of each summary.

    Returns:
        metric -> human dimension -> the result of :func:`summary_level_correlations`.
    """
    return {name: {dim: summary_level_correlations(doc_ids, scores, ratings) for dim, ratings in humans.items()}
            for name, scores in metrics.items()}
