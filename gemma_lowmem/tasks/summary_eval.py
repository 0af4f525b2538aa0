"""Task 1, summary evaluation: data, target scores and prompts for a rubric evaluator of student summaries.

Each training conversation follows the seed's format: (system) the rubric; (user) the article and a request for a
3-4 sentence summary; (assistant) a student's summary; (user) a request to evaluate it against the reference summary,
which this turn gives; (assistant) the rubric evaluation, the only turn that carries the loss.

News data sets hold no student summaries, so :mod:`gemma_lowmem.tasks.student_summaries` writes them (eight kinds,
each recording its edits) and :func:`score_summary` scores them from measurable facts. ``R(x)`` rounds half up;
``clip`` clips to [0, 1]; *content tokens* are the lowercased words and numbers of a text without English stopwords
and one-letter words (:func:`~gemma_lowmem.text.content_tokens`).

- coverage (0-40) = ``R(40 * clip((r - 0.05) / 0.85))``, ``r`` = ROUGE-1 recall of the reference's content tokens
  by the summary's content tokens (``rouge_pair``; Porter stems for English). Near-copies of the reference
  (``r`` about 0.95) get 40; another article's summary (``r`` about 0.02) gets 0.
- accuracy (0-30) = ``R(30 * c * clip(1 - 0.35 * E - max(0, u - 0.1) / 0.4))``: ``E`` = facts changed or invented
  (from the edit record), ``u`` = fraction of the summary's content tokens found neither in the article nor in the
  reference (counted before grammar noise, synonyms put in by rewording count as found), ``c`` = ``min(1, n / 8)``
  with ``n`` the summary's content tokens (an empty summary shows no accurate content).
- conciseness (0-20) = ``R(20 * clip(1 - L - S - x / 2) - P)`` clipped to [0, 20]: ``rho`` = summary characters /
  reference characters, ``L`` = ``clip((rho - 1.3) / 2.2)`` (too long), ``S`` = ``clip((0.6 - rho) / 0.5)`` (too
  short), ``x`` = share of the summary's characters in sentences that share under 25% of their content tokens with
  the reference (unrelated detail), ``P`` = ``min(6, 2 * max(0, 3 - k) + max(0, k - 4))`` for ``k`` sentences
  against the requested 3-4.
- grammar (0-10) = ``R(10 * c * max(0, 1 - 0.15 * N))``, ``N`` = injected word-order swaps, dropped words and typos.
- total = the sum of the four.

Feedback, suggestions and the one-line comment per criterion are written from the same edits and measurements
(Korean for ``lang="ko"``, English for ``"en"``), so they name the defect: "The summary says '12 deaths', but the
article says '21 deaths'." / "요약의 '12명' 부분이 틀렸습니다. 기사에 따르면 '21명'입니다."
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.metrics import agreement
from gemma_lowmem.evaluation.rouge import rouge_pair, rouge_scores
from gemma_lowmem.evaluation.rubric import CRITERIA, MAX_TOTAL, SUMMARY_RUBRIC, parse_rubric, render_rubric_spans
from gemma_lowmem.tasks import Task
from gemma_lowmem.tasks.sources import HubSet, LoadedRows, MissingField, Row, load_rows
from gemma_lowmem.tasks.student_summaries import (
    KINDS,
    ArticleIndex,
    StudentSummary,
    clean_reference,
    make_student_summary,
)
from gemma_lowmem.text import content_tokens, cut_at_sentence_end, detect_lang, split_sentences

log = logging.getLogger(__name__)

HUB = HubSet("abisee/cnn_dailymail", "3.0.0")
DEMO_FILE = Path(__file__).parents[1] / "data" / "demo" / "summary_demo.jsonl"
DEMO_VAL_FRACTION = 0.2  # the demo set is small: 1 row in 5 for validation
HOLDOUT_FRACTION = 0.1  # held out of a training file when no validation file is given
FIELDS = ("id", "article", "highlights", "lang")  # what --columns may map


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


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def score_summary(summary: StudentSummary, article: str, reference: str) -> tuple[dict[str, int], dict[str, Any]]:
    """Score a student summary from measurable facts (formulas in the module docstring).

    Args:
        summary: the summary and its edit record.
        article: the article (as shown to the model).
        reference: the reference summary, one sentence per line.

    Returns:
        ``scores``: coverage, accuracy, conciseness, grammar and total (integers); ``facts``: the measurements
        behind them (``recall``, ``unsupported``, ``unsupported_words``, ``content``, ``sentences``,
        ``length_ratio``, ``unrelated``, ``conciseness_losses``, ``factual_errors``, ``noise``).
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
    # Points each conciseness defect costs; the comment names the largest.
    losses = {"long": 20 * _clip((rho - 1.3) / 2.2), "short": 20 * _clip((0.6 - rho) / 0.5), "unrelated": 10 * x,
              "count": min(6, 2 * max(0, 3 - k) + max(0, k - 4))}

    scores = {
        "coverage": _round(40 * _clip((recall - 0.05) / 0.85)),
        "accuracy": _round(30 * c * _clip(1 - 0.35 * summary.factual_errors - max(0.0, u - 0.1) / 0.4)),
        "conciseness": min(20, max(0, _round(
            20 * _clip(1 - (losses["long"] + losses["short"] + losses["unrelated"]) / 20) - losses["count"]))),
        "grammar": _round(10 * c * max(0.0, 1 - 0.15 * summary.noise)),
    }
    scores["total"] = sum(scores.values())
    as_written = dict(zip(clean_tokens, content_tokens(summary.clean_text, keep_case=True)))
    facts = {"recall": recall, "unsupported": u,
             "unsupported_words": [as_written[t] for t in dict.fromkeys(unsupported)][:3],
             "content": len(sum_tokens), "sentences": k, "length_ratio": rho, "unrelated": x,
             "conciseness_losses": losses, "factual_errors": summary.factual_errors, "noise": summary.noise}
    return scores, facts


