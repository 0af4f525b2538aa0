"""Essay targets: split a human total over the rubric's criteria, and write feedback from measurable features.

Human essay data (ASAP-AES) gives one holistic score per essay (and, for some prompts, trait scores), never a
per-criterion split or written feedback, so the scorer's training answers are built here:

- :func:`split_total` spreads the rubric total over the five criteria in proportion to their maxima, weighted by a
  strength in [0, 1] per criterion where trait scores give one (see ``essay.trait_strengths``), never over a
  criterion's maximum; the parts are whole numbers that add up to the total exactly (largest remainders).
- :func:`essay_features` measures the essay: words, sentences, paragraphs, sentence length, the most repeated
  content word, and marker phrases of a claim ("I believe", "생각한다"), evidence ("for example", "예를 들어"),
  counter-arguments ("however", "물론") and a conclusion ("in conclusion", "따라서"), in English and Korean.
- :func:`write_feedback` writes the overall feedback, up to three suggestions and one comment per criterion from
  those features; each comment's wording follows the criterion's score band (>= 80%, >= 55%, >= 30% of its maximum,
  below), and its parenthesis gives the measured fact. The feedback states what was measured, so it may note a
  missing counter-argument marker in an essay the human raters scored well.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from gemma_lowmem.tasks.essay_rubric import ESSAY_CRITERIA, MAX_TOTAL
from gemma_lowmem.text import content_tokens, split_sentences

_MARKERS = {  # phrases that signal each part of an argument; English ones match whole words, case-insensitive
    "claim": ("i believe", "i think", "in my opinion", "i agree", "i disagree", "i feel", "i strongly", "my view",
              "생각한다", "생각합니다", "주장한다", "주장합니다", "동의한다", "동의합니다", "반대한다", "반대합니다",
              "해야 한다", "해야 합니다"),
    "evidence": ("for example", "for instance", "because", "according to", "studies", "research", "such as",
                 "percent", "survey", "예를 들어", "예를 들면", "왜냐하면", "때문", "따르면", "연구", "조사", "통계"),
    "counter": ("however", "although", "on the other hand", "some people", "others may", "opponents", "critics",
                "some may", "admittedly", "of course", "even though", "물론", "하지만", "그러나", "반면", "반대로",
                "일부는", "어떤 사람들은", "반론", "다르게 생각"),
    "conclusion": ("in conclusion", "to conclude", "in summary", "to sum up", "all in all", "therefore",
                   "결론적으로", "따라서", "그러므로", "요컨대", "정리하면"),
}
_MARKER_RE = {kind: [re.compile(re.escape(p) if re.match(r"[가-힣]", p) else rf"(?<![a-z]){re.escape(p)}(?![a-z])",
                                re.IGNORECASE) for p in phrases] for kind, phrases in _MARKERS.items()}
_WORD = re.compile(r"@?[^\W_]+(?:['’][^\W_]+)*")
_PLACEHOLDER = re.compile(r"@[A-Z]+\d*")  # ASAP's anonymised names: @CAPS1, @PERSON2, @LOCATION1


def essay_features(text: str) -> dict[str, Any]:
    """Measure an essay (see the module docstring).

    Args:
        text: the essay; paragraphs are separated by line breaks.

    Returns:
        ``words``, ``sentences``, ``paragraphs``, ``mean_sentence_words``, ``longest_sentence_words``,
        ``top_word``, ``top_count`` (the most frequent content word of 4+ letters, ASAP placeholders left out),
        ``markers`` (kind -> marker phrases found, as written, in text order) and ``claim_early`` (a claim marker
        in the first paragraph or the first three sentences).
    """
    sentences = split_sentences(text)
    lengths = [len(_WORD.findall(s)) for s in sentences]
    paragraphs = [p for p in re.split(r"\n\s*", text) if p.strip()]
    counts = Counter(t for t in content_tokens(_PLACEHOLDER.sub(" ", text)) if len(t) >= 4 and not t.isdigit())
    top_word, top_count = counts.most_common(1)[0] if counts else (None, 0)
    markers: dict[str, list[str]] = {}
    for kind, regexes in _MARKER_RE.items():
        hits = sorted((m.start(), m.group(0)) for r in regexes for m in r.finditer(text))
        markers[kind] = [h for _, h in hits]
    opening = paragraphs[0] if len(paragraphs) > 1 else " ".join(sentences[:3])
    return {
        "words": len(_WORD.findall(text)), "sentences": len(sentences), "paragraphs": len(paragraphs),
        "mean_sentence_words": sum(lengths) / len(lengths) if lengths else 0.0,
        "longest_sentence_words": max(lengths, default=0), "top_word": top_word, "top_count": top_count,
        "markers": markers, "claim_early": any(r.search(opening) for r in _MARKER_RE["claim"]),
    }


def split_total(total: int, strengths: dict[str, float] | None = None) -> dict[str, int]:
    """Spread a rubric total over the criteria (see the module docstring).

    Args:
        total: the rubric total, a whole number in [0, 100].
        strengths: criterion -> strength in [0, 1] from trait scores (missing criteria count 0.5); None: the split
            follows the maxima alone.

    Returns:
        Criterion -> whole-number score within [0, max], adding up to ``total``.
    """
    if not 0 <= total <= MAX_TOTAL:
        raise ValueError(f"total {total} is outside [0, {MAX_TOTAL}]")
    maxima = {k: v[0] for k, v in ESSAY_CRITERIA.items()}
    # 0.1 keeps a criterion with strength 0 from taking nothing when the total is high.
    weight = {k: m * (0.1 + (strengths or {}).get(k, 0.5)) for k, m in maxima.items()}
    share: dict[str, float] = {}
    left, free = float(total), set(maxima)
    while free:  # water-filling: criteria that would pass their maximum are capped, the rest share what is left
        norm = sum(weight[k] for k in free)
        capped = {k for k in free if left * weight[k] / norm >= maxima[k]}
        if not capped:
            share.update({k: left * weight[k] / norm for k in free})
            break
        for k in capped:
            share[k] = maxima[k]
            left -= maxima[k]
        free -= capped
    parts = {k: math.floor(v + 1e-9) for k, v in share.items()}
    order = sorted(maxima, key=lambda k: (-(share[k] - parts[k]), list(maxima).index(k)))
    for k in order:
        if sum(parts.values()) >= total:
            break
        if parts[k] < maxima[k]:
            parts[k] += 1
    return {k: parts[k] for k in maxima}


_T = {  # (English, Korean)
    "open_3": ("A convincing, well-argued essay.", "설득력 있는 좋은 글입니다."),
    "open_2": ("A solid essay with room to improve.", "전반적으로 괜찮은 글이지만 보완할 점이 있습니다."),
    "open_1": ("The essay makes its point only in part.", "주장은 보이지만 근거와 구성이 부족합니다."),
    "open_0": ("The essay does not yet make a clear, supported argument.",
               "아직 분명한 주장과 근거를 갖춘 글이 되지 못했습니다."),
    "size": ("It has {w} in {s} and {p}.",
             "글은 {p}개 문단, {s}개 문장, {w}개 단어로 되어 있습니다."),
    "claim_none": ("The opening does not state the writer's position outright.",
                   "글의 첫 부분에서 글쓴이의 입장을 밝히는 문장을 찾기 어렵습니다."),
    "counter_found": ("It takes up an opposing view ('{m}').", "'{m}' 같은 표현으로 반대 의견을 다룹니다."),
    "counter_none": ("No opposing view is taken up.", "반대 의견을 다루는 부분이 보이지 않습니다."),
    "evidence_found": ("It signals reasons or examples ('{m}', {n} in all).",
                       "'{m}' 등 근거나 예시를 드는 표현이 {n}곳 있습니다."),
    "evidence_none": ("Reasons and examples are hardly signalled.", "근거나 예시를 드는 표현이 거의 없습니다."),
    "one_block": ("It is written as a single paragraph, so introduction, body and conclusion do not stand apart.",
                  "문단이 나뉘지 않아 서론, 본론, 결론이 구별되지 않습니다."),
    "long": ("Sentences are long (on average {m:.0f} words; the longest has {n}).",
             "문장이 깁니다(평균 {m:.0f}단어, 가장 긴 문장 {n}단어)."),
    "short": ("Sentences are very short and choppy (on average {m:.0f} words).",
              "문장이 매우 짧게 끊어집니다(평균 {m:.0f}단어)."),
    "repeat": ("The word '{word}' is used {n} times.", "'{word}' 단어를 {n}번 되풀이해 썼습니다."),
    "no_conclusion": ("There is no clear concluding statement.", "글을 맺는 결론 문장이 분명하지 않습니다."),
    "too_short": ("At {w} words it is too short to develop its reasons.",
                  "{w}개 단어로는 근거를 충분히 펼치기 어렵습니다."),
    "s_counter": ("Introduce one opposing view and explain why it does not change your position.",
                  "반대 의견을 하나 소개하고, 그 의견이 왜 충분하지 않은지 반박해 보세요."),
    "s_evidence": ("Back each reason with a specific example or fact ('For example, ...').",
                   "근거마다 구체적인 예시나 사실('예를 들어 ...')을 덧붙이세요."),
    "s_claim": ("State your position in one clear sentence in the first paragraph.",
                "첫 문단에서 자신의 입장을 한 문장으로 분명히 밝히세요."),
    "s_paragraphs": ("Split the essay into paragraphs: an introduction, one per reason, and a conclusion.",
                     "서론, 근거별 본론, 결론으로 문단을 나누세요."),
    "s_long": ("Split long sentences like the longest one ({n} words) into two or three.",
               "가장 긴 문장({n}단어)처럼 긴 문장은 두세 문장으로 나누어 쓰세요."),
    "s_short": ("Join short sentences with linking words to show how the ideas connect.",
                "짧은 문장들을 연결어로 이어 생각의 흐름을 보여 주세요."),
    "s_repeat": ("Vary your wording instead of repeating '{word}'.", "'{word}' 대신 다른 표현도 함께 써 보세요."),
    "s_conclusion": ("End with a paragraph that sums up your position.",
                     "마지막 문단에서 주장을 다시 정리하며 글을 맺으세요."),
    "s_develop": ("Develop each reason with one or two more sentences.",
                  "근거마다 한두 문장씩 더 설명해 글을 충실하게 만드세요."),
    "s_keep": ("Keep this structure and add one more specific example to make the essay even stronger.",
               "지금의 구성을 유지하면서 구체적인 예시를 하나 더 들어 보세요."),
}
_COMMENTS = {  # criterion -> four bands (English, Korean), best first
    "claim": (
        ("The position is clear", "입장이 분명하게 드러납니다"),
        ("The position can be made out but could be stated more clearly",
         "입장은 알 수 있지만 더 분명히 밝힐 수 있습니다"),
        ("The position is vague", "입장이 흐릿합니다"),
        ("There is hardly any claim", "주장이 거의 드러나지 않습니다"),
    ),
    "evidence": (
        ("The reasons are specific and sufficient", "근거가 구체적이고 충분합니다"),
        ("There are reasons, but they could be more specific", "근거가 있지만 더 구체적일 수 있습니다"),
        ("The reasons are thin", "근거가 부족합니다"),
        ("There is hardly any support", "근거가 거의 없습니다"),
    ),
    "counter": (
        ("It takes up an opposing view and answers it", "반대 의견을 다루고 반박합니다"),
        ("It mentions an opposing view only briefly", "반대 의견을 짧게 언급합니다"),
        ("It hardly considers other views", "반대 의견을 거의 다루지 않습니다"),
        ("It does not consider other views", "반대 의견을 다루지 않습니다"),
    ),
    "organization": (
        ("The structure and flow are logical", "문단 구성과 흐름이 논리적입니다"),
        ("It has a structure, but some links are loose", "구성은 갖추었지만 연결이 매끄럽지 않은 곳이 있습니다"),
        ("The structure is loose", "구성이 느슨합니다"),
        ("No structure is visible", "구성이 드러나지 않습니다"),
    ),
    "expression": (
        ("Sentences are clear and the wording accurate", "문장이 명확하고 표현이 정확합니다"),
        ("Mostly readable, with some awkward wording", "대체로 읽기 쉽지만 어색한 표현이 있습니다"),
        ("There are many errors in sentences and wording", "문장과 표현에 오류가 많습니다"),
        ("The sentences are hard to follow", "문장을 이해하기 어렵습니다"),
    ),
}


def _t(key: str, lang: str, **kw: Any) -> str:
    return _T[key][lang == "ko"].format(**kw)


def _band(ratio: float) -> int:
    return 0 if ratio >= 0.8 else 1 if ratio >= 0.55 else 2 if ratio >= 0.3 else 3


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _comment(key: str, ratio: float, f: dict[str, Any], lang: str) -> str:
    """The band's sentence and, in parentheses, the measured fact behind the criterion."""
    text = _COMMENTS[key][_band(ratio)][lang == "ko"]
    ko, found = lang == "ko", f["markers"].get(key, [])
    if key in ("claim", "counter"):
        name = {"claim": ("position", "입장"), "counter": ("counter-argument", "반론")}[key][ko]
        if found:
            fact = f"{name} 표현: '{found[0]}'" if ko else f"{name} marker: '{found[0]}'"
        else:
            fact = f"{name} 표현 없음" if ko else f"no {name} marker"
    elif key == "evidence":
        n = len(found)
        fact = (f"근거 표현 {n}곳" if n else "근거 표현 없음") if ko else (
            f"{_plural(n, 'signalled reason')}" if n else "no signalled reasons")
    elif key == "organization":
        fact = f"{f['paragraphs']}개 문단" if ko else _plural(f["paragraphs"], "paragraph")
    else:
        m = f["mean_sentence_words"]
        fact = f"문장 평균 {m:.0f}단어" if ko else f"sentences average {m:.0f} words"
    return f"{text}({fact})." if ko else f"{text} ({fact})."


