"""Task 3a, essay scoring (``--task essay``): essay (+ its prompt) -> rubric score and feedback.

Each conversation: (system) the rubric of :mod:`gemma_lowmem.tasks.essay_rubric` (claim 25, evidence 25,
counter-arguments 15, organisation 20, expression 15); (user) the writing prompt, when known, and the essay;
(assistant) the rubric answer, the only turn with loss. ``cut`` is the essay (shortened only when a conversation
would not fit ``max_seq_length`` at all; ASAP essays are at most ~5,000 characters).

Targets come from real human scores (ASAP-AES): the essay's score on its own scale ``[lo, hi]`` becomes the rubric
total ``R(100 * (score - lo) / (hi - lo))`` (``R`` rounds half up); the original score and scale stay in ``meta`` so
metrics are computed on the original scale. The total is split over the criteria by
:func:`~gemma_lowmem.tasks.essay_feedback.split_total`: where the data gives trait scores (ASAP set 2: language
conventions; set 7: ideas, organisation, style, conventions; set 8: ideas and content, organisation, voice, word
choice, sentence fluency, conventions) they weight the split (ideas -> claim, evidence and counter-arguments;
organisation -> organisation; the language traits -> expression); elsewhere the split is proportional to the
criteria's maxima. Feedback is written from measured features (:mod:`gemma_lowmem.tasks.essay_feedback`).
ASAP sets 3-8 are source-based or narrative, not argumentative; they keep the same rubric (their totals are the
human scores), so counter-argument comments there describe what the essay lacks for an argument.

Data: a local JSONL/CSV/Parquet file with ``essay`` (or ``full_text``/``text``), ``domain1_score`` (or ``score``),
the scale in ``score_min``/``score_max`` (or an ASAP ``essay_set`` 1-8, whose scales are known), optional ``prompt``
(else taken from an ``asap_prompts.json`` next to the file), ``essay_set``, ``essay_id`` and trait fields; the
bundled demo set; or the hub set ``tasksource/AES2-essay-scoring`` (columns ``full_text`` and ``score`` on 1-6,
assumed; a different layout stops with a message naming the fields). ASAP essays mark paragraphs with runs of four
or more spaces: those become blank lines, and shorter runs one space. Validation rows are held out per essay set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.evaluation.metrics import agreement, quadratic_weighted_kappa
from gemma_lowmem.evaluation.rubric import render_rubric
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.tasks import Request, Task
from gemma_lowmem.tasks.essay_feedback import essay_features, split_total, write_feedback
from gemma_lowmem.tasks.essay_rubric import CRITERIA_HELP, ESSAY_CRITERIA, ESSAY_RUBRIC, MAX_TOTAL
from gemma_lowmem.tasks.sources import BadRow, HubSet, LoadedRows, MissingField, Row, load_rows

log = logging.getLogger(__name__)

DEMO_FILE = Path(__file__).parents[1] / "data" / "demo" / "essay_demo.jsonl"
HUB = HubSet("tasksource/AES2-essay-scoring", None, "train", None)
HUB_SCALE = (1, 6)  # AES2 holistic scores
ASAP_SCALES = {1: (2, 12), 2: (1, 6), 3: (0, 3), 4: (0, 3), 5: (0, 4), 6: (0, 4), 7: (0, 30), 8: (0, 60)}
_TRAIT_SCALES = {7: (0, 3), 8: (1, 6)}  # per rater and trait
_LANGUAGE_TRAITS = {7: (3, 4), 8: (3, 4, 5, 6)}  # trait numbers that describe language (-> expression)
FIELDS = ("essay", "full_text", "text", "domain1_score", "score", "holistic_score", "score_min", "score_max",
          "essay_set", "prompt_id", "prompt_name", "essay_id", "id", "prompt", "traits", "domain2_score")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def to_rubric(score: float, lo: float, hi: float) -> int:
    """A score on ``[lo, hi]`` as a rubric total on 0-100 (half up)."""
    return _round(MAX_TOTAL * (score - lo) / (hi - lo))


def from_rubric(total: float, lo: float, hi: float) -> int:
    """A rubric total (0-100, clipped) back on the original scale: the nearest whole score within ``[lo, hi]``."""
    total = min(float(MAX_TOTAL), max(0.0, total))
    return int(min(hi, max(lo, _round(lo + total * (hi - lo) / MAX_TOTAL))))


# ------------------------------------------------------------------------------------------------------ loading


def _first(row: Row, keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if row.get(key) is not None and not (isinstance(row[key], str) and not row[key].strip()):
            return key, row[key]
    return None, None


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise BadRow(f"field '{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRow(f"field '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BadRow(f"field '{key}' must be a finite number, got {value!r}")
    return number


def clean_essay(text: str) -> str:
    """Paragraphs as blank-line-separated blocks: ASAP's runs of 4+ spaces become breaks when there are no line breaks.

    Args:
        text: the essay as stored.

    Returns:
        The essay with single spaces inside lines and one blank line between paragraphs.
    """
    if "\n" not in text.strip():
        text = re.sub(r" {4,}", "\n\n", text.strip())
    lines = [" ".join(line.split()) for line in text.strip().split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _asap_set(row: Row) -> int | None:
    """The row's ASAP essay set 1-8 (``3``, ``"3"`` or ``3.0``), or None."""
    value = row.get("essay_set")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    else:
        return None
    return number if number in ASAP_SCALES else None