# --------------------------------------------------------------------------------------------------------- feedback


def _short(text: str, limit: int = 70) -> str:
    """``text`` on one line, without end punctuation or outer quotes, cut to ``limit`` characters at a space."""
    text = " ".join(text.split()).strip(" .'\"“”‘’")
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit] + "…"


def _missed_sentence(summary: str, reference: str) -> str | None:
    """The reference sentence the summary covers least (None when it covers each at least half)."""
    have = set(content_tokens(summary))
    best, best_share = None, 0.5
    for sent in split_sentences(reference):
        toks = set(content_tokens(sent))
        share = len(toks & have) / len(toks) if toks else 1.0
        if share < best_share:
            best, best_share = sent, share
    return best


_T = {  # (English, Korean) message templates
    "open_3": ("An excellent summary.", "훌륭한 요약입니다."),
    "open_2": ("A good summary with a few weaknesses.", "전반적으로 좋은 요약이지만 아쉬운 점이 있습니다."),
    "open_1": ("The summary has clear problems.", "요약에 분명한 문제가 있습니다."),
    "open_0": ("The summary does not do its job.", "요약으로서 제 역할을 하지 못합니다."),
    "good_reworded": ("It restates the reference's main points in its own words.",
                      "참고 요약의 핵심 내용을 자기 말로 잘 정리했습니다."),
    "good_close": ("It states the reference's main points clearly.", "참고 요약의 핵심 내용을 분명하게 담았습니다."),
    "swap": ("The summary says '{to}', but the article says '{frm}'.",
             "요약의 '{to}' 부분이 틀렸습니다. 기사에 따르면 '{frm}'입니다."),
    "invent": ("It states '{text}', which the article does not support.",
               "'{text}'라는 내용은 기사에 근거가 없습니다."),
    "dropped": ("It leaves out key points of the reference, such as '{text}'.",
                "'{text}' 같은 핵심 내용이 빠져 있습니다."),
    "minor": ("Instead it spends a sentence on a minor detail ('{text}').",
              "대신 '{text}' 같은 부차적인 내용을 넣었습니다."),
    "lead": ("It copies the article's first {n} sentences instead of selecting the main points.",
             "기사의 앞 {n}문장을 그대로 옮겨 적어 핵심을 골라내지 못했습니다."),
    "missed": ("It misses, for example: '{text}'.", "예를 들어 '{text}' 내용이 빠져 있습니다."),
    "irrelevant": ("It adds {n} sentences of side detail (e.g. '{text}') and is {rho:.1f} times as long as the "
                   "reference.", "'{text}' 같은 부수적인 문장 {n}개를 덧붙여 참고 요약보다 {rho:.1f}배 깁니다."),
    "filler": ("The opening sentence ('{text}') says nothing about the article.",
               "첫 문장('{text}')은 기사 내용과 관계없는 군더더기입니다."),
    "noise": ("It has {n} language error{s} ({detail}), e.g. {example}.",
              "표현 오류가 {n}개 있습니다({detail}). 예: {example}."),
    "off_topic": ("The summary is about a different story: words such as {words} do not appear in the article.",
                  "요약이 다른 기사의 내용입니다: {words} 같은 단어는 기사에 나오지 않습니다."),
    "off_topic_plain": ("The summary is about a different story.", "요약이 이 기사가 아닌 다른 내용을 다룹니다."),
    "empty": ("The summary is empty.", "요약이 비어 있습니다."),
    "one_word": ("The summary is a single word ('{word}') and says nothing about the article's content.",
                 "요약이 한 단어('{word}')뿐이어서 기사 내용을 전달하지 못합니다."),
    "unsupported": ("Some words (e.g. {words}) appear neither in the article nor in the reference.",
                    "{words} 같은 단어는 기사에도 참고 요약에도 없습니다."),
    "too_many": ("It has {n} sentences, more than the requested 3-4.", "요청한 3-4문장보다 많은 {n}문장입니다."),
    "too_few": ("It has only {n} sentence{s}, fewer than the requested 3-4.", "요청한 3-4문장보다 적은 {n}문장입니다."),
    "clear": ("Its sentences are clear and grammatical.", "문장은 명확하고 문법적으로 바릅니다."),
    # suggestions
    "s_swap": ("Check numbers and names against the article ('{to}' -> '{frm}').",
               "숫자와 이름을 기사와 다시 대조하세요('{to}' → '{frm}')."),
    "s_invent": ("Remove claims the article does not make ('{text}').", "기사에 없는 내용('{text}')은 빼세요."),
    "s_dropped": ("Add the missing key point: {text}.", "빠진 핵심 내용을 넣으세요: {text}."),
    "s_minor": ("Replace minor details with the article's main points.",
                "부차적인 내용 대신 기사의 핵심 내용을 쓰세요."),
    "s_lead": ("Read the whole article and choose its most important points instead of copying the opening.",
               "기사 앞부분을 옮겨 적지 말고 전체를 읽은 뒤 가장 중요한 내용을 골라 쓰세요."),
    "s_irrelevant": ("Cut side details and keep to 3-4 sentences on the main points.",
                     "부수적인 내용은 빼고 핵심만 3-4문장으로 쓰세요."),
    "s_filler": ("Start directly with the main point; drop introductory filler.",
                 "군더더기 도입 문장 없이 핵심부터 쓰세요."),
    "s_noise": ("Proofread for spelling, missing words and word order (e.g. {example}).",
                "맞춤법, 빠진 단어, 어순을 다시 확인하세요(예: {example})."),
    "s_off_topic": ("Summarize this article, starting with its main point: {text}.",
                    "이 기사의 내용을 요약하세요. 핵심부터 쓰세요: {text}."),
    "s_empty": ("Write 3-4 complete sentences that cover the article's main points.",
                "기사의 핵심 내용을 담아 3-4개의 완전한 문장으로 쓰세요."),
    "s_too_many": ("Merge or cut sentences to stay within 3-4.", "문장을 합치거나 줄여 3-4문장으로 맞추세요."),
    "s_too_few": ("Use the requested 3-4 sentences to include the other key points.",
                  "요청한 3-4문장을 채워 다른 핵심 내용도 담으세요."),
    "s_too_few_covered": ("Write the requested 3-4 sentences.", "요청한 대로 3-4문장으로 쓰세요."),
    "s_keep": ("Keep this approach: the main event first, then the key details.",
               "지금처럼 핵심 사건을 먼저 쓰고 주요 세부 내용을 덧붙이는 구성을 유지하세요."),
    "s_unsupported": ("Use only information from the article.", "기사에 있는 정보만 사용하세요."),
    # comments per criterion
    "c_cov_high": ("Covers nearly all key points of the reference (about {p}% of its content words).",
                   "참고 요약의 핵심 내용을 거의 모두 담았습니다(내용어의 약 {p}%)."),
    "c_cov_mid": ("Covers some key points but misses others (about {p}% of the reference's content words).",
                  "핵심 내용 일부만 담고 나머지는 빠졌습니다(참고 요약 내용어의 약 {p}%)."),
    "c_cov_low": ("Misses most key points (only about {p}% of the reference's content words).",
                  "핵심 내용 대부분이 빠졌습니다(참고 요약 내용어의 약 {p}%만 포함)."),
    "c_cov_none": ("Hardly any key point of the reference appears ({p}%).",
                   "참고 요약의 핵심 내용이 거의 없습니다({p}%)."),
    "c_acc_none": ("There is no content to check against the article.", "기사와 대조할 내용이 없습니다."),
    "c_acc_little": ("Too little content to show accurate understanding.",
                     "정확성을 판단하기에는 내용이 너무 적습니다."),
    "c_acc_errors": ("Facts that differ from the article: {n}.", "기사와 다른 사실이 {n}개 있습니다."),
    "c_acc_unsupported": ("About {p}% of the content words are not found in the article.",
                          "내용어의 약 {p}%가 기사에 없는 내용입니다."),
    "c_acc_ok": ("All facts agree with the article.", "모든 사실이 기사와 일치합니다."),
    "c_con_empty": ("Far too short to be a summary.", "요약이라고 하기에는 너무 짧습니다."),
    "c_con_long": ("Too long: {k} sentences, {rho:.1f} times the length of the reference.",
                   "너무 깁니다: {k}문장으로 참고 요약의 {rho:.1f}배 길이입니다."),
    "c_con_longish": ("A little long: {rho:.1f} times the length of the reference.",
                      "조금 깁니다: 참고 요약의 {rho:.1f}배 길이입니다."),
    "c_con_short": ("Too short: {n} sentence{s}, {rho:.1f} of the reference's length.",
                    "너무 짧습니다: {n}문장으로 참고 요약 길이의 {rho:.1f}배입니다."),
    "c_con_unrelated": ("About {p}% of the text is detail unrelated to the main points.",
                        "글의 약 {p}%가 핵심과 관계없는 내용입니다."),
    "c_con_count": ("{k} sentences instead of the requested 3-4.", "요청한 3-4문장이 아닌 {k}문장입니다."),
    "c_con_ok": ("An appropriate length of {k} sentences without unnecessary content.",
                 "불필요한 내용 없이 {k}문장의 적절한 길이입니다."),
    "c_gra_none": ("Too little text to judge the expression.", "표현을 판단하기에는 글이 너무 짧습니다."),
    "c_gra_errors": ("{n} language error{s} ({detail}).", "표현 오류가 {n}개 있습니다({detail})."),
    "c_gra_ok": ("Clear and grammatical sentences.", "문장이 명확하고 문법적으로 바릅니다."),
}


