"""Task 1, summary evaluation: data, target scores and prompts for a rubric evaluator of student summaries.

Each training conversation follows the seed's format: (system) the rubric; (user) the article and a request for a
3-4 sentence summary; (assistant) a student's summary; (user) a request to evaluate it against the reference summary,
which this turn gives; (assistant) the rubric evaluation, the only turn that carries the loss.

News data sets hold no student summaries, so :mod:`gemma_lowmem.tasks.student_summaries` writes them (eight kinds,
each recording its edits) and :func:`score_summary` scores them from measurable facts, on the criteria of a rubric
(:data:`~gemma_lowmem.tasks.summary_rubric.SUMMARY_RUBRIC`: coverage 40, accuracy 30, conciseness 20, grammar 10).
``M`` is a criterion's maximum in the rubric; ``R(x)`` rounds half up; ``clip`` clips to [0, 1]; *content tokens*
are the lowercased words and numbers of a text without English stopwords and one-letter words
(:func:`~gemma_lowmem.text.content_tokens`).

- coverage (0-M) = ``R(M * clip((r - 0.05) / 0.85))``, ``r`` = ROUGE-1 recall of the reference's content tokens
  by the summary's content tokens (``rouge_pair``; Porter stems for English). Near-copies of the reference
  (``r`` about 0.95) get ``M``; another article's summary (``r`` about 0.02) gets 0.
- accuracy (0-M) = ``R(M * c * clip(1 - 0.35 * E - max(0, u - 0.1) / 0.4))``: ``E`` = facts changed or invented
  (from the edit record), ``u`` = fraction of the summary's content tokens found neither in the article nor in the
  reference (counted before grammar noise, synonyms put in by rewording count as found), ``c`` = ``min(1, n / 8)``
  with ``n`` the summary's content tokens (an empty summary shows no accurate content).
- conciseness (0-M) = ``R(M * clip(1 - L - S - x / 2) - P * M / 20)`` clipped to [0, M]: ``rho`` = summary characters /
  reference characters, ``L`` = ``clip((rho - 1.3) / 2.2)`` (too long), ``S`` = ``clip((0.6 - rho) / 0.5)`` (too
  short), ``x`` = share of the summary's characters in sentences that share under 25% of their content tokens with
  the reference (unrelated detail), ``P`` = ``min(6, 2 * max(0, 3 - k) + max(0, k - 4))`` points (of 20) for
  ``k`` sentences against the requested 3-4.
- grammar (0-M) = ``R(M * c * max(0, 1 - 0.15 * N))``, ``N`` = injected word-order swaps, dropped words and typos.
- total = the sum of the rubric's criteria.

A teacher's own rubric (other maxima, labels or order, some of these four criteria) is data: :func:`summary_task`
makes the task from it, and the targets, the prompts (how many criteria, the maxima, the total) and the metrics
follow its criteria and maxima.

Feedback, suggestions and the one-line comment per criterion are written from the same edits and measurements
(:mod:`gemma_lowmem.tasks.summary_feedback`; Korean for ``lang="ko"``, English for ``"en"``), so they name the
defect: "The summary says '12 deaths', but the article says '21 deaths'." /
"요약의 '12명' 부분이 틀렸습니다. 기사에 따르면 '21명'입니다."
"""

from __future__ import annotations

import hashlib
import logging
import random
import statistics
from collections import Counter
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.metrics import agreement
from gemma_lowmem.evaluation.rouge import rouge_pair, rouge_scores
from gemma_lowmem.evaluation.rubric import RubricSpec, render_rubric_spans
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.tasks import Request, Task
from gemma_lowmem.tasks.sources import HubSet, LoadedRows, MissingField, Row, load_rows
from gemma_lowmem.tasks.student_summaries import (
    KINDS,
    ArticleIndex,
    StudentSummary,
    clean_reference,
    make_student_summary,
)
from gemma_lowmem.tasks.summary_feedback import round_half_up, write_feedback
from gemma_lowmem.tasks.summary_rubric import CRITERIA_HELP, SUMMARY_RUBRIC
from gemma_lowmem.text import content_tokens, cut_at_sentence_end, detect_lang, split_sentences

log = logging.getLogger(__name__)