def trait_strengths(row: Row, score: float, lo: float, hi: float) -> dict[str, float] | None:
    """Per-criterion strengths in [0, 1] from ASAP trait scores (module docstring), or None without traits.

    Args:
        row: the raw row (``essay_set``, ``traits`` with ``rater<r>_trait<t>`` keys, ``domain2_score``).
        score: the holistic score.
        lo: its scale's minimum.
        hi: its scale's maximum.

    Returns:
        Criterion -> strength, or None.
    """
    essay_set = _asap_set(row)
    if essay_set == 2 and row.get("domain2_score") is not None:
        overall = (score - lo) / (hi - lo)
        language = (_number("domain2_score", row["domain2_score"]) - 1) / 3  # language conventions, 1-4
        return {"claim": overall, "evidence": overall, "counter": overall, "organization": overall,
                "expression": min(1.0, max(0.0, language))}
    traits = row.get("traits")
    if essay_set not in _TRAIT_SCALES or not isinstance(traits, dict):
        return None
    t_lo, t_hi = _TRAIT_SCALES[essay_set]
    by_trait: dict[int, list[float]] = {}
    for key, value in traits.items():
        m = re.fullmatch(r"rater\d+_trait(\d+)", str(key))
        if m and value is not None:
            by_trait.setdefault(int(m.group(1)), []).append((_number(key, value) - t_lo) / (t_hi - t_lo))
    if 1 not in by_trait or 2 not in by_trait:
        return None
    mean = {t: sum(v) / len(v) for t, v in by_trait.items()}
    language = [mean[t] for t in _LANGUAGE_TRAITS[essay_set] if t in mean] or [mean[1]]
    ideas = min(1.0, max(0.0, mean[1]))
    return {"claim": ideas, "evidence": ideas, "counter": ideas, "organization": min(1.0, max(0.0, mean[2])),
            "expression": min(1.0, max(0.0, sum(language) / len(language)))}