def _t(key: str, lang: str, **kw: Any) -> str:
    """Fill the template ``key`` in ``lang``; ``{s}`` is the English plural ending for ``n``."""
    return _T[key][lang == "ko"].format(s="" if kw.get("n") == 1 else "s", **kw)


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _noise_detail(edit: dict[str, Any], lang: str) -> tuple[str, str]:
    """("2 word-order errors, 1 typo", "'strnger' instead of 'stranger'") for a noise edit."""
    names = {"word_swaps": ("word-order error", "word-order errors", "어순 오류"),
             "dropped_words": ("missing word", "missing words", "빠진 단어"), "typos": ("typo", "typos", "오타")}
    if lang == "ko":
        detail = ", ".join(f"{ko} {edit[k]}개" for k, (_, _, ko) in names.items() if edit[k])
    else:
        detail = ", ".join(_count(edit[k], one, many) for k, (one, many, _) in names.items() if edit[k])
    examples = edit["examples"]
    ex = next((e for e in examples if e["op"] != "dropped_words"), examples[0] if examples else None)
    if ex is None:
        return detail, ""
    if ex["op"] == "dropped_words":
        example = f"'{ex['from']}' 누락" if lang == "ko" else f"'{ex['from']}' is missing"
    elif lang == "ko":
        example = f"'{ex['from']}' 대신 '{ex['to']}'"
    else:
        example = f"'{ex['to']}' instead of '{ex['from']}'"
    return detail, example


