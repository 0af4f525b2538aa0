"""Task 1 against human judgments: the rubric evaluator's scores of rated summaries (SummEval style) correlated with
the human ratings, next to ROUGE's correlations on the same rows.

Each rubric criterion goes with the human dimension it measures (:data:`HUMAN_PAIRS`); correlations are
summary-level (per document over its summaries, then the mean over documents; see
:func:`~gemma_lowmem.evaluation.human.correlation_matrix`).
"""

from __future__ import annotations

from typing import Any

import torch

from gemma_lowmem.evaluation.answers import EXAMPLES, generate_answers, prompt_excerpt
from gemma_lowmem.evaluation.guided import Decoding
from gemma_lowmem.evaluation.human import HUMAN_DIMENSIONS, Judgment, correlation_matrix
from gemma_lowmem.evaluation.rouge import rouge_pair
from gemma_lowmem.tasks.summary_eval import evaluation_prompt
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from gemma_lowmem.text import cut_at_sentence_end

# Each rubric criterion and the human dimension it measures; the total goes with the mean of the four ratings.
HUMAN_PAIRS = (("coverage", "relevance"), ("accuracy", "consistency"), ("grammar", "fluency"), ("total", "mean"))
ROUGE_KINDS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}


def _human_ratings(judgments: list[Judgment]) -> dict[str, list[float]]:
    ratings = {dim: [j.ratings[dim] for j in judgments] for dim in HUMAN_DIMENSIONS}
    return {**ratings, "mean": [j.mean_rating for j in judgments]}


def rouge_correlations(judgments: list[Judgment]) -> dict[str, dict[str, dict[str, Any]]]:
    """Summary-level correlations of ROUGE-1/2/L F1 (summary vs its first reference) with each human rating.

    Args:
        judgments: the rated summaries.

    Returns:
        ROUGE type -> human dimension (and ``mean``) -> ``spearman``, ``kendall``, ``documents``, ...
    """
    pairs = [rouge_pair(j.summary, j.reference) for j in judgments]
    scores = {kind: [p[kind].fmeasure for p in pairs] for kind in ROUGE_KINDS}
    return correlation_matrix([j.doc_id for j in judgments], scores, _human_ratings(judgments))