def normalise_essay(row: Row, default_scale: tuple[float, float] | None = None) -> Row:
    """One raw row -> ``{"id", "set", "prompt", "essay", "score", "score_min", "score_max", "strengths"}``.

    Args:
        row: the raw row.
        default_scale: the scale when the row names none (the default hub set's).

    Returns:
        The normalised row.

    Raises:
        BadRow: a missing essay or score, an unknown scale, or a score outside its scale.
    """
    if not isinstance(row, dict):
        raise BadRow(f"expected an object with fields, got {type(row).__name__}")
    key, essay = _first(row, ("essay", "full_text", "text"))
    if not isinstance(essay, str):
        raise MissingField("essay", "missing essay text: give 'essay' (or 'full_text'/'text') "
                                    f"(fields present: {', '.join(row) or 'none'})")
    key, raw_score = _first(row, ("domain1_score", "score", "holistic_score"))
    if key is None:
        raise MissingField("score", "missing field 'domain1_score' (or 'score') "
                                    f"(fields present: {', '.join(row) or 'none'})")
    score = _number(key, raw_score)
    if row.get("score_min") is not None and row.get("score_max") is not None:
        lo, hi = _number("score_min", row["score_min"]), _number("score_max", row["score_max"])
    elif (essay_set := _asap_set(row)) is not None:
        lo, hi = ASAP_SCALES[essay_set]
    elif default_scale is not None:
        lo, hi = default_scale
    else:
        raise BadRow("the score's scale is unknown: give 'score_min' and 'score_max' (or an ASAP 'essay_set' 1-8)")
    if not lo < hi:
        raise BadRow(f"score_min {lo:g} must be below score_max {hi:g}")
    if not lo <= score <= hi:
        raise BadRow(f"field '{key}' = {score:g} is outside its scale [{lo:g}, {hi:g}]")
    essay = clean_essay(essay)
    _, row_id = _first(row, ("essay_id", "id"))
    if row_id is None:
        row_id = "essay-" + hashlib.sha1(essay.encode("utf-8")).hexdigest()[:10]
    _, essay_set = _first(row, ("essay_set", "prompt_id", "prompt_name"))
    prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
    return {"id": str(row_id), "set": str(essay_set) if essay_set is not None else "all",
            "prompt": " ".join(prompt.split()) if prompt else None, "essay": essay, "score": score,
            "score_min": lo, "score_max": hi, "strengths": trait_strengths(row, score, lo, hi)}


def _prompts_from_sibling(path: Path, rows: list[Any]) -> list[Any]:
    """Fill a missing ``prompt`` from an ``asap_prompts.json`` next to the data file (``{set: {"prompt": ...}}``)."""
    sibling = path.parent / "asap_prompts.json"
    if not sibling.exists() or all(isinstance(r, dict) and r.get("prompt") for r in rows if isinstance(r, dict)):
        return rows
    try:
        prompts = {str(k): v.get("prompt") for k, v in json.loads(sibling.read_text(encoding="utf-8")).items()
                   if isinstance(v, dict)}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        log.warning("%s: not a readable prompts file; essays keep no prompt", sibling)
        return rows
    return [{**r, "prompt": prompts.get(str(r.get("essay_set")))} if isinstance(r, dict) and not r.get("prompt")
            else r for r in rows]


def load_data(cfg: DataConfig) -> LoadedRows:
    """Training and validation essays (sources in the module docstring), validation held out per essay set.

    Args:
        cfg: the data configuration.

    Returns:
        Normalised rows (see :func:`normalise_essay`) and what was skipped.
    """
    default_scale = HUB_SCALE if not cfg.demo and not cfg.train_file and cfg.data in (None, HUB.name) else None
    data = load_rows(cfg, lambda row: normalise_essay(row, default_scale), fields=FIELDS, demo_file=DEMO_FILE, hub=HUB,
                     demo_val_fraction=0.25, group="set", balance="set", prepare=_prompts_from_sibling)
    log.info("%s: %d training essays, %d validation essays", data.source, len(data.train), len(data.val))
    return data


# ------------------------------------------------------------------------------------------------------ prompts


def system_prompt(lang: str = "ko") -> str:
    """The rubric the scorer follows: five criteria, 100 points in total."""
    ko = lang == "ko"
    if ko:
        lines = ["당신은 학생이 쓴 글을 채점하는 교사입니다. 과제에 맞추어 쓴 학생의 글을 다음 다섯 가지 기준으로 "
                 "평가하세요."]
        lines += [f"- {ko_label} ({m}점): {CRITERIA_HELP[k][1]}" for k, (m, ko_label, _) in ESSAY_CRITERIA.items()]
        lines.append("총점은 100점입니다. 총점, 기준별 점수와 한 문장 평가, 전체 피드백, 개선 제안을 정해진 형식으로 "
                     "답하세요.")
    else:
        lines = ["You are a teacher who grades students' essays. Score the student's essay, written for the given "
                 "task, on five criteria."]
        lines += [f"- {en} ({m} points): {CRITERIA_HELP[k][0]}" for k, (m, _, en) in ESSAY_CRITERIA.items()]
        lines.append("The total is 100 points. Give the total, each criterion's score with a one-sentence comment, "
                     "overall feedback and suggestions for improvement in the fixed format.")
    return "\n".join(lines)