def write_feedback(summary: StudentSummary, reference: str, scores: dict[str, int], facts: dict[str, Any],
                   lang: str) -> tuple[str, str, dict[str, str]]:
    """Feedback, suggestions and per-criterion comments that name the summary's defects.

    Args:
        summary: the summary and its edits.
        reference: the reference summary, one sentence per line.
        scores: from :func:`score_summary`.
        facts: from :func:`score_summary`.
        lang: ``"ko"`` or ``"en"``.

    Returns:
        ``(feedback paragraph, suggestions as "- " bullets, {criterion: one-sentence comment})``.
    """
    total = scores["total"]
    notes: list[str] = []
    tips: list[str] = []
    k, rho = facts["sentences"], facts["length_ratio"]
    for e in summary.edits:
        op = e["op"]
        if op == "swap":
            notes.append(_t("swap", lang, to=e["context_to"], frm=e["context_from"]))
            tips.append(_t("s_swap", lang, to=e["to"], frm=e["from"]))
        elif op == "invent":
            notes.append(_t("invent", lang, text=_short(e["text"])))
            tips.append(_t("s_invent", lang, text=_short(e["text"], 40)))
        elif op == "drop_sentences" and e["dropped"]:
            notes.append(_t("dropped", lang, text=_short(e["dropped"][0])))
            tips.append(_t("s_dropped", lang, text=_short(e["dropped"][0])))
        elif op == "add_minor_detail":
            notes.append(_t("minor", lang, text=_short(e["sentence"], 50)))
            tips.append(_t("s_minor", lang))
        elif op == "lead":
            notes.append(_t("lead", lang, n=e["sentences"]))
            tips.append(_t("s_lead", lang))
            missed = _missed_sentence(summary.text, reference)
            if missed:
                notes.append(_t("missed", lang, text=_short(missed)))
        elif op == "add_irrelevant":
            notes.append(_t("irrelevant", lang, n=len(e["sentences"]), text=_short(e["sentences"][0], 50), rho=rho))
            tips.append(_t("s_irrelevant", lang))
        elif op == "add_filler":
            notes.append(_t("filler", lang, text=_short(e["sentence"], 50)))
            tips.append(_t("s_filler", lang))
        elif op == "noise" and summary.noise:
            detail, example = _noise_detail(e, lang)
            notes.append(_t("noise", lang, n=summary.noise, detail=detail, example=example))
            tips.append(_t("s_noise", lang, example=example))
        elif op == "other_reference":
            words = ", ".join(f"'{w}'" for w in facts["unsupported_words"][:2])
            notes.append(_t("off_topic", lang, words=words) if words else _t("off_topic_plain", lang))
            tips.append(_t("s_off_topic", lang, text=_short(split_sentences(reference)[0])))
        elif op in ("empty", "one_word"):
            notes.append(_t("empty", lang) if op == "empty" else _t("one_word", lang, word=e["word"]))
            tips.append(_t("s_empty", lang))
    if summary.kind not in ("off_topic", "empty") and facts["unsupported"] > 0.1 and facts["unsupported_words"]:
        notes.append(_t("unsupported", lang, words=", ".join(f"'{w}'" for w in facts["unsupported_words"][:2])))
        tips.append(_t("s_unsupported", lang))
    if summary.kind != "empty" and (k > 4 or k < 3):
        notes.append(_t("too_many" if k > 4 else "too_few", lang, n=k))
        tips.append(_t("s_too_many" if k > 4 else "s_too_few" if facts["recall"] < 0.85 else "s_too_few_covered",
                       lang))
    band = 3 if total >= 90 else 2 if total >= 75 else 1 if total >= 50 else 0
    if notes or any(scores[key] < 0.75 * CRITERIA[key][0] for key in CRITERIA):  # a defect: not "excellent"
        band = min(band, 2)
    if not notes:
        reworded = any(e["op"] in ("synonym", "reorder_sentences", "reorder_clause") for e in summary.edits)
        notes.append(_t("good_reworded" if reworded else "good_close", lang))
    notes.insert(0, _t(f"open_{band}", lang))
    if scores["grammar"] == 10 and summary.kind != "empty":
        notes.append(_t("clear", lang))
    tips = list(dict.fromkeys(tips))[:3] or [_t("s_keep", lang)]
    return " ".join(notes), "\n".join(f"- {tip}" for tip in tips), _comments(summary, facts, lang)


