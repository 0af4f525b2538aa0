"""Rubric answers: render -> parse round trips, generated format variants, hand-written nasty cases, fuzzing."""

import itertools
import json
import random

import pytest

import gemma_lowmem.evaluation
from gemma_lowmem.evaluation import RubricResult, parse_rubric, render_rubric
from gemma_lowmem.evaluation.rubric import SECTION_HEADINGS, RubricSpec, render_rubric_spans
from gemma_lowmem.tasks.essay_rubric import ESSAY_RUBRIC
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC

CRITERIA, MAX_TOTAL = SUMMARY_RUBRIC.criteria, SUMMARY_RUBRIC.max_total

KEYS = list(CRITERIA)
MAXES = {k: v[0] for k, v in CRITERIA.items()}
FW = str.maketrans("0123456789/:", "０１２３４５６７８９／：")

FEEDBACK = {"ko": "요약이 기사의 핵심을 잘 담았습니다.\n다만 수치 하나가 빠졌습니다.",
            "en": "The summary keeps the main points.\nOne figure is missing."}
SUGGESTIONS = {"ko": "- 연구 결과의 수치를 넣으세요.\n- 마지막 문장을 줄이세요.",
               "en": "- Add the study's figures.\n- Shorten the last sentence."}
COMMENTS = {"ko": {"coverage": "주요 내용을 포함했다.", "accuracy": "사실 오류가 없다.", "conciseness": "조금 길다.",
                   "grammar": "맞춤법이 정확하다."},
            "en": {"coverage": "Covers the key facts.", "accuracy": "No factual errors.", "conciseness": "A bit long.",
                   "grammar": "Clean grammar."}}


def check_invariants(result: RubricResult) -> None:
    """What must hold for any input."""
    assert isinstance(result, RubricResult)
    assert not any(p.startswith("internal parser error") for p in result.problems), result.problems
    assert list(result.scores) == KEYS and list(result.comments) == KEYS
    if result.valid:
        assert all(0 <= result.scores[k] <= MAXES[k] for k in KEYS)
        assert result.total is not None and not result.total_computed
        assert abs(result.total - sum(result.scores.values())) <= 1
    else:
        assert result.problems
    if result.total_computed:
        assert not result.valid and result.total == sum(result.scores.values())


def check(result: RubricResult, scores: dict, total: float | None, valid: bool) -> None:
    check_invariants(result)
    assert result.scores == scores
    assert result.total == total
    assert result.valid is valid, result.problems


def random_scores(rng: random.Random) -> dict[str, int]:
    # Extremes on purpose: 0 and the maximum are where parsers mistake scores for maximums.
    return {k: rng.choice([0, m, rng.randint(0, m), rng.randint(0, m)]) for k, m in MAXES.items()}


# ---------------------------------------------------------------------------------------------------------------
# render -> parse


@pytest.mark.parametrize("lang", ["ko", "en"])
@pytest.mark.parametrize("seed", range(25))
def test_round_trip(lang: str, seed: int) -> None:
    rng = random.Random(seed)
    scores = random_scores(rng)
    comments = {k: c for k, c in COMMENTS[lang].items() if rng.random() < 0.8}  # some lines without a comment
    feedback = FEEDBACK[lang] if seed % 3 else FEEDBACK[lang].split("\n")[0]
    text = render_rubric(scores, feedback, SUGGESTIONS[lang], comments, lang, SUMMARY_RUBRIC)
    result = parse_rubric(text, SUMMARY_RUBRIC)
    check(result, {k: float(v) for k, v in scores.items()}, float(sum(scores.values())), True)
    assert result.problems == [] and not result.total_computed
    assert result.feedback == feedback
    assert result.suggestions == SUGGESTIONS[lang]
    assert result.comments == {k: comments.get(k) for k in KEYS}