HUB = HubSet("abisee/cnn_dailymail", "3.0.0")
DEMO_FILE = Path(__file__).parents[1] / "data" / "demo" / "summary_demo.jsonl"
DEMO_VAL_FRACTION = 0.2  # the demo set is small: 1 row in 5 for validation
HOLDOUT_FRACTION = 0.1  # held out of a training file when no validation file is given
FIELDS = ("id", "article", "highlights", "lang")  # what --columns may map
MEASURED = ("coverage", "accuracy", "conciseness", "grammar")  # the criteria score_summary measures


# ---------------------------------------------------------------------------------------------------------- loading


def load_data(cfg: DataConfig) -> LoadedRows:
    """Load training and validation rows for the summary-evaluation task.

    Sources, first match wins: ``cfg.demo`` (the bundled demo set, 80/20 split); ``cfg.train_file``; ``cfg.data``
    as a local file when it exists or ends in a data-file suffix, else as a hub data set id; the hub set
    ``abisee/cnn_dailymail`` (3.0.0). Validation rows come from ``cfg.val_file``, the hub's validation split, or a
    fixed held-out slice of the training rows. ``max_train_samples`` and ``max_val_samples`` cut last.

    Args:
        cfg: the data configuration.

    Returns:
        The rows ``{"id", "article", "highlights", "lang"}`` and what was skipped: the article cut to
        ``max_article_length`` at a sentence end, the highlights one sentence per line (:func:`clean_reference`),
        ``lang`` the article's language (the row's own ``lang`` field when it is "ko" or "en", else detected), ``id``
        the row's own or ``<file stem>-<i>`` (hub: ``<set>-<split>-<i>``).

    Raises:
        UserError: a missing file or field (named with its file, line and field), or an unreachable hub.
    """
    def normalise(row: Row) -> Row:
        # Local rows were checked by read_records (which names the line); hub rows arrive unchecked.
        missing = next((f for f in ("article", "highlights") if not isinstance(row.get(f), str) or not row[f].strip()),
                       None)
        if missing is not None:
            raise MissingField(missing, f"field '{missing}' is missing or empty")
        article = cut_at_sentence_end(row["article"].strip(), cfg.max_article_length)
        row_id = row.get("id")
        return {"id": str(row_id) if row_id not in (None, "") else None, "article": article,
                "highlights": clean_reference(row["highlights"]),
                "lang": row.get("lang") if row.get("lang") in ("ko", "en") else detect_lang(article)}

    return load_rows(cfg, normalise, fields=FIELDS, demo_file=DEMO_FILE, hub=HUB,
                     demo_val_fraction=DEMO_VAL_FRACTION, holdout_fraction=HOLDOUT_FRACTION,
                     required=("article", "highlights"), text_fields=("article", "highlights"), numbered_ids=True)


# ---------------------------------------------------------------------------------------------------------- scoring


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def check_rubric(spec: RubricSpec) -> None:
    """Refuse a rubric with a criterion that :func:`score_summary` cannot measure.

    Raises:
        UserError: a criterion key is not one of :data:`MEASURED` (the message names it and the fix).
    """
    unknown = [key for key in spec.criteria if key not in MEASURED]
    if unknown:
        raise UserError(f"rubric criteria {unknown}: summary_eval measures only {', '.join(MEASURED)}; give the "
                        "rubric some of these keys (any maxima, labels and order)")


