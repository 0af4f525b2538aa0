"""Feedback for task 1's targets: the overall feedback, suggestions and one comment per criterion, written from a
student summary's edits and the measurements that scored it
(:func:`~gemma_lowmem.tasks.summary_eval.score_summary`).

Korean for ``lang="ko"``, English for ``"en"``; they name the defect: "The summary says '12 deaths', but the
article says '21 deaths'." / "요약의 '12명' 부분이 틀렸습니다. 기사에 따르면 '21명'입니다." Comments are written for the
criteria of the rubric the scores follow.
"""

from __future__ import annotations

import math
from typing import Any

from gemma_lowmem.evaluation.rubric import RubricSpec
from gemma_lowmem.tasks.student_summaries import StudentSummary
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from gemma_lowmem.text import content_tokens, split_sentences


def round_half_up(x: float) -> int:
    """``R(x)`` of the scoring formulas: ``x`` rounded half up (Python's ``round`` goes half to even)."""
    return int(math.floor(x + 0.5))


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
                   lang: str, spec: RubricSpec = SUMMARY_RUBRIC) -> tuple[str, str, dict[str, str]]:
    """Feedback, suggestions and per-criterion comments that name the summary's defects.

    Args:
        summary: the summary and its edits.
        reference: the reference summary, one sentence per line.
        scores: from :func:`score_summary`.
        facts: from :func:`score_summary`.
        lang: ``"ko"`` or ``"en"``.
        spec: the rubric ``scores`` follow (its criteria and maxima).

    Returns:
        ``(feedback paragraph, suggestions as "- " bullets, {criterion of spec: one-sentence comment})``.
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
    share = total / spec.max_total
    band = 3 if share >= 0.9 else 2 if share >= 0.75 else 1 if share >= 0.5 else 0
    if notes or any(scores[key] < 0.75 * maximum for key, (maximum, _, _) in spec.criteria.items()):  # a defect:
        band = min(band, 2)  # not "excellent"
    if not notes:
        reworded = any(e["op"] in ("synonym", "reorder_sentences", "reorder_clause") for e in summary.edits)
        notes.append(_t("good_reworded" if reworded else "good_close", lang))
    notes.insert(0, _t(f"open_{band}", lang))
    if "grammar" in spec.criteria and scores["grammar"] == spec.criteria["grammar"][0] and summary.kind != "empty":
        notes.append(_t("clear", lang))
    tips = list(dict.fromkeys(tips))[:3] or [_t("s_keep", lang)]
    comments = {key: text for key, text in _comments(summary, facts, lang).items() if key in spec.criteria}
    return " ".join(notes), "\n".join(f"- {tip}" for tip in tips), comments


def _comments(summary: StudentSummary, facts: dict[str, Any], lang: str) -> dict[str, str]:
    p = round_half_up(100 * facts["recall"])
    cov = "c_cov_high" if facts["recall"] >= 0.85 else "c_cov_mid" if facts["recall"] >= 0.5 else (
        "c_cov_low" if facts["recall"] >= 0.15 else "c_cov_none")
    if facts["content"] == 0:
        acc = _t("c_acc_none", lang)
    elif facts["content"] < 8:
        acc = _t("c_acc_little", lang)
    elif facts["factual_errors"]:
        acc = _t("c_acc_errors", lang, n=facts["factual_errors"])
    elif facts["unsupported"] > 0.1:
        acc = _t("c_acc_unsupported", lang, p=round_half_up(100 * facts["unsupported"]))
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
        con = _t("c_con_unrelated", lang, p=round_half_up(100 * facts["unrelated"]))
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