def _comments(summary: StudentSummary, facts: dict[str, Any], lang: str) -> dict[str, str]:
    p = _round(100 * facts["recall"])
    cov = "c_cov_high" if facts["recall"] >= 0.85 else "c_cov_mid" if facts["recall"] >= 0.5 else (
        "c_cov_low" if facts["recall"] >= 0.15 else "c_cov_none")
    if facts["content"] == 0:
        acc = _t("c_acc_none", lang)
    elif facts["content"] < 8:
        acc = _t("c_acc_little", lang)
    elif facts["factual_errors"]:
        acc = _t("c_acc_errors", lang, n=facts["factual_errors"])
    elif facts["unsupported"] > 0.1:
        acc = _t("c_acc_unsupported", lang, p=_round(100 * facts["unsupported"]))
    else:
        acc = _t("c_acc_ok", lang)
    k, rho = facts["sentences"], facts["length_ratio"]
    losses = facts["conciseness_losses"]
    worst = max(losses, key=losses.get)
    if facts["content"] < 2:
        con = _t("c_con_empty", lang)
    elif losses[worst] < 1:
        con = _t("c_con_ok", lang, k=k)
    elif worst == "long":
        con = _t("c_con_long" if losses["long"] >= 4 else "c_con_longish", lang, k=k, rho=rho)
    elif worst == "short":
        con = _t("c_con_short", lang, n=k, rho=rho)
    elif worst == "unrelated":
        con = _t("c_con_unrelated", lang, p=_round(100 * facts["unrelated"]))
    else:
        con = _t("c_con_count", lang, k=k)
    if facts["content"] < 2:
        gra = _t("c_gra_none", lang)
    elif summary.noise:
        noise_edit = next(e for e in summary.edits if e["op"] == "noise")
        gra = _t("c_gra_errors", lang, n=summary.noise, detail=_noise_detail(noise_edit, lang)[0])
    else:
        gra = _t("c_gra_ok", lang)
    return {"coverage": _t(cov, lang, p=p), "accuracy": acc, "conciseness": con, "grammar": gra}