def score_summary(summary: StudentSummary, article: str, reference: str, spec: RubricSpec = SUMMARY_RUBRIC
                  ) -> tuple[dict[str, int], dict[str, Any]]:
    """Score a student summary from measurable facts (formulas in the module docstring).

    Args:
        summary: the summary and its edit record.
        article: the article (as shown to the model).
        reference: the reference summary, one sentence per line.
        spec: the rubric: which criteria are scored, in its order, each out of its maximum.

    Returns:
        ``scores``: each criterion of ``spec`` and ``total`` (integers); ``facts``: the measurements behind them
        (``recall``, ``unsupported``, ``unsupported_words``, ``content``, ``sentences``, ``length_ratio``,
        ``unrelated``, ``conciseness_losses``, ``factual_errors``, ``noise``).
    """
    sum_tokens = content_tokens(summary.text)
    ref_tokens = content_tokens(reference)
    recall = rouge_pair(" ".join(sum_tokens), " ".join(ref_tokens))["rouge1"].recall if sum_tokens else 0.0

    index = ArticleIndex(article + "\n" + reference)
    reworded = {w for e in summary.edits if e["op"] == "synonym" for w in content_tokens(e["to"])}
    clean_tokens = content_tokens(summary.clean_text)
    unsupported = [t for t in clean_tokens if t not in reworded and not index.supports(t)]
    u = len(unsupported) / len(clean_tokens) if clean_tokens else 0.0
    c = min(1.0, len(sum_tokens) / 8)

    sentences = split_sentences(summary.text)
    ref_set = set(ref_tokens)
    unrelated_chars = 0
    for sent in sentences:
        toks = set(content_tokens(sent))
        if toks and len(toks & ref_set) / len(toks) < 0.25:
            unrelated_chars += len(sent)
    x = unrelated_chars / max(1, sum(len(s) for s in sentences))
    rho = len(summary.text) / max(1, len(reference.replace("\n", " ")))
    k = len(sentences)
    # Points each conciseness defect costs on a 20-point criterion (scaled to the rubric's); the comment names the
    # largest.
    losses = {"long": 20 * _clip((rho - 1.3) / 2.2), "short": 20 * _clip((0.6 - rho) / 0.5), "unrelated": 10 * x,
              "count": min(6, 2 * max(0, 3 - k) + max(0, k - 4))}

    formulas = {  # criterion -> its points out of the maximum m
        "coverage": lambda m: round_half_up(m * _clip((recall - 0.05) / 0.85)),
        "accuracy": lambda m: round_half_up(
            m * c * _clip(1 - 0.35 * summary.factual_errors - max(0.0, u - 0.1) / 0.4)),
        "conciseness": lambda m: min(m, max(0, round_half_up(
            m * _clip(1 - (losses["long"] + losses["short"] + losses["unrelated"]) / 20) - losses["count"] * m / 20))),
        "grammar": lambda m: round_half_up(m * c * max(0.0, 1 - 0.15 * summary.noise)),
    }
    scores = {key: formulas[key](maximum) for key, (maximum, _, _) in spec.criteria.items()}
    scores["total"] = sum(scores.values())
    as_written = dict(zip(clean_tokens, content_tokens(summary.clean_text, keep_case=True)))
    facts = {"recall": recall, "unsupported": u,
             "unsupported_words": [as_written[t] for t in dict.fromkeys(unsupported)][:3],
             "content": len(sum_tokens), "sentences": k, "length_ratio": rho, "unrelated": x,
             "conciseness_losses": losses, "factual_errors": summary.factual_errors, "noise": summary.noise}
    return scores, facts


# ---------------------------------------------------------------------------------------------------------- prompts

_COUNTS = {"ko": ("한", "두", "세", "네"), "en": ("one", "two", "three", "four")}  # "n criteria", 1 to 4


def system_prompt(lang: str = "ko", spec: RubricSpec = SUMMARY_RUBRIC) -> str:
    """The rubric the evaluator follows: the criteria of ``spec`` with their maxima, and the total.

    Args:
        lang: ``"ko"`` or ``"en"``.
        spec: the rubric (:data:`~gemma_lowmem.tasks.summary_rubric.SUMMARY_RUBRIC`: four criteria worth
            40/30/20/10 points, 100 in total).

    Returns:
        The system text.
    """
    ko = lang == "ko"
    count = _COUNTS["ko" if ko else "en"][len(spec.criteria) - 1]
    lines = ["당신은 학생이 쓴 뉴스 기사 요약을 채점하는 교사입니다. 학생의 요약을 기사 및 참고 요약과 비교하여 "
             f"다음 {count} 가지 기준으로 평가하세요." if ko else
             "You are a teacher who grades students' summaries of news articles. Compare the student's summary "
             f"with the article and the reference summary and score it on {count} "
             f"{'criterion' if len(spec.criteria) == 1 else 'criteria'}."]
    for key, (maximum, label_ko, label_en) in spec.criteria.items():
        unit = "점" if ko else " points"
        lines.append(f"- {label_ko if ko else label_en} ({maximum}{unit}): {CRITERIA_HELP[key][ko]}")
    if ko:
        lines.append(f"총점은 {spec.max_total}점입니다. 총점, 기준별 점수와 한 문장 평가, 전체 피드백, 개선 제안을 "
                     "정해진 형식으로 답하세요.")
    else:
        lines.append(f"The total is {spec.max_total} points. Give the total, each criterion's score with a "
                     "one-sentence comment, overall feedback and suggestions for improvement in the fixed format.")
    return "\n".join(lines)