def scoring_prompt(essay: str, prompt: str | None = None, lang: str = "ko") -> list[Message]:
    """Messages asking a trained scorer to grade an essay; the answer is left out.

    Args:
        essay: the essay.
        prompt: the writing task it answers (None: not shown).
        lang: ``"ko"`` or ``"en"``.

    Returns:
        System and user messages.
    """
    if lang == "ko":
        task = f"과제:\n{prompt}\n\n" if prompt else ""
        user = f"다음 학생의 글을 평가 기준에 따라 채점하고 피드백을 주세요.\n\n{task}학생의 글:\n{essay}"
    else:
        task = f"Task:\n{prompt}\n\n" if prompt else ""
        user = f"Score the following student essay against the rubric and give feedback.\n\n{task}Essay:\n{essay}"
    return [{"role": "system", "content": system_prompt(lang)}, {"role": "user", "content": user}]


def grading_request(row: Mapping[str, Any], cfg: DataConfig) -> list[Message]:
    """The messages that grade one new essay, as training shows essays (``Task.request``).

    Args:
        row: ``essay`` (its paragraphs laid out by :func:`clean_essay`) and an optional ``prompt``, the writing task
            (on one line).
        cfg: the training run's data configuration (``lang``).

    Returns:
        The messages of :func:`scoring_prompt`.
    """
    prompt = row.get("prompt")
    prompt = " ".join(prompt.split()) if isinstance(prompt, str) else None
    return scoring_prompt(clean_essay(row["essay"]), prompt or None, cfg.lang)


def target_answer(record: Row, lang: str) -> tuple[str, dict[str, int]]:
    """The rubric answer for a normalised row, and its scores (criteria and ``total``)."""
    total = to_rubric(record["score"], record["score_min"], record["score_max"])
    scores = split_total(total, record.get("strengths"))
    feedback, suggestions, comments = write_feedback(essay_features(record["essay"]), scores, lang)
    return render_rubric(scores, feedback, suggestions, comments, lang, ESSAY_RUBRIC), {**scores, "total": total}


def build_conversation(record: Row, lang: str) -> Conversation:
    """One scoring conversation; ``meta`` holds mode, id, set, the original score and scale, and the targets."""
    answer, scores = target_answer(record, lang)
    messages = scoring_prompt(record["essay"], record.get("prompt"), lang) + [{"role": "assistant",
                                                                               "content": answer}]
    meta = {"mode": "score", "id": record["id"], "set": record["set"], "score": record["score"],
            "score_min": record["score_min"], "score_max": record["score_max"], "scores": scores, "lang": lang}
    return Conversation(messages, cut=record["essay"], meta=meta)


