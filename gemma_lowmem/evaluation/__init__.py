"""Scoring model answers: ROUGE, the rubric answer format, and agreement and classification metrics."""

from gemma_lowmem.evaluation.metrics import agreement, classification_metrics, quadratic_weighted_kappa
from gemma_lowmem.evaluation.rouge import RougeScore, rouge_pair, rouge_scores
from gemma_lowmem.evaluation.rubric import CRITERIA, MAX_TOTAL, RubricResult, parse_rubric, render_rubric

__all__ = [
    "CRITERIA",
    "MAX_TOTAL",
    "RougeScore",
    "RubricResult",
    "agreement",
    "classification_metrics",
    "parse_rubric",
    "quadratic_weighted_kappa",
    "render_rubric",
    "rouge_pair",
    "rouge_scores",
]