def summary_request(article: str, lang: str = "ko") -> str:
    """The first user turn: the article and the request for a 3-4 sentence summary."""
    if lang == "ko":
        return f"다음 기사를 3-4문장으로 요약해 주세요.\n\n기사:\n{article}"
    return f"Summarize the following article in 3-4 sentences.\n\nArticle:\n{article}"


def evaluation_request(reference: str | None, lang: str = "ko") -> str:
    """The second user turn: the request to evaluate the summary against the reference summary, or against the
    article alone when there is none (an empty reference counts as none)."""
    if not (reference or "").strip():
        if lang == "ko":
            return "위 기사와 비교하여 위 요약을 평가해 주세요. 참고 요약은 없습니다."
        return "Evaluate the summary above by comparing it with the article. There is no reference summary."
    if lang == "ko":
        return f"아래 참고 요약과 비교하여 위 요약을 평가해 주세요.\n\n참고 요약:\n{reference}"
    return ("Evaluate the summary above by comparing it with the reference summary below.\n\n"
            f"Reference summary:\n{reference}")


def evaluation_prompt(article: str, student_summary: str, reference: str | None, lang: str = "ko",
                      spec: RubricSpec = SUMMARY_RUBRIC) -> list[Message]:
    """The messages that ask a trained evaluator to grade a new (article, summary) pair; the answer is left out.

    Args:
        article: the article.
        student_summary: the summary to grade.
        reference: the reference summary (CNN/DailyMail highlights are cleaned to one sentence per line); None or
            empty: the request asks to compare with the article alone and shows no reference section (training
            shows such requests in ``data.no_reference_share`` of its conversations).
        lang: prompt language, ``"ko"`` or ``"en"``.
        spec: the rubric the evaluator was trained on (its system prompt).

    Returns:
        System, user, assistant (the summary) and user messages, ready for the chat template.
    """
    if lang not in ("ko", "en"):
        raise UserError(f"lang={lang!r} is not one of ko, en")
    return [
        {"role": "system", "content": system_prompt(lang, spec)},
        {"role": "user", "content": summary_request(article, lang)},
        {"role": "assistant", "content": student_summary},
        {"role": "user", "content": evaluation_request(clean_reference(reference or ""), lang)},
    ]


def grading_request(row: Mapping[str, Any], cfg: DataConfig, spec: RubricSpec = SUMMARY_RUBRIC) -> list[Message]:
    """The messages that grade one new row, as training shows rows (``Task.request``).

    Args:
        row: ``article`` (cut to ``cfg.max_article_length`` at a sentence end, as in training), ``summary`` (may be
            empty) and an optional ``reference`` (none or empty: the summary is compared with the article alone).
        cfg: the training run's data configuration (``lang``, ``max_article_length``).
        spec: the rubric the evaluator was trained on.

    Returns:
        The messages of :func:`evaluation_prompt`.
    """
    article = cut_at_sentence_end(str(row["article"]).strip(), cfg.max_article_length)
    reference = row.get("reference")
    return evaluation_prompt(article, str(row.get("summary") or ""),
                             str(reference) if reference not in (None, "") else None, cfg.lang, spec)


# ------------------------------------------------------------------------------------------------------- conversations


def _row_rng(seed: int, article: str) -> random.Random:
    # A string seed is hashed with SHA-512 by ``random``: the same on every run and platform.
    return random.Random(f"{seed}:{hashlib.sha1(article.encode('utf-8')).hexdigest()}")


def assign_kinds(n: int, seed: int, shift: int = 0) -> list[str]:
    """Summary kinds for ``n`` rows: each block of 8 rows is a seeded permutation of :data:`KINDS`.

    Args:
        n: number of rows.
        seed: the seed.
        shift: rotate each block's permutation by this many places. The lists for shifts 0..7 give each row
            eight different kinds, so one article can carry several student summaries of different kinds.

    Returns:
        ``n`` kinds; every kind appears among any first 8 (and each following block of 8).
    """
    kinds: list[str] = []
    for block in range(0, n, len(KINDS)):
        order = random.Random(f"{seed}:kinds:{block}").sample(KINDS, len(KINDS))
        kinds += order[shift % len(KINDS):] + order[:shift % len(KINDS)]
    return kinds[:n]


