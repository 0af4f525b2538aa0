"""Scoring model answers: ROUGE, the rubric answer format, and agreement and classification metrics.

No task's rubric lives here: each task passes its own :class:`~gemma_lowmem.evaluation.rubric.RubricSpec`.
"""

from gemma_lowmem.evaluation.metrics import agreement, classification_metrics, quadratic_weighted_kappa
from gemma_lowmem.evaluation.rouge import RougeScore, rouge_pair, rouge_scores
from gemma_lowmem.evaluation.rubric import RubricSpec, render_rubric
from gemma_lowmem.evaluation.rubric_parse import RubricResult, parse_rubric

__all__ = [
    "RougeScore",
    "RubricResult",
    "RubricSpec",
    "agreement",
    "classification_metrics",
    "parse_rubric",
    "quadratic_weighted_kappa",
    "render_rubric",
    "rouge_pair",
    "rouge_scores",
]