# ---------------------------------------------------------------------------------------------------------- prompts

_CRITERIA_HELP = {
    "coverage": ("does it include all key points of the article?", "기사의 핵심 내용을 빠짐없이 담았는가"),
    "accuracy": ("are there no facts that differ from or are missing in the article?",
                 "기사와 다른 사실이나 기사에 없는 내용이 없는가"),
    "conciseness": ("is it 3-4 sentences long, without unnecessary content?",
                    "불필요한 내용 없이 요청한 3-4문장 길이로 썼는가"),
    "grammar": ("are grammar, spelling and word order correct and the wording natural?",
                "문법, 맞춤법, 어순이 바르고 표현이 자연스러운가"),
}


def system_prompt(lang: str = "ko") -> str:
    """The rubric the evaluator follows: four criteria worth 40/30/20/10 points, 100 in total.

    Args:
        lang: ``"ko"`` or ``"en"``.

    Returns:
        The system text.
    """
    ko = lang == "ko"
    lines = ["당신은 학생이 쓴 뉴스 기사 요약을 채점하는 교사입니다. 학생의 요약을 기사 및 참고 요약과 비교하여 "
             "다음 네 가지 기준으로 평가하세요." if ko else
             "You are a teacher who grades students' summaries of news articles. Compare the student's summary "
             "with the article and the reference summary and score it on four criteria."]
    for key, (maximum, label_ko, label_en) in CRITERIA.items():
        unit = "점" if ko else " points"
        lines.append(f"- {label_ko if ko else label_en} ({maximum}{unit}): {_CRITERIA_HELP[key][ko]}")
    if ko:
        lines.append("총점은 100점입니다. 총점, 기준별 점수와 한 문장 평가, 전체 피드백, 개선 제안을 정해진 형식으로 "
                     "답하세요.")
    else:
        lines.append("The total is 100 points. Give the total, each criterion's score with a one-sentence comment, "
                     "overall feedback and suggestions for improvement in the fixed format.")
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