def build_conversation(record: dict[str, Any], other_record: dict[str, Any] | None, lang: str,
                       rng_or_seed: random.Random | int, kind: str | None = None,
                       show_reference: bool = True, score_loss_weight: int = 1,
                       spec: RubricSpec = SUMMARY_RUBRIC) -> Conversation:
    """One training conversation: article, student summary, evaluation request, target rubric.

    Args:
        record: ``{"article", "highlights"}`` and optionally ``"id"`` and ``"lang"`` (the article's language).
        other_record: another row, whose reference becomes an ``off_topic`` summary (None: a fixed unrelated text).
        lang: prompt and feedback language, ``"ko"`` or ``"en"``.
        rng_or_seed: a ``random.Random``, or an int seed combined with the article's hash.
        kind: the summary kind (None: drawn from the generator).
        show_reference: the evaluation request shows the reference; False: the grader sees the article alone
            (the target is the same: the scores measure the summary against the reference either way).
        score_loss_weight: how many times each token of the answer's scores counts in the loss
            (``Conversation.answer_weights``; 1: as every other token).
        spec: the rubric: the criteria scored, their maxima, the system prompt and the answer's labels.

    Returns:
        The conversation; ``cut`` is the article; ``meta`` holds kind, scores (with total), id, lang and edits.
    """
    rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else _row_rng(rng_or_seed, record["article"])
    kind = kind or rng.choice(KINDS)
    article = record["article"]
    reference = clean_reference(record["highlights"])
    other = clean_reference(other_record["highlights"]) if other_record is not None else None
    article_lang = record.get("lang") if record.get("lang") in ("ko", "en") else detect_lang(article)
    summary = make_student_summary(kind, article, reference, other, rng, article_lang)
    scores, facts = score_summary(summary, article, reference, spec)
    feedback, suggestions, comments = write_feedback(summary, reference, scores, facts, lang, spec)
    answer, spans = render_rubric_spans({key: scores[key] for key in spec.criteria}, feedback, suggestions, comments,
                                        lang, spec)
    messages = evaluation_prompt(article, summary.text, reference if show_reference else None, lang, spec)
    messages.append({"role": "assistant", "content": answer})
    meta = {"kind": kind, "scores": scores, "id": record.get("id"), "lang": lang, "edits": summary.edits}
    weights = [(a, b, score_loss_weight) for a, b in spans] if score_loss_weight != 1 else []
    return Conversation(messages=messages, cut=article, meta=meta, answer_weights=weights)