def test_render_exact_format() -> None:
    text = render_rubric({"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8}, "피드백 문단.",
                         "- 제안 하나\n- 제안 둘", {"coverage": "가.", "accuracy": "나.", "conciseness": "다.",
                                                "grammar": "라."}, "ko", SUMMARY_RUBRIC)
    assert text == (
        "요약 평가 결과:\n\n**세부 평가:**\n- 핵심 내용 포함도: 32/40 - 가.\n"
        "- 정확성: 24/30 - 나.\n- 간결성: 14/20 - 다.\n- 문법 및 표현: 8/10 - 라.\n\n**총점: 78/100**\n\n"
        "**전체 피드백:**\n피드백 문단.\n\n**개선 제안:**\n- 제안 하나\n- 제안 둘"
    )
    english = render_rubric({"coverage": 40, "accuracy": 0, "conciseness": 20, "grammar": 10}, "Fine.", "- None.",
                            {"grammar": "Line\nbreak."}, "en", SUMMARY_RUBRIC)
    assert english.splitlines()[8] == "**Total score: 70/100**"
    assert "- Accuracy: 0/30\n" in english and "- Grammar and expression: 10/10 - Line break." in english
    assert "**Suggestions for improvement:**\n- None." in english and "**Overall feedback:**\nFine." in english


@pytest.mark.parametrize(
    "scores, comments, lang",
    [
        ({"coverage": 32, "accuracy": 24, "conciseness": 14}, {}, "ko"),  # missing grammar
        ({"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8, "style": 1}, {}, "ko"),
        ({"coverage": 41, "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "ko"),
        ({"coverage": -1, "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "ko"),
        ({"coverage": 32.5, "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "ko"),
        ({"coverage": "32", "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "ko"),
        ({"coverage": float("inf"), "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "ko"),
        ({"coverage": float("nan"), "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "ko"),
        ({"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8}, {"style": "x"}, "ko"),
        ({"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8}, {}, "fr"),
    ],
)
def test_render_rejects_bad_input(scores: dict, comments: dict, lang: str) -> None:
    with pytest.raises(ValueError):
        render_rubric(scores, "f", "s", comments, lang, SUMMARY_RUBRIC)


def test_render_accepts_whole_floats() -> None:
    text = render_rubric({"coverage": 32.0, "accuracy": 24, "conciseness": 14, "grammar": 8}, "f", "s", {}, "ko",
                         SUMMARY_RUBRIC)
    assert "- 핵심 내용 포함도: 32/40" in text and "**총점: 78/100**" in text


def test_criteria_table() -> None:
    assert KEYS == ["coverage", "accuracy", "conciseness", "grammar"]
    assert sum(MAXES.values()) == MAX_TOTAL == 100
    assert CRITERIA["grammar"][1:] == ("문법 및 표현", "Grammar and expression")


# ---------------------------------------------------------------------------------------------------------------
# Generated list-format variants: every combination of label set, bullet, bold, number style and total style,
# with line ends, chatter, order and a second evaluation varied by a seeded generator.

LABELS = {
    ("ko", "canonical"): {k: v[1] for k, v in CRITERIA.items()} | {"total": "총점"},
    ("ko", "synonym"): {"coverage": "핵심 내용", "accuracy": "정확도", "conciseness": "간결함", "grammar": "문법",
                        "total": "최종 점수"},
    ("en", "canonical"): {k: v[2] for k, v in CRITERIA.items()} | {"total": "Total score"},
    ("en", "synonym"): {"coverage": "Content", "accuracy": "Factual accuracy", "conciseness": "Brevity",
                        "grammar": "Expression", "total": "Overall score"},
}
NUMBER_STYLES = ["slash", "spaced", "unit", "unit_slash", "bare", "max_first", "paren_max", "fullwidth", "decimal",
                 "label_paren"]
TOTAL_STYLES = ["bold_slash", "unit", "bare", "missing"]
HEADINGS = {"ko": ("요약 평가 결과:", "**세부 평가:**", "**전체 피드백:**", "**개선 제안:**"),
            "en": ("Summary evaluation:", "**Detailed evaluation:**", "**Overall feedback:**",
                   "**Suggestions for improvement:**")}
CHATTER = ["", "네, 요약을 평가하겠습니다.\n\n", "Sure! Here is my evaluation of the summary.\n\n"]


def score_line(label: str, n: float, m: int, style: str, lang: str, prefix: str, bold: bool) -> str:
    ko = lang == "ko"
    shown = f"{n:g}"
    value = {
        "slash": f"{shown}/{m}",
        "spaced": f"{shown} / {m}",
        "unit": f"{shown}점" if ko else f"{shown} points",
        "unit_slash": f"{shown}점/{m}점" if ko else f"{shown}/{m} points",
        "bare": shown,
        "max_first": f"{m}점 만점에 {shown}점" if ko else f"{shown} out of {m}",
        "paren_max": f"{shown} ({m}점 만점)" if ko else f"{shown} (out of {m})",
        "fullwidth": f"{shown}/{m}".translate(FW),
        "decimal": f"{shown}/{m}",
        "label_paren": shown,
    }[style]
    if style == "label_paren":
        label = f"{label} ({m}점)" if ko else f"{label} ({m} points)"
    head = f"**{label}**:" if bold else f"{label}:"
    return f"{prefix}{head} {value}"


def build_answer(rng: random.Random, lang: str, labels: dict, scores: dict, style: str, total_style: str,
                 prefix: str, bold: bool, keys: list[str]) -> str:
    total = sum(scores.values())
    title, details, feedback, suggestions = HEADINGS[lang]
    total_line = {
        "bold_slash": f"**{labels['total']}: {total:g}/100**",
        "unit": f"{labels['total']}: {total:g}점" if lang == "ko" else f"{labels['total']}: {total:g} points",
        "bare": f"{labels['total']} {total:g}",
        "missing": None,
    }[total_style]
    lines = [title, ""] + ([total_line, ""] if total_line else []) + [details]
    for k in keys:
        line = score_line(labels[k], scores[k], MAXES[k], style, lang, prefix, bold)
        lines.append(line + (f" - {COMMENTS[lang][k]}" if rng.random() < 0.7 else ""))
    lines += ["", feedback, FEEDBACK[lang], "", suggestions, SUGGESTIONS[lang]]
    return "\n".join(lines)


@pytest.mark.parametrize("lang, label_set, prefix, style",
                         list(itertools.product(["ko", "en"], ["canonical", "synonym"], ["- ", "", "1. ", "• "],
                                                NUMBER_STYLES)))
def test_generated_list_variants(lang: str, label_set: str, prefix: str, style: str) -> None:
    # Bold and the total's style vary inside: 160 parametrized cases x 8 answers each.
    for bold, total_style in itertools.product([False, True], TOTAL_STYLES):
        rng = random.Random(f"{lang}{label_set}{prefix}{bold}{style}{total_style}")
        scores = {k: float(v) for k, v in random_scores(rng).items()}
        if style == "decimal":
            scores = {k: v - 0.5 if v > 0 else 0.5 for k, v in scores.items()}
        keys = KEYS[:] if rng.random() < 0.5 else rng.sample(KEYS, len(KEYS))
        text = build_answer(rng, lang, LABELS[lang, label_set], scores, style, total_style, prefix, bold, keys)
        if rng.random() < 0.3:  # a second evaluation after the first: ignored
            other = {k: float(rng.randint(0, m)) for k, m in MAXES.items()}
            text += "\n\n수정된 평가:\n\n" + build_answer(rng, lang, LABELS[lang, label_set], other, style,
                                                        "bold_slash", prefix, bold, KEYS)
        text = rng.choice(CHATTER) + text
        if rng.random() < 0.3:
            text = text.replace("\n", "\r\n")
        result = parse_rubric(text, SUMMARY_RUBRIC)
        try:
            if total_style == "missing":
                check(result, scores, sum(scores.values()), False)
                assert result.total_computed and any("missing total" in p for p in result.problems)
            else:
                check(result, scores, sum(scores.values()), True)
                assert result.problems == []
            assert result.feedback == FEEDBACK[lang]
            assert result.suggestions == SUGGESTIONS[lang]
        except AssertionError as err:
            raise AssertionError(f"bold={bold}, total_style={total_style}, answer:\n{text}") from err


# ---------------------------------------------------------------------------------------------------------------
# Generated tables and JSON


TABLE_HEADERS = {
    "score_comment": ("| 항목 | 점수 | 코멘트 |", lambda n, m, c: f"| {n} | {c} |"),
    "max_score": ("| 항목 | 배점 | 점수 | 근거 |", lambda n, m, c: f"| {m} | {n} | {c} |"),
    "score_max": ("| Criterion | Score | Max | Comment |", lambda n, m, c: f"| {n} | {m} | {c} |"),
    "slash": ("| Criterion | Score | Comment |", lambda n, m, c: f"| **{n}/{m}** | {c} |"),
    "no_header": (None, lambda n, m, c: f"| {n}/{m} | {c} |"),
    "no_header_two_numbers": (None, lambda n, m, c: f"| {n} | {m} | {c} |"),
}


@pytest.mark.parametrize("lang, header, total_row, seed",
                         list(itertools.product(["ko", "en"], TABLE_HEADERS, [True, False], range(3))))
def test_generated_tables(lang: str, header: str, total_row: bool, seed: int) -> None:
    rng = random.Random(f"{lang}{header}{total_row}{seed}")
    scores = random_scores(rng)
    head, cells = TABLE_HEADERS[header]
    lines = ["평가 결과는 다음과 같습니다.", ""]
    if head:
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for k in rng.sample(KEYS, len(KEYS)):
        label = CRITERIA[k][1] if lang == "ko" else CRITERIA[k][2]
        lines.append(f"| {label} " + cells(scores[k], MAXES[k], COMMENTS[lang][k]))
    if total_row:
        lines.append(f"| {'총점' if lang == 'ko' else 'Total'} " + cells(sum(scores.values()), 100, ""))
    result = parse_rubric("\n".join(lines), SUMMARY_RUBRIC)
    check(result, {k: float(v) for k, v in scores.items()}, float(sum(scores.values())), total_row)
    assert result.comments == COMMENTS[lang]


def test_transposed_table() -> None:
    text = "\n".join(["| 핵심 내용 포함도 | 정확성 | 간결성 | 문법 및 표현 | 총점 |", "|:-:|:-:|:-:|:-:|:-:|",
                      "| 32 | 24/30 | 14점 | 8 | 78 |"])
    check(parse_rubric(text, SUMMARY_RUBRIC), {"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8}, 78,
          True)


def json_answer(scores: dict, lang: str, nesting: str) -> dict:
    names = {k: (CRITERIA[k][1] if lang == "ko" else k) for k in KEYS}
    total_key, fb_key, sg_key = ("총점", "전체 피드백", "개선 제안") if lang == "ko" else ("total", "feedback",
                                                                                   "suggestions")
    if nesting == "flat":
        body: dict = {names[k]: scores[k] for k in KEYS}
    elif nesting == "nested":
        body = {"scores": {names[k]: {"score": scores[k], "max": MAXES[k], "comment": COMMENTS[lang][k]}
                           for k in KEYS}}
    elif nesting == "strings":
        body = {names[k]: f"{scores[k]}/{MAXES[k]}" for k in KEYS}
    else:  # a list of records
        body = {"evaluation": [{"criterion": CRITERIA[k][1 if lang == "ko" else 2], "score": scores[k],
                                "comment": COMMENTS[lang][k]} for k in KEYS]}
    return body | {total_key: sum(scores.values()), fb_key: FEEDBACK[lang],
                   sg_key: SUGGESTIONS[lang].replace("- ", "").split("\n")}


@pytest.mark.parametrize("lang, nesting, wrap, indent",
                         list(itertools.product(["ko", "en"], ["flat", "nested", "strings", "records"],
                                                ["bare", "fenced", "chatter", "fenced_chatter"], [None, 2])))
def test_generated_json(lang: str, nesting: str, wrap: str, indent: int | None) -> None:
    rng = random.Random(f"{lang}{nesting}{wrap}{indent}")
    scores = random_scores(rng)
    body = json.dumps(json_answer(scores, lang, nesting), ensure_ascii=rng.random() < 0.3, indent=indent)
    text = {"bare": body, "fenced": f"```json\n{body}\n```", "chatter": f"Here is the result:\n{body}\nThanks!",
            "fenced_chatter": f"평가 결과입니다.\n\n```json\n{body}\n```\n\n{{\"total\": 1}}"}[wrap]
    result = parse_rubric(text, SUMMARY_RUBRIC)
    check(result, {k: float(v) for k, v in scores.items()}, float(sum(scores.values())), True)
    assert result.feedback == FEEDBACK[lang]
    assert result.suggestions == SUGGESTIONS[lang]
    if nesting in ("nested", "records"):
        assert result.comments == COMMENTS[lang]


@pytest.mark.parametrize("cut", [20, 40, 60, 80, 100, 120])
def test_truncated_json_keeps_what_was_written(cut: int) -> None:
    full = json.dumps({"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8, "total": 78,
                       "feedback": "A long feedback sentence that the model never finished writing."})
    result = parse_rubric("```json\n" + full[:cut], SUMMARY_RUBRIC)
    check_invariants(result)
    expected = {k: v for k, v in json.loads(full).items() if f'"{k}": {v}' in full[:cut] and k in MAXES}
    for k in KEYS:  # every number written in full is read; nothing is invented
        assert result.scores[k] == expected.get(k, result.scores[k])
        assert result.scores[k] in (None, json.loads(full)[k])
    assert not result.valid or cut >= 80


# ---------------------------------------------------------------------------------------------------------------
# Hand-written cases models produce

S = {"coverage": 32.0, "accuracy": 24.0, "conciseness": 14.0, "grammar": 8.0}
NONE = dict.fromkeys(S)
CANON = render_rubric({k: int(v) for k, v in S.items()}, "좋습니다.", "- 더 짧게.", {}, "ko", SUMMARY_RUBRIC)


def lines(*parts: str) -> str:
    return "\n".join(parts)


def plain(c: str = "32/40", a: str = "24/30", s: str = "14/20", g: str = "8/10", t: str | None = "78/100") -> str:
    """The four criteria as plain Korean lines, then the total."""
    body = [f"핵심 내용 포함도: {c}", f"정확성: {a}", f"간결성: {s}", f"문법 및 표현: {g}"]
    return lines(*body, *([f"총점: {t}"] if t is not None else []))


NASTY = [
    # (id, text, scores, total, valid)
    ("canonical", CANON, S, 78, True),
    ("crlf", CANON.replace("\n", "\r\n"), S, 78, True),
    ("lone_cr", CANON.replace("\n", "\r"), S, 78, True),
    ("plain_labels", plain(), S, 78, True),
    ("bold_colon_inside", lines("**총점:** 78/100", "**핵심 내용 포함도:** 32/40", "**정확성:** 24/30",
                                "**간결성:** 14/20", "**문법:** 8/10"), S, 78, True),
    ("headings", lines("## 총점: 78/100", "### 핵심 내용 포함도: 32/40", "### 정확성: 24/30", "### 간결성: 14/20",
                       "### 문법 및 표현: 8/10"), S, 78, True),
    ("circled", lines("① 핵심 내용 포함도: 32/40", "② 정확성: 24/30", "③ 간결성: 14/20", "④ 문법 및 표현: 8/10",
                      "총점: 78/100"), S, 78, True),
    ("fullwidth", plain("３２／４０", "２４／３０", "１４／２０", "８／１０", "７８／１００").replace(":", "："), S, 78,
     True),
    ("spaces", lines("총점 : 78 / 100 점", "핵심 내용 포함도 : 32 /40점", "정확성 :24/ 30", "간결성 - 14 / 20",
                     "문법 및 표현 — 8/10"), S, 78, True),
    ("equals_and_tabs", lines("핵심 내용 포함도 = 32/40", "정확성\t24/30", "간결성 → 14/20", "문법 -> 8/10",
                              "총점 = 78"), S, 78, True),
    ("particles", lines("총점은 78점입니다.", "핵심 내용 포함도는 32점입니다.", "정확성은 24점", "간결성은 14점",
                        "문법은 8점"), S, 78, True),
    ("max_first", lines("핵심 내용 포함도: 40점 만점에 32점", "정확성: 30점 만점 중 24점", "간결성: 20점 만점에서 14점",
                        "문법: 10점 만점에 8점", "총점: 100점 만점에 78점"), S, 78, True),
    ("label_maximums", lines("1. 핵심 내용 포함도 (40점 만점): 32점", "2. 정확성 (최대 30점): 24점",
                             "3. 간결성 (20점): 14점", "4. 문법 및 표현 (10점): 8점", "총점(100점 만점): 78점"), S, 78,
     True),
    ("label_translation", lines("핵심 내용 포함도 (Content coverage): 32/40", "정확성 (Accuracy): 24/30",
                                "간결성 (Conciseness): 14/20", "문법 및 표현 (Grammar): 8/10", "Total: 78/100"), S, 78,
     True),
    ("weights", lines("핵심 내용 포함도 (40%): 32/40", "정확성 (30%): 24/30", "간결성 (20%): 14/20",
                      "문법 (10%): 8/10", "총점: 78"), S, 78, True),
    ("score_in_parens", lines("- 핵심 내용 포함도 (32/40): 핵심을 담았다.", "- 정확성 [24/30]: 오류 없음.",
                              "- 간결성 (14/20)", "- 문법 및 표현 (8/10)", "- 총점 (78/100)"), S, 78, True),
    ("score_after_comment", lines("정확성: 사실 오류 없음 (24/30)", "핵심 내용 포함도: 대부분 포함 - 32/40",
                                  "간결성: 적당함, 14/20", "문법: 8/10", "총점: 78/100"), S, 78, True),
    ("next_line_scores", lines("### 핵심 내용 포함도", "점수: 32/40", "설명: 좋음", "", "### 정확성",
                               "**점수**: 24점", "", "### 간결성", "14/20", "", "### 문법 및 표현", "Score: 8", "",
                               "### 총점", "78/100"), S, 78, True),
    ("english_words", lines("Coverage: 32 out of 40", "Accuracy: 24/30 pts", "Conciseness: 14 points out of 20",
                            "Grammar: 8 / 10", "Total is 78/100"), S, 78, True),
    ("english_prose_total", lines("The total score is 78.", "Content coverage: 32", "Accuracy: 24", "Conciseness: 14",
                                  "Grammar and expression: 8"), S, 78, False),  # prose total: computed, invalid
    ("prose_with_numbers", lines("Content 32/40", "Accuracy: 24/30", "Conciseness: 14/20", "Grammar: 8/10",
                                 "Total: 78/100", "", "Overall feedback:", "Overall 3 facts are missing.",
                                 "Total 2 sentences are long.", "Suggestions:", "- Add facts."), S, 78, True),
    ("reordered", lines("- 문법 및 표현: 8/10", "- 간결성: 14/20", "- 정확성: 24/30", "- 핵심 내용 포함도: 32/40", "",
                        "**총점: 78/100**"), S, 78, True),
    ("code_fenced_text", "```\n" + CANON + "\n```", S, 78, True),
    ("decimals", plain(c="32.5/40", a="24.5/30", t="79/100"), S | {"coverage": 32.5, "accuracy": 24.5}, 79, True),
    ("total_off_by_one", plain(t="79/100"), S, 79, True),
    ("total_off_by_two", plain(t="80/100"), S, 80, False),
    ("total_wrong_max", plain(t="78/90"), S, 78, False),
    ("over_max", plain(c="45/40", t="91/100"), S | {"coverage": 45.0}, 91, False),
    ("negative", plain(a="-3/30", t="51/100"), S | {"accuracy": -3.0}, 51, False),
    ("absurd", plain(c="1e9/40"), S | {"coverage": 1e9}, 78, False),
    ("other_maximum", plain(a="24/25"), S, 78, False),
    ("missing_total", plain(t=None), S, 78, False),
    ("missing_criterion", lines(*plain().split("\n")[:3], "총점: 78/100"), S | {"grammar": None}, 78, False),
    ("truncated", CANON[: CANON.index("간결성")], S | {"conciseness": None, "grammar": None}, None, False),
    ("second_evaluation", CANON + "\n\n다시 평가하면:\n\n" + CANON.replace("32/40", "20/40").replace("78/", "66/"), S,
     78, True),
    ("second_without_header", plain(t="78") + "\n\n" + plain("10/40", "10/30", "10/20", "10/10", "40"), S, 78, True),
    ("rubric_echo", lines("다음 기준으로 평가합니다:", "- 핵심 내용 포함도 (40점)", "- 정확성 (30점)",
                          "- 간결성 (20점)", "- 문법 및 표현 (10점)", "", CANON), S, 78, True),
    ("chatter_about_maximum", "총점은 100점 만점입니다. 항목별로 살펴보겠습니다.\n\n" + CANON, S, 78, True),
    ("perfect_in_parens", lines("핵심 내용 포함도 (40점): 모든 내용 포함", *plain().split("\n")[1:4], "총점: 86"),
     S | {"coverage": 40.0}, 86, True),
    ("table_bold_cells", lines("| 평가 항목 | 점수 |", "|---|---|", "| **핵심 내용 포함도** | **32** |",
                               "| **정확성** | **24** |", "| **간결성** | **14** |", "| **문법 및 표현** | **8** |",
                               "| **총점** | **78** |"), S, 78, True),
    ("json_after_text_ignored", CANON + '\n\n```json\n{"coverage": 1, "accuracy": 1, "conciseness": 1, "grammar": 1, '
     '"total": 4}\n```', S, 78, True),
    ("json_after_brace_chatter", 'Criteria: {coverage}, [24/30].\n{"coverage": 32, "accuracy": 24, '
     '"conciseness": 14, "grammar": 8, "total": 78}', S, 78, True),
    ("json_top_level_list", '[{"criterion": "coverage", "score": 32}, {"criterion": "정확성", "score": 24}, '
     '{"name": "간결성", "점수": 14}, {"항목": "문법", "score": 8}, {"criterion": "총점", "score": 78}]', S, 78, True),
    ("json_nan", '{"coverage": NaN, "accuracy": 24, "conciseness": 14, "grammar": 8, "total": 78}',
     S | {"coverage": float("nan")}, 78, False),
    ("json_string_numbers", '{"coverage": "32점", "accuracy": "24/30", "conciseness": "１４", "grammar": "8", '
     '"total": "78/100"}', S, 78, True),
    ("json_score_keys", '{"coverage_score": 32, "accuracy_score": 24, "conciseness_score": 14, "grammar_score": 8, '
     '"total_score": 78}', S, 78, True),
    ("json_huge_integer", '{"coverage": 1' + "0" * 400 + ', "accuracy": 24, "conciseness": 14, "grammar": 8, '
     '"total": 78}', S | {"coverage": float("inf")}, 78, False),
    ("json_bool_ignored", '{"coverage": true, "accuracy": 24, "conciseness": 14, "grammar": 8, "total": 78}',
     S | {"coverage": None}, 78, False),
    ("json_deep", '{"a": {"b": {"c": {"scores": {"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8}}}}, '
     '"total": 78}', S, 78, True),
    ("empty", "", NONE, None, False),
    ("refusal", "죄송하지만 이 요약은 평가할 수 없습니다.", NONE, None, False),
    ("words_after_numbers", lines("핵심 내용 포함도: 3개 누락", "정확성: 2번째 문장 오류", "간결성: 14/20",
                                  "문법: 8/10", "총점: 78"), S | {"coverage": None, "accuracy": None}, 78, False),
]


NASTY_BY_ID = [(c[0], c[1]) for c in NASTY]


@pytest.mark.parametrize("text, scores, total, valid", [c[1:] for c in NASTY], ids=[c[0] for c in NASTY])
def test_nasty(text: str, scores: dict, total: float | None, valid: bool) -> None:
    result = parse_rubric(text, SUMMARY_RUBRIC)
    check_invariants(result)
    if any(isinstance(v, float) and v != v for v in scores.values()):  # NaN != NaN: compare the others
        assert all(result.scores[k] == v for k, v in scores.items() if v == v)
        assert result.total == total and result.valid is valid
        return
    check(result, scores, total, valid)


def test_problems_name_the_fault() -> None:
    def problems(text: str) -> str:
        return " | ".join(parse_rubric(text, SUMMARY_RUBRIC).problems)

    base = "핵심 내용 포함도: 32/40\n정확성: {a}\n간결성: 14/20\n문법: 8/10\n"
    assert "accuracy written out of 25" in problems(base.format(a="24/25") + "총점: 78")
    assert "accuracy score 45 is outside [0, 30]" in problems(base.format(a="45") + "총점: 99")
    assert "missing score for accuracy" in problems(base.format(a="") + "총점: 78")
    assert "total 90 differs from the sum of the scores 78" in problems(base.format(a="24") + "총점: 90")
    assert "missing total; computed 78" in problems(base.format(a="24"))
    assert "total written out of 90" in problems(base.format(a="24") + "총점: 78/90")
    assert "total 120 is outside [0, 100]" in problems(base.format(a="24") + "총점: 120")
    assert "missing overall feedback" in problems(base.format(a="24") + "총점: 78")
    assert problems(CANON) == ""


def test_sections_and_comments() -> None:
    text = ("Sure.\n\n**Total score: 78/100**\n\n- Content coverage: 32/40 - Covers the key facts.\n"
            "- Accuracy: 24/30 — No factual errors.\n- Conciseness: 14/20: A bit long.\n- Grammar: 8/10\n\n"
            "**Overall feedback:** Inline start.\nSecond line with **bold**.\n\n---\n\n"
            "### Suggestions:\n1. Add figures.\n2. Cut the last sentence.\n")
    result = parse_rubric(text, SUMMARY_RUBRIC)
    check(result, S, 78, True)
    assert result.feedback == "Inline start.\nSecond line with **bold**."
    assert result.suggestions == "1. Add figures.\n2. Cut the last sentence."
    assert result.comments == {"coverage": "Covers the key facts.", "accuracy": "No factual errors.",
                               "conciseness": "A bit long.", "grammar": None}


def test_sentences_that_start_like_labels_stay_in_the_feedback() -> None:
    english = parse_rubric(dict(NASTY_BY_ID)["prose_with_numbers"], SUMMARY_RUBRIC)
    assert english.feedback == "Overall 3 facts are missing.\nTotal 2 sentences are long."
    assert english.suggestions == "- Add facts."
    korean = parse_rubric(lines(plain(), "", "전체 피드백:", "표현 3가지가 어색합니다.", "간결하게 2문장으로 줄이세요.",
                                "정확성 측면에서는 좋습니다.", "", "개선 제안:", "- 줄이세요."), SUMMARY_RUBRIC)
    check(korean, S, 78, True)
    assert korean.feedback == "표현 3가지가 어색합니다.\n간결하게 2문장으로 줄이세요.\n정확성 측면에서는 좋습니다."
    assert korean.problems == []


def test_missing_texts_do_not_invalidate_the_numbers() -> None:
    result = parse_rubric(plain(), SUMMARY_RUBRIC)
    assert result.valid
    assert result.problems == ["missing overall feedback", "missing suggestions"]


@pytest.mark.parametrize("value", [None, 12, 3.5, b"\xed\x95\x9c", ["총점: 78"], {"total": 78}, object()])
def test_non_string_input_is_invalid(value: object) -> None:
    result = parse_rubric(value, SUMMARY_RUBRIC)  # type: ignore[arg-type]
    assert not result.valid and result.total is None
    assert result.problems == [f"input is not a string (got {type(value).__name__})"]


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: a seeded generator over fragments; no input may raise or break the invariants.

FRAGMENTS = [
    *(v[1] for v in CRITERIA.values()), *(v[2] for v in CRITERIA.values()), "총점", "Total", "전체 피드백", "개선 제안",
    "Overall feedback", "요약 평가 결과", "세부 평가", "점수", "score", "32", "-3", "1e9", "1e999", "３２", "nan", "0",
    "99999999999999999999", "24.5", "40", ".", "/", ":", "：", "|", "**", "*", "#", "##", "- ", "1. ", "①", "\n",
    "\r\n", "\r", " ", "\t", "(", ")", "[", "]", "{", "}", '"', "'", ",", "```", "```json", "점", "만점", "만점에",
    "out of", "points", "은", "는", "—", "–", "->", "%", "|---|", "\\", "\x00", "\u200b", "😀", "é", "ㄱ", "null",
    "true", '{"coverage":', '"score":', '[{"criterion": "정확성", "score": ', "<end_of_turn>", "1" + "0" * 400,
    "NaN", "Infinity", "-Infinity", '"total": ', "[[[[", "]]]]",
]


@pytest.mark.parametrize("seed", range(20))
def test_random_strings_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.2:  # raw random code points too
            parts.append("".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(1, 20))))
        check_invariants(parse_rubric("".join(parts), SUMMARY_RUBRIC))


@pytest.mark.parametrize("seed", range(10))
def test_mutated_answers_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    lang = "ko" if seed % 2 else "en"
    answer = render_rubric(random_scores(rng), FEEDBACK[lang], SUGGESTIONS[lang], COMMENTS[lang], lang, SUMMARY_RUBRIC)
    if seed % 3 == 0:
        answer = json.dumps(json_answer(random_scores(rng), lang, "nested"), ensure_ascii=False, indent=2)
    for _ in range(100):
        chars = list(answer)
        for _ in range(rng.randint(1, 12)):  # delete, duplicate or replace a character, or insert a fragment
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.3:
                del chars[i]
            elif op < 0.5:
                chars.insert(i, chars[i])
            elif op < 0.7:
                chars[i] = rng.choice("0123456789/:|*-\n{}[]\"")
            else:
                chars.insert(i, rng.choice(FRAGMENTS))
        check_invariants(parse_rubric("".join(chars), SUMMARY_RUBRIC))


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_every_prefix_of_an_answer(lang: str) -> None:
    text = render_rubric({k: int(v) for k, v in S.items()}, FEEDBACK[lang], SUGGESTIONS[lang], COMMENTS[lang], lang,
                         SUMMARY_RUBRIC)
    for cut in range(len(text) + 1):
        result = parse_rubric(text[:cut], SUMMARY_RUBRIC)
        check_invariants(result)
        assert all(result.scores[k] in (None, S[k]) or str(S[k])[:1] == f"{result.scores[k]:g}" for k in KEYS)
    assert parse_rubric(text, SUMMARY_RUBRIC).valid


def test_long_input() -> None:
    text = ("잡담 " * 20000) + "\n" + CANON + "\n" + ("| x " * 5000) + "\n" + ("{" * 3000)
    check(parse_rubric(text, SUMMARY_RUBRIC), S, 78, True)


# ---------------------------------------------------------------------------------------------------------------
# Other rubrics: a spec is data; the same renderer and parser serve it.

TINY = RubricSpec(
    criteria={"ideas": (50, "아이디어", "Ideas"), "order": (30, "글의 순서", "Order of ideas"),
              "spelling": (20, "맞춤법", "Spelling")},
    titles={"ko": "글 평가:", "en": "Writing review:"},
    aliases={"order": (r"sequence",)},
)
TINY_MAXES = {k: v[0] for k, v in TINY.criteria.items()}


@pytest.mark.parametrize("lang", ["ko", "en"])
@pytest.mark.parametrize("seed", range(5))
def test_other_spec_round_trip(lang: str, seed: int) -> None:
    rng = random.Random(seed)
    scores = {k: rng.choice([0, m, rng.randint(0, m)]) for k, m in TINY_MAXES.items()}
    comments = {"ideas": "Clear.", "spelling": "Two typos."} if seed % 2 else {}
    text = render_rubric(scores, "Good.", "- Check spelling.", comments, lang, TINY)
    assert text.startswith("글 평가:" if lang == "ko" else "Writing review:")
    result = parse_rubric(text, TINY)
    assert result.valid and result.problems == [] and result.total == sum(scores.values())
    assert result.scores == scores and result.comments == {k: comments.get(k) for k in TINY_MAXES}
    assert (result.feedback, result.suggestions) == ("Good.", "- Check spelling.")


def test_other_spec_reads_its_labels_in_every_form() -> None:
    expected = {"ideas": 40.0, "order": 20.0, "spelling": 15.0}
    for text in [
        "아이디어: 40/50\n글의순서: 20/30\n맞춤법: 15/20\n총점: 75/100",  # a written label with a space missing
        "| 항목 | 점수 |\n|---|---|\n| **아이디어** | 40 |\n| 글의 순서 | 20 |\n| 맞춤법 | 15 |\n| 총점 | 75 |",
        '```json\n{"ideas": 40, "sequence": "20/30", "spelling_score": 15, "total": 75}\n```',
        "1. **Ideas**: 50점 만점에 40점\n2. **Sequence**: 20 out of 30\n3. **Spelling**:\n15/20\n**Total**: 75",
    ]:
        result = parse_rubric(text, TINY)
        assert result.scores == expected and result.total == 75 and result.valid, (text, result.problems)
    bad = parse_rubric("Ideas: 40/40\nOrder: 20/30\nSpelling: 15/20\nTotal: 75", TINY)
    assert not bad.valid and "ideas written out of 40; its maximum is 50" in bad.problems
    # The summary rubric's labels mean nothing here, and the other way round.
    assert parse_rubric(CANON, TINY).scores == dict.fromkeys(TINY_MAXES)
    assert parse_rubric("Ideas: 40/50\nOrder: 20/30\nSpelling: 15/20\nTotal: 75", SUMMARY_RUBRIC).scores == NONE


def test_non_string_input_has_the_spec_keys() -> None:
    result = parse_rubric(None, TINY)  # type: ignore[arg-type]
    assert list(result.scores) == list(result.comments) == list(TINY_MAXES) and not result.valid


def test_intro_right_above_a_second_evaluation_is_not_kept() -> None:
    second = CANON.replace("32/40", "20/40").replace("78/", "66/")
    for between in ("\n\n다시 평가하면:\n", "\n\n다시 평가하면:\n\n"):
        result = parse_rubric(CANON + between + second, SUMMARY_RUBRIC)
        check(result, S, 78, True)
        assert result.suggestions == "- 더 짧게."


@pytest.mark.parametrize("change, match", [
    ({"criteria": {}}, "criteria is empty"),
    ({"criteria": {"total": (100, "총점", "Total")}}, "heading name"),
    ({"criteria": {"a": (60, "가", "A"), "b": (30, "나", "B")}}, "add up to 90, not max_total=100"),
    ({"criteria": {"a": (100.0, "가", "A")}}, r"criteria\['a'\]"),
    ({"criteria": {"a": (100, "", "A")}}, r"criteria\['a'\]"),
    ({"titles": {"fr": "Évaluation :"}}, "use 'ko' and/or 'en'"),
    ({"headings": {"en": {"total": "T"}}}, r"headings\['en'\] has keys"),
    ({"titles": {"ko": "평가:", "en": "Review:"}, "headings": {"en": SECTION_HEADINGS["en"]}},
     r"headings\['ko'\] has keys"),
    ({"aliases": {"style": ("x",)}}, "unknown keys"),
    ({"aliases": {"a": ("(",)}}, "not a valid regular expression"),
    ({"aliases": {"a": "alpha"}}, "tuple of non-empty patterns"),
    ({"criteria": {"a": (True, "가", "A")}, "max_total": 1}, r"criteria\['a'\]"),
])
def test_spec_rejects_bad_fields(change: dict, match: str) -> None:
    fields = {"criteria": {"a": (100, "가", "A")}, "titles": {"en": "Review:"}} | change
    with pytest.raises(ValueError, match=match):
        RubricSpec(**fields)


def test_spec_is_read_only() -> None:
    with pytest.raises(TypeError):
        SUMMARY_RUBRIC.criteria["style"] = (10, "문체", "Style")  # type: ignore[index]
    with pytest.raises(AttributeError):
        SUMMARY_RUBRIC.max_total = 90  # type: ignore[misc]


def test_evaluation_exports_no_tasks_rubric() -> None:
    """Each rubric lives beside its task; the shared evaluation code takes it as an argument."""
    assert not {"CRITERIA", "MAX_TOTAL", "SUMMARY_RUBRIC"} & set(dir(gemma_lowmem.evaluation))
    assert not {"CRITERIA", "MAX_TOTAL", "SUMMARY_RUBRIC"} & set(dir(gemma_lowmem.evaluation.rubric))


@pytest.mark.parametrize("lang", ["ko", "en"])
@pytest.mark.parametrize("spec", [SUMMARY_RUBRIC, ESSAY_RUBRIC], ids=["summary", "essay"])
def test_render_rubric_spans_point_at_the_scores(spec, lang):
    scores = {key: maximum - i for i, (key, (maximum, _, _)) in enumerate(spec.criteria.items())}
    comments = dict.fromkeys(spec.criteria, "A comment with 12 numbers 3.")
    text, spans = render_rubric_spans(scores, "Feedback 40.", "- Do 2 things.", comments, lang, spec)
    assert text == render_rubric(scores, "Feedback 40.", "- Do 2 things.", comments, lang, spec)
    assert [text[a:b] for a, b in spans] == [*map(str, scores.values()), str(sum(scores.values()))]