def build_datasets(cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """The training script's entry: (train, validation) scoring conversations.

    Args:
        cfg: the data configuration.
        seed: unused (targets follow from the human scores alone); kept for the task interface.

    Returns:
        Training and validation conversations.
    """
    data = load_data(cfg)
    return [build_conversation(r, cfg.lang) for r in data.train], [build_conversation(r, cfg.lang) for r in data.val]


def summary_statistics(conversations: list[Conversation]) -> dict[str, Any]:
    """Target statistics for the prepare-data script.

    Args:
        conversations: from :func:`build_datasets`.

    Returns:
        ``{"conversations": n, "sets": {set: {"n", "scale", "mean_score", "mean_total"}}, "scores": {criterion or
        "total": {"mean", "min", "max"}}}``.
    """
    sets: dict[str, dict[str, Any]] = {}
    for set_id in sorted({c.meta["set"] for c in conversations}, key=str):
        metas = [c.meta for c in conversations if c.meta["set"] == set_id]
        sets[set_id] = {"n": len(metas), "scale": [metas[0]["score_min"], metas[0]["score_max"]],
                        "mean_score": statistics.fmean(m["score"] for m in metas),
                        "mean_total": statistics.fmean(m["scores"]["total"] for m in metas)}
    scores = {}
    for key in (*ESSAY_CRITERIA, "total"):
        values = [c.meta["scores"][key] for c in conversations]
        if values:
            scores[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    return {"conversations": len(conversations), "sets": sets, "scores": scores}


# ------------------------------------------------------------------------------------------------------ scoring


def score_outputs(conversations: list[Conversation], outputs: list[str]) -> dict[str, Any]:
    """Agreement of the scorer's totals with the human scores.

    Per essay set, on the original scale (predicted totals mapped back with :func:`from_rubric`): ``qwk``
    (quadratic weighted kappa over the scale's whole numbers), ``spearman``, ``mae``, ``n``, ``n_valid``. Overall:
    ``mean_qwk`` (plain mean over sets with a defined kappa), ``valid_rate`` (answers that parse as a complete,
    consistent rubric), ``total_rate`` (a total could be read; those are the pairs scored), and on the 0-100 rubric
    scale ``qwk_rubric``, ``spearman_rubric``, ``pearson_rubric``, ``mae_rubric``; ``criteria_mae`` per criterion.

    Args:
        conversations: from :func:`build_datasets`.
        outputs: the scorer's answers, one per conversation.

    Returns:
        ``{"metrics": {...}, "rows": [...], "plots": {"scores": scatter of human vs predicted rubric totals}}``.
    """
    if len(conversations) != len(outputs):
        raise ValueError(f"{len(conversations)} conversations but {len(outputs)} outputs; they must pair up")
    parsed = [parse_rubric(o, ESSAY_RUBRIC) for o in outputs]
    pred_total = [p.total if p.total is not None and math.isfinite(p.total) else None for p in parsed]
    rows = []
    for conv, p, total, out in zip(conversations, parsed, pred_total, outputs):
        m = conv.meta
        rows.append({"id": m["id"], "set": m["set"], "human": m["score"], "human_total": m["scores"]["total"],
                     "pred": None if total is None else from_rubric(total, m["score_min"], m["score_max"]),
                     "pred_total": total, "valid": p.valid, "problems": p.problems, "output": out})
    per_set: dict[str, dict[str, Any]] = {}
    for set_id in sorted({r["set"] for r in rows}, key=str):
        members = [(r, c.meta) for r, c in zip(rows, conversations) if r["set"] == set_id]
        lo, hi = members[0][1]["score_min"], members[0][1]["score_max"]
        pairs = [(r["pred"], _round(r["human"])) for r, _ in members if r["pred"] is not None]
        stats = agreement([r["pred"] for r, _ in members], [r["human"] for r, _ in members], max_score=hi - lo)
        qwk = quadratic_weighted_kappa([p for p, _ in pairs], [h for _, h in pairs], int(lo), int(hi)) \
            if len(pairs) >= 2 else None
        per_set[set_id] = {"n": len(members), "n_valid": len(pairs), "qwk": qwk, "spearman": stats["spearman"],
                           "mae": stats["mae"]}
    rubric = agreement(pred_total, [r["human_total"] for r in rows], MAX_TOTAL)
    kappas = [s["qwk"] for s in per_set.values() if s["qwk"] is not None]
    criteria_mae = {}
    for key in ESSAY_CRITERIA:
        errors = [abs(p.scores[key] - c.meta["scores"][key]) for p, c in zip(parsed, conversations)
                  if p.scores[key] is not None and math.isfinite(p.scores[key])]
        criteria_mae[key] = sum(errors) / len(errors) if errors else None
    n = len(outputs)
    metrics = {"n": n, "valid_rate": sum(p.valid for p in parsed) / n if n else None,
               "total_rate": rubric["valid_rate"], "mean_qwk": sum(kappas) / len(kappas) if kappas else None,
               "qwk_rubric": rubric["qwk"], "spearman_rubric": rubric["spearman"],
               "pearson_rubric": rubric["pearson"], "mae_rubric": rubric["mae"], "per_set": per_set,
               "criteria_mae": criteria_mae}
    scored = [r for r in rows if r["pred_total"] is not None]
    plots = {"scores": {"kind": "scatter", "x": [r["human_total"] for r in scored],
                        "y": [r["pred_total"] for r in scored], "xlabel": "human score (rubric scale, 0-100)",
                        "ylabel": "predicted score (0-100)", "limits": [0, MAX_TOTAL],
                        "title": "essay scores: human vs predicted"}}
    return {"metrics": metrics, "rows": rows, "plots": plots}


TASK = Task("essay", build_datasets, score_outputs=score_outputs, rubric=ESSAY_RUBRIC,
            summary_statistics=summary_statistics, request=Request(grading_request, required=("essay",),
                                                                  optional=("prompt",)))