def write_feedback(features: dict[str, Any], scores: dict[str, int], lang: str) -> tuple[str, str, dict[str, str]]:
    """Feedback, suggestions and per-criterion comments for an essay (see the module docstring).

    Args:
        features: from :func:`essay_features`.
        scores: criterion -> score (the total is their sum).
        lang: ``"ko"`` or ``"en"``.

    Returns:
        (feedback paragraph, up to three ``- `` suggestion lines, {criterion: one-sentence comment}).
    """
    f, markers = features, features["markers"]
    ratio = {k: scores[k] / m for k, (m, _, _) in ESSAY_CRITERIA.items()}
    total = sum(scores[k] for k in ESSAY_CRITERIA)
    band = 3 if total >= 85 else 2 if total >= 70 else 1 if total >= 50 else 0
    size = (f["words"], f["sentences"], f["paragraphs"]) if lang == "ko" else (
        _plural(f["words"], "word"), _plural(f["sentences"], "sentence"), _plural(f["paragraphs"], "paragraph"))
    notes = [_t(f"open_{band}", lang), _t("size", lang, w=size[0], s=size[1], p=size[2])]
    tips: list[tuple[float, str]] = []  # (the related criterion's score ratio, tip): the weakest criteria first
    if not f["claim_early"] and ratio["claim"] < 0.8:
        notes.append(_t("claim_none", lang))
        tips.append((ratio["claim"], _t("s_claim", lang)))
    if markers["counter"]:
        notes.append(_t("counter_found", lang, m=markers["counter"][0]))
    else:
        notes.append(_t("counter_none", lang))
        tips.append((ratio["counter"], _t("s_counter", lang)))
    if markers["evidence"]:
        notes.append(_t("evidence_found", lang, m=markers["evidence"][0], n=len(markers["evidence"])))
    else:
        notes.append(_t("evidence_none", lang))
        tips.append((ratio["evidence"], _t("s_evidence", lang)))
    if f["paragraphs"] == 1 and f["words"] > 120:
        notes.append(_t("one_block", lang))
        tips.append((ratio["organization"], _t("s_paragraphs", lang)))
    if f["mean_sentence_words"] > 25 or f["longest_sentence_words"] > 50:
        notes.append(_t("long", lang, m=f["mean_sentence_words"], n=f["longest_sentence_words"]))
        tips.append((ratio["expression"], _t("s_long", lang, n=f["longest_sentence_words"])))
    elif f["sentences"] >= 3 and f["mean_sentence_words"] < 8:
        notes.append(_t("short", lang, m=f["mean_sentence_words"]))
        tips.append((ratio["expression"], _t("s_short", lang)))
    if f["top_word"] and f["top_count"] >= 5 and f["top_count"] >= 0.03 * f["words"]:
        notes.append(_t("repeat", lang, word=f["top_word"], n=f["top_count"]))
        tips.append((ratio["expression"] + 0.01, _t("s_repeat", lang, word=f["top_word"])))
    if not markers["conclusion"] and f["words"] > 150:
        notes.append(_t("no_conclusion", lang))
        tips.append((ratio["organization"] + 0.01, _t("s_conclusion", lang)))
    if f["words"] < 150 and total < 70:
        notes.append(_t("too_short", lang, w=f["words"]))
        tips.append((ratio["evidence"] + 0.02, _t("s_develop", lang)))
    chosen = [tip for _, tip in sorted(tips, key=lambda t: t[0])][:3] or [_t("s_keep", lang)]
    comments = {k: _comment(k, ratio[k], f, lang) for k in ESSAY_CRITERIA}
    return " ".join(notes), "\n".join(f"- {tip}" for tip in chosen), comments