def grade_rated_summaries(
    model: torch.nn.Module,
    tokenizer: Any,
    judgments: list[Judgment],
    decoding: Decoding,
    *,
    lang: str,
    max_article_length: int,
    examples: int = EXAMPLES,
) -> dict[str, Any]:
    """Grade each rated summary with the rubric evaluator and correlate its scores with the human ratings.

    An answer that does not parse as a valid rubric (see ``parse_rubric``) drops that summary from the
    correlations; ``valid_rate`` says how many remained.

    Args:
        model: the evaluator.
        tokenizer: its tokenizer.
        judgments: the rated summaries (see :func:`~gemma_lowmem.evaluation.human.read_judgments`).
        decoding: how to render and decode, as :func:`~gemma_lowmem.evaluation.answers.generate_answers` takes it.
        lang: prompt language, ``"ko"`` or ``"en"``.
        max_article_length: articles are cut to this many characters at a sentence end, as in training.
        examples: how many examples to keep for the report.

    Returns:
        One system's report part: ``n``, ``metrics`` (``valid_rate``, ``documents``, ``pairs``: criterion ~ its
        human dimension -> ``spearman``, ``kendall``, ``documents``; ``generation``), ``correlations`` (every
        criterion and the total against every human dimension and the mean), ``plots``, ``examples``, ``rows``,
        ``outputs``.
    """
    messages = [evaluation_prompt(cut_at_sentence_end(j.article, max_article_length), j.summary, j.reference, lang)
                for j in judgments]
    prompts, answers, stats = generate_answers(model, tokenizer, messages, decoding, rubric=SUMMARY_RUBRIC, lang=lang)
    outputs = [a.text for a in answers]
    parsed = [a.result for a in answers]
    scores = {key: [p.scores[key] if p.valid else None for p in parsed] for key in SUMMARY_RUBRIC.criteria}
    scores["total"] = [p.total if p.valid else None for p in parsed]
    humans = _human_ratings(judgments)
    matrix = correlation_matrix([j.doc_id for j in judgments], scores, humans)
    metrics = {
        "n": len(judgments), "documents": len({j.doc_id for j in judgments}),
        "valid_rate": sum(p.valid for p in parsed) / len(parsed),
        "pairs": {f"{m} ~ {h}": matrix[m][h] for m, h in HUMAN_PAIRS}, "generation": stats,
    }
    rows = [{"doc_id": j.doc_id, "system_id": j.system_id, "ok": p.valid,
             "predicted": f"{p.total:g}" if p.valid else "invalid",
             "human": " / ".join(f"{j.ratings[d]:g}" for d in HUMAN_DIMENSIONS)} for j, p in zip(judgments, parsed)]
    valid = [i for i, p in enumerate(parsed) if p.valid]
    plots = {"scatter_total_vs_human": {
        "kind": "scatter", "x": [humans["mean"][i] for i in valid], "y": [scores["total"][i] for i in valid],
        "xlabel": "mean human rating (1-5)", "ylabel": "predicted total (0-100)",
        "title": "Evaluator total vs mean human rating (valid answers)"}}
    kept = [
        {"index": i, "prompt_excerpt": prompt_excerpt(prompts[i]), "generated": outputs[i],
         "target_text": "human ratings: " + ", ".join(f"{d} {judgments[i].ratings[d]:g}" for d in HUMAN_DIMENSIONS),
         "row": rows[i]}
        for i in range(min(examples, len(judgments)))
    ]
    return {"n": len(judgments), "metrics": metrics, "correlations": matrix, "plots": plots, "examples": kept,
            "rows": rows, "outputs": outputs}


def _correlation_cell(result: dict[str, Any], bold: bool) -> str:
    if result["spearman"] is None:
        return "n/a"
    text = f"{result['spearman']:.3f} / {result['kendall']:.3f}"
    return f"**{text}**" if bold else text


def correlation_table(systems: dict[str, dict[str, Any]], rouge: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The SummEval-style table: each evaluator criterion and ROUGE against each human dimension.

    Args:
        systems: system name -> :func:`grade_rated_summaries` result.
        rouge: :func:`rouge_correlations`.

    Returns:
        A report table (``title``, ``columns``, ``rows``, ``note``).
    """
    dims = [*HUMAN_DIMENSIONS, "mean"]
    rows = []
    for name, system in systems.items():
        for metric, by_dim in system["correlations"].items():
            rows.append([f"{name}: {metric}",
                         *(_correlation_cell(by_dim[d], (metric, d) in HUMAN_PAIRS) for d in dims)])
    for kind, by_dim in rouge.items():
        rows.append([ROUGE_KINDS[kind], *(_correlation_cell(by_dim[d], False) for d in dims)])
    documents = max((r["documents_total"] for by_dim in rouge.values() for r in by_dim.values()), default=0)
    return {
        "title": "Summary-level correlation with human ratings (Spearman / Kendall tau-b)",
        "columns": ["metric", *dims], "rows": rows,
        "note": f"Per document over its summaries, then the mean over the {documents} documents (those where a side "
                "is constant or fewer than 2 answers were valid are left out; see report.json for counts). "
                "Bold: the criterion's matching human dimension. ROUGE: F1 of the summary against the first reference.",
    }


def limit_documents(judgments: list[Judgment], max_rows: int | None) -> list[Judgment]:
    """At most ``max_rows`` judgments, whole documents only (in order of first appearance; at least one)."""
    if max_rows is None:
        return judgments
    by_doc: dict[str, list[Judgment]] = {}
    for j in judgments:
        by_doc.setdefault(j.doc_id, []).append(j)
    kept: list[Judgment] = []
    for group in by_doc.values():
        if kept and len(kept) + len(group) > max_rows:
            break
        kept += group
    return kept