def evaluation_prompt(article: str, student_summary: str, reference: str | None, lang: str = "ko"
                      ) -> list[Message]:
    """The messages that ask a trained evaluator to grade a new (article, summary) pair; the answer is left out.

    Args:
        article: the article.
        student_summary: the summary to grade.
        reference: the reference summary (CNN/DailyMail highlights are cleaned to one sentence per line); None or
            empty: the request asks to compare with the article alone and shows no reference section (training
            shows such requests in ``data.no_reference_share`` of its conversations).
        lang: prompt language, ``"ko"`` or ``"en"``.

    Returns:
        System, user, assistant (the summary) and user messages, ready for the chat template.
    """
    if lang not in ("ko", "en"):
        raise UserError(f"lang={lang!r} is not one of ko, en")
    return [
        {"role": "system", "content": system_prompt(lang)},
        {"role": "user", "content": summary_request(article, lang)},
        {"role": "assistant", "content": student_summary},
        {"role": "user", "content": evaluation_request(clean_reference(reference or ""), lang)},
    ]


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
                       show_reference: bool = True, score_loss_weight: int = 1) -> Conversation:
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
    scores, facts = score_summary(summary, article, reference)
    feedback, suggestions, comments = write_feedback(summary, reference, scores, facts, lang)
    answer, spans = render_rubric_spans({key: scores[key] for key in CRITERIA}, feedback, suggestions, comments, lang)
    messages = evaluation_prompt(article, summary.text, reference if show_reference else None, lang)
    messages.append({"role": "assistant", "content": answer})
    meta = {"kind": kind, "scores": scores, "id": record.get("id"), "lang": lang, "edits": summary.edits}
    weights = [(a, b, score_loss_weight) for a, b in spans] if score_loss_weight != 1 else []
    return Conversation(messages=messages, cut=article, meta=meta, answer_weights=weights)


def build_conversations(records: list[dict[str, Any]], lang: str, seed: int, no_reference_share: float = 0.0,
                        score_loss_weight: int = 1, kinds_per_row: int = 1) -> list[Conversation]:
    """Conversations for a list of rows, kinds assigned by :func:`assign_kinds`.

    Args:
        records: rows with ``article`` and ``highlights`` (e.g. from :func:`load_data`).
        lang: prompt and feedback language.
        seed: the seed; each row's summary depends only on the seed, its kind and its article.
        no_reference_share: this share of the conversations (a seeded draw) asks to grade without the reference.
        score_loss_weight: as in :func:`build_conversation`.
        kinds_per_row: student summaries per row, each of a different kind (at most ``len(KINDS)``).

    Returns:
        ``kinds_per_row`` passes over the rows, each in row order, with one conversation per row; the off-topic
        summary of row ``i`` is the reference of row ``i + n // 2`` (modulo ``n``).
    """
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
                                      score_loss_weight=score_loss_weight))
    return out