def build_conversations(records: list[dict[str, Any]], lang: str, seed: int, no_reference_share: float = 0.0,
                        score_loss_weight: int = 1, kinds_per_row: int = 1, spec: RubricSpec = SUMMARY_RUBRIC
                        ) -> list[Conversation]:
    """Conversations for a list of rows, kinds assigned by :func:`assign_kinds`.

    Args:
        records: rows with ``article`` and ``highlights`` (e.g. from :func:`load_data`).
        lang: prompt and feedback language.
        seed: the seed; each row's summary depends only on the seed, its kind and its article.
        no_reference_share: this share of the conversations (a seeded draw) asks to grade without the reference.
        score_loss_weight: as in :func:`build_conversation`.
        kinds_per_row: student summaries per row, each of a different kind (at most ``len(KINDS)``).
        spec: the rubric (some of :data:`MEASURED`, any maxima).

    Returns:
        ``kinds_per_row`` passes over the rows, each in row order, with one conversation per row; the off-topic
        summary of row ``i`` is the reference of row ``i + n // 2`` (modulo ``n``).
    """
    check_rubric(spec)
    if not 1 <= kinds_per_row <= len(KINDS):
        raise UserError(f"kinds_per_row={kinds_per_row!r} must be between 1 and {len(KINDS)} (the summary kinds)")
    n = len(records)
    # Shifts spread evenly over the 8 kinds, so the kinds of one row are far apart in its block's permutation.
    shifts = [copy * len(KINDS) // kinds_per_row for copy in range(kinds_per_row)]
    kinds = [kind for shift in shifts for kind in assign_kinds(n, seed, shift)]
    draw = random.Random(f"{seed}:no-reference")
    hidden = set(draw.sample(range(len(kinds)), round(len(kinds) * no_reference_share)))
    out = []
    for i, kind in enumerate(kinds):
        record = records[i % n]
        other = records[(i % n + max(1, n // 2)) % n] if n > 1 else None
        if other is not None and other["article"] == record["article"]:
            other = None
        out.append(build_conversation(record, other, lang, seed, kind=kind, show_reference=i not in hidden,
                                      score_loss_weight=score_loss_weight, spec=spec))
    return out


def build_datasets(cfg: DataConfig, seed: int, spec: RubricSpec = SUMMARY_RUBRIC
                   ) -> tuple[list[Conversation], list[Conversation]]:
    """Load the rows named by ``cfg`` and build (train, validation) conversations; the training script's entry.

    Args:
        cfg: the data configuration (source, language, sample limits, article length).
        seed: the seed for summary kinds and edits.
        spec: the rubric the targets follow.

    Returns:
        Training and validation conversations.
    """
    data = load_data(cfg)
    log.info("%s: %d training rows, %d validation rows", data.source, len(data.train), len(data.val))
    settings = {"no_reference_share": cfg.no_reference_share, "score_loss_weight": cfg.score_loss_weight,
                "spec": spec}
    # Validation keeps one summary per row, so its kinds and metrics do not depend on the training recipe.
    return (build_conversations(data.train, cfg.lang, seed, kinds_per_row=cfg.kinds_per_row, **settings),
            build_conversations(data.val, cfg.lang, seed, **settings))


def summary_statistics(conversations: list[Conversation], spec: RubricSpec = SUMMARY_RUBRIC) -> dict[str, Any]:
    """Counts per kind and the spread of each criterion, for the prepare-data script.

    Args:
        conversations: from :func:`build_conversations`.
        spec: the rubric they were built with.

    Returns:
        ``{"conversations": n, "kinds": {kind: count}, "scores": {criterion or "total": {"mean", "std", "min",
        "max"}}, "mean_total_by_kind": {kind: mean}}`` (population std).
    """
    kinds = Counter(c.meta["kind"] for c in conversations)
    scores: dict[str, dict[str, float]] = {}
    for key in spec.score_fields:
        values = [c.meta["scores"][key] for c in conversations]
        if values:
            scores[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
                           "min": min(values), "max": max(values)}
    by_kind = {kind: statistics.fmean(c.meta["scores"]["total"] for c in conversations if c.meta["kind"] == kind)
               for kind in KINDS if kinds[kind]}
    return {"conversations": len(conversations), "kinds": {k: kinds[k] for k in KINDS if kinds[k]},
            "scores": scores, "mean_total_by_kind": by_kind}


# ----------------------------------------------------------------------------------------------------------- evaluation


def _answer_text(result: Any) -> str:
    """The feedback and suggestions of a parsed answer, joined: what ROUGE compares."""
    return "\n".join(part.strip() for part in (result.feedback, result.suggestions) if part and part.strip())


def _scores_text(total: float | None, scores: dict[str, float | None], spec: RubricSpec) -> str:
    """``"78 (32/24/14/8)"``: a total and the criteria in rubric order, ``?`` where missing."""
    def number(x: float | None) -> str:
        return "?" if x is None else f"{x:g}"

    return f"{number(total)} ({'/'.join(number(scores.get(key)) for key in spec.criteria)})"


def score_outputs(conversations: list[Conversation], outputs: list[str], spec: RubricSpec = SUMMARY_RUBRIC
                  ) -> dict[str, Any]:
    """Score generated rubric answers against each conversation's target scores and feedback.

    A prediction counts only from an answer that :func:`~gemma_lowmem.evaluation.rubric_parse.parse_rubric` calls
    valid (every criterion's score in range and the total written); an invalid answer is ``None`` in every agreement
    statistic, and its feedback scores ROUGE 0 (it is compared as an empty text).

    Args:
        conversations: the evaluated conversations; ``meta["scores"]`` holds the target total and criteria,
            ``meta["kind"]`` the student summary's kind, the last message the target answer.
        outputs: the generated answer of each conversation, same order.
        spec: the rubric the conversations were built with.

    Returns:
        ``metrics``: ``n``, ``valid_rate``, ``agreement`` (``total`` and each criterion -> the statistics of
        :func:`~gemma_lowmem.evaluation.metrics.agreement`), ``feedback_rouge`` (mean ROUGE-1/2/L/Lsum F1 of the
        generated feedback plus suggestions against the target's), ``by_kind`` (kind -> ``n``, ``n_valid``,
        ``predicted_mean`` over valid answers, ``target_mean`` over all rows of that kind);
        ``rows``: per example ``id``, ``kind``, ``ok`` (valid), ``predicted`` and ``target`` (``"total (c/a/c/g)"``),
        ``predicted_total``, ``target_total``, ``abs_error``, ``problems``;
        ``plots``: ``scatter_total`` (predicted vs target totals of valid answers) and ``bar_by_kind``.
    """
    if len(conversations) != len(outputs):
        raise ValueError(f"{len(conversations)} conversations but {len(outputs)} outputs; they must pair up")
    if not conversations:
        raise ValueError("no conversations to score")
    parsed = [parse_rubric(text, spec) for text in outputs]
    targets = [parse_rubric(conv.messages[-1]["content"], spec) for conv in conversations]
    target_scores = [conv.meta["scores"] for conv in conversations]

    metrics: dict[str, Any] = {"n": len(parsed), "valid_rate": sum(p.valid for p in parsed) / len(parsed)}
    maxima = {"total": spec.max_total, **{key: maximum for key, (maximum, _, _) in spec.criteria.items()}}
    metrics["agreement"] = {
        key: agreement([(p.total if key == "total" else p.scores[key]) if p.valid else None for p in parsed],
                       [float(t[key]) for t in target_scores], maximum)
        for key, maximum in maxima.items()
    }
    rouge = rouge_scores([_answer_text(p) if p.valid else "" for p in parsed], [_answer_text(t) for t in targets])
    metrics["feedback_rouge"] = {key: rouge[key] for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}

    kinds = [conv.meta.get("kind", "unknown") for conv in conversations]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in [k for k in KINDS if k in kinds] + sorted(set(kinds) - set(KINDS)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        predicted = [parsed[i].total for i in members if parsed[i].valid]
        by_kind[kind] = {"n": len(members), "n_valid": len(predicted),
                         "predicted_mean": statistics.fmean(predicted) if predicted else None,
                         "target_mean": statistics.fmean(target_scores[i]["total"] for i in members)}
    metrics["by_kind"] = by_kind

    rows = []
    for conv, p, target, kind in zip(conversations, parsed, target_scores, kinds):
        rows.append({
            "id": conv.meta.get("id"), "kind": kind, "ok": p.valid,
            "predicted": _scores_text(p.total, p.scores, spec) if p.valid else "invalid: " + "; ".join(p.problems[:2]),
            "target": _scores_text(target["total"], target, spec),
            "predicted_total": p.total if p.valid else None, "target_total": target["total"],
            "abs_error": abs(p.total - target["total"]) if p.valid else None, "problems": p.problems,
        })
    valid_rows = [r for r in rows if r["ok"]]
    plots = {
        "scatter_total": {"kind": "scatter", "x": [r["target_total"] for r in valid_rows],
                          "y": [r["predicted_total"] for r in valid_rows], "xlabel": "target total",
                          "ylabel": "predicted total", "title": "Total score: predicted vs target (valid answers)",
                          "limits": [0, spec.max_total]},
        "bar_by_kind": {"kind": "bar", "labels": list(by_kind),
                        "series": {"target": [v["target_mean"] for v in by_kind.values()],
                                   "predicted": [v["predicted_mean"] for v in by_kind.values()]},
                        "ylabel": "mean total", "title": "Mean total per student-summary kind"},
    }
    return {"metrics": metrics, "rows": rows, "plots": plots}


def summary_task(rubric: RubricSpec = SUMMARY_RUBRIC, name: str = "summary_eval") -> Task:
    """Task 1 with a rubric: its targets, prompts, guided decoding and metrics all follow ``rubric``.

    Args:
        rubric: :data:`~gemma_lowmem.tasks.summary_rubric.SUMMARY_RUBRIC`, or a teacher's own with some of
            :data:`MEASURED` as criteria (any maxima, labels and order).
        name: the ``--task`` name (``register_task`` it to train or grade with it).

    Returns:
        The task.

    Raises:
        UserError: the rubric has a criterion this task cannot measure.
    """
    check_rubric(rubric)
    request = Request(partial(grading_request, spec=rubric), required=("article",), may_be_empty=("summary",),
                      optional=("reference",))
    return Task(name, partial(build_datasets, spec=rubric), score_outputs=partial(score_outputs, spec=rubric),
                rubric=rubric, summary_statistics=partial(summary_statistics, spec=rubric), request=request)


TASK = summary_task()