def build_datasets(cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Load the rows named by ``cfg`` and build (train, validation) conversations; the training script's entry.

    Args:
        cfg: the data configuration (source, language, sample limits, article length).
        seed: the seed for summary kinds and edits.

    Returns:
        Training and validation conversations.
    """
    data = load_data(cfg)
    log.info("%s: %d training rows, %d validation rows", data.source, len(data.train), len(data.val))
    settings = {"no_reference_share": cfg.no_reference_share, "score_loss_weight": cfg.score_loss_weight}
    # Validation keeps one summary per row, so its kinds and metrics do not depend on the training recipe.
    return (build_conversations(data.train, cfg.lang, seed, kinds_per_row=cfg.kinds_per_row, **settings),
            build_conversations(data.val, cfg.lang, seed, **settings))


def summary_statistics(conversations: list[Conversation]) -> dict[str, Any]:
    """Counts per kind and the spread of each criterion, for the prepare-data script.

    Args:
        conversations: from :func:`build_conversations`.

    Returns:
        ``{"conversations": n, "kinds": {kind: count}, "scores": {criterion or "total": {"mean", "std", "min",
        "max"}}, "mean_total_by_kind": {kind: mean}}`` (population std).
    """
    kinds = Counter(c.meta["kind"] for c in conversations)
    scores: dict[str, dict[str, float]] = {}
    for key in (*CRITERIA, "total"):
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


def _scores_text(total: float | None, scores: dict[str, float | None]) -> str:
    """``"78 (32/24/14/8)"``: a total and the four criteria in rubric order, ``?`` where missing."""
    def number(x: float | None) -> str:
        return "?" if x is None else f"{x:g}"

    return f"{number(total)} ({'/'.join(number(scores.get(key)) for key in CRITERIA)})"


def score_outputs(conversations: list[Conversation], outputs: list[str]) -> dict[str, Any]:
    """Score generated rubric answers against each conversation's target scores and feedback.

    A prediction counts only from an answer that :func:`~gemma_lowmem.evaluation.rubric.parse_rubric` calls valid
    (all four scores in range and the total written); an invalid answer is ``None`` in every agreement statistic,
    and its feedback scores ROUGE 0 (it is compared as an empty text).

    Args:
        conversations: the evaluated conversations; ``meta["scores"]`` holds the target total and criteria,
            ``meta["kind"]`` the student summary's kind, the last message the target answer.
        outputs: the generated answer of each conversation, same order.

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
    parsed = [parse_rubric(text) for text in outputs]
    targets = [parse_rubric(conv.messages[-1]["content"]) for conv in conversations]
    target_scores = [conv.meta["scores"] for conv in conversations]

    metrics: dict[str, Any] = {"n": len(parsed), "valid_rate": sum(p.valid for p in parsed) / len(parsed)}
    maxima = {"total": MAX_TOTAL, **{key: spec[0] for key, spec in CRITERIA.items()}}
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
            "predicted": _scores_text(p.total, p.scores) if p.valid else "invalid: " + "; ".join(p.problems[:2]),
            "target": _scores_text(target["total"], target),
            "predicted_total": p.total if p.valid else None, "target_total": target["total"],
            "abs_error": abs(p.total - target["total"]) if p.valid else None, "problems": p.problems,
        })
    valid_rows = [r for r in rows if r["ok"]]
    plots = {
        "scatter_total": {"kind": "scatter", "x": [r["target_total"] for r in valid_rows],
                          "y": [r["predicted_total"] for r in valid_rows], "xlabel": "target total",
                          "ylabel": "predicted total", "title": "Total score: predicted vs target (valid answers)",
                          "limits": [0, MAX_TOTAL]},
        "bar_by_kind": {"kind": "bar", "labels": list(by_kind),
                        "series": {"target": [v["target_mean"] for v in by_kind.values()],
                                   "predicted": [v["predicted_mean"] for v in by_kind.values()]},
                        "ylabel": "mean total", "title": "Mean total per student-summary kind"},
    }
    return {"metrics": metrics, "rows": rows, "plots": plots}


TASK = Task("summary_eval", build_datasets, score_outputs=score_outputs, rubric=SUMMARY_RUBRIC,
            summary_statistics=summary_statistics)
