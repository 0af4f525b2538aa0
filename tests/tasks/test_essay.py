"""Task 3 (essay scoring and critical writing): rubric format, targets, feedback, data, metrics, tiny training runs."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from gemma_lowmem.config import DataConfig, LoraConfig, TrainConfig
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.rubric import render_rubric
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.tasks import essay, essay_write, sources
from gemma_lowmem.tasks.essay import (
    ASAP_SCALES,
    build_conversation,
    build_datasets,
    clean_essay,
    from_rubric,
    normalise_essay,
    score_outputs,
    scoring_prompt,
    to_rubric,
    trait_strengths,
)
from gemma_lowmem.tasks.essay_feedback import essay_features, split_total, write_feedback
from gemma_lowmem.tasks.essay_rubric import ESSAY_CRITERIA, ESSAY_RUBRIC
from gemma_lowmem.tasks.sources import BadRow
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
ASAP = SHARED / "essays" / "asap_aes_sample800.jsonl"
CNN_VAL = SHARED / "cnn_dailymail" / "validation_first1000.jsonl"
HANGUL = re.compile(r"[가-힣]")
KEYS = list(ESSAY_CRITERIA)

GOOD_EN = ("I believe our school should start classes an hour later. Teenagers need more sleep to learn well.\n\n"
           "First, studies show that students who sleep eight hours remember more. For example, one survey found "
           "that grades rose after a later start.\n\n"
           "Some people argue that a later start makes sports practice harder. However, practice can move to the "
           "weekend mornings.\n\n"
           "In conclusion, a later start would help students learn, so the school should try it.")
WEAK_EN = ("School is ok. School starts early. I am tired. My friend is tired. The bus is early. The bell rings. "
           "We go to class.")
ESSAYS = [  # local rows in the ASAP form, two prompts on their own scales
    {"essay_id": 1, "essay_set": "p1", "prompt": "Should school start later?", "essay": GOOD_EN, "score": 6,
     "score_min": 1, "score_max": 6},
    {"essay_id": 2, "essay_set": "p1", "prompt": "Should school start later?", "essay": WEAK_EN, "score": 2,
     "score_min": 1, "score_max": 6},
    {"essay_id": 3, "essay_set": "p1", "prompt": "Should school start later?", "essay": GOOD_EN[:200], "score": 4,
     "score_min": 1, "score_max": 6},
    {"essay_id": 4, "essay_set": "p2", "prompt": "Explain the setting.", "essay": WEAK_EN, "score": 0,
     "score_min": 0, "score_max": 3},
    {"essay_id": 5, "essay_set": "p2", "prompt": "Explain the setting.", "essay": GOOD_EN, "score": 3,
     "score_min": 0, "score_max": 3},
    {"essay_id": 6, "essay_set": "p2", "prompt": "Explain the setting.", "essay": GOOD_EN[:300], "score": 2,
     "score_min": 0, "score_max": 3},
]
ARTICLE = ("The city council of Harlow voted on Monday to close the old bridge over the river for repairs. "
           "Engineers found 14 cracks in the steel supports during an inspection in March. "
           "The repairs will cost about 2.5 million dollars and take eight months. "
           "Shop owners near the bridge warned that the closure will cut their sales. "
           "Buses will use a detour through the north of the city until the work ends.")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _answer(scores: dict[str, int], lang: str = "en") -> str:
    return render_rubric(scores, "Fine.", "- Keep going.", {k: "ok" for k in KEYS}, lang, ESSAY_RUBRIC)


# ------------------------------------------------------------------------------------------------ rubric format

SCORES = {"claim": 20, "evidence": 18, "counter": 8, "organization": 15, "expression": 12}  # total 73
ESSAY_JSON = {"claim": 20, "evidence": 18, "counter": 8, "organization": 15, "expression": 12, "total": 73,
              "feedback": "Fine.", "suggestions": ["Add data."]}


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_render_and_parse_round_trip(lang):
    text = render_rubric(SCORES, "첫 줄.\n둘째 줄.", "- 하나\n- 둘", {k: f"{k} 코멘트" for k in KEYS}, lang,
                         ESSAY_RUBRIC)
    assert text.startswith("에세이 평가 결과:" if lang == "ko" else "Essay evaluation:")
    assert "**총점: 73/100**" in text if lang == "ko" else "**Total score: 73/100**" in text
    parsed = parse_rubric(text, ESSAY_RUBRIC)
    assert parsed.valid and parsed.problems == [] and parsed.total == 73
    assert parsed.scores == SCORES and parsed.comments == {k: f"{k} 코멘트" for k in KEYS}
    assert parsed.feedback == "첫 줄.\n둘째 줄." and parsed.suggestions == "- 하나\n- 둘"


@pytest.mark.parametrize("scores, comments, match", [
    ({**SCORES, "claim": 26}, {}, r"claim.*within \[0, 25\]"),
    ({**SCORES, "counter": 7.5}, {}, "whole number"),
    ({**SCORES, "counter": True}, {}, "whole number"),
    ({k: v for k, v in SCORES.items() if k != "expression"}, {}, "exactly the keys"),
    (SCORES, {"grammar": "x"}, "exactly the keys"),
])
def test_render_rejects_bad_input(scores, comments, match):
    with pytest.raises(ValueError, match=match):
        render_rubric(scores, "f", "s", comments, "ko", ESSAY_RUBRIC)


@pytest.mark.parametrize("text", [
    # plain labels, points
    "Claim: 20\nEvidence: 18\nCounter-arguments: 8\nOrganization: 15\nExpression: 12\nTotal: 73",
    # Korean short labels with 점 units, shuffled order
    "총점: 73점\n표현: 12점\n구성: 15점\n반론: 8점\n근거: 18점\n주장: 20점",
    # N out of M and synonyms
    "Thesis - 20 out of 25\nSupporting evidence - 18 out of 25\nRebuttal - 8 out of 15\nStructure - 15 out of 20\n"
    "Grammar - 12 out of 15\nOverall score - 73 out of 100",
    # numbered bold list with maxima first
    "1. **주장의 명확성**: 25점 만점에 20점\n2. **근거의 타당성**: 25점 만점에 18점\n"
    "3. **반론 고려**: 15점 만점에 8점\n4. **구성**: 20점 만점에 15점\n5. **표현**: 15점 만점에 12점\n"
    "**총점**: 100점 만점에 73점",
    # echoed maxima in parentheses
    "주장의 명확성 (25점): 20\n근거의 타당성 (25점): 18\n반론 고려 (15점): 8\n구성 (20점): 15\n"
    "표현 (15점): 12\n총점 (100점): 73",
    # score on the line after its label
    "Clarity of claim:\n20/25\nEvidence and reasoning:\n18/25\nCounter-arguments:\n8/15\nOrganisation:\n15/20\n"
    "Expression:\n12/15\nTotal score:\n73/100",
    # a Markdown table
    "| 항목 | 점수 | 코멘트 |\n|---|---|---|\n| 주장의 명확성 | 20/25 | 분명함 |\n| 근거의 타당성 | 18/25 | 좋음 |\n"
    "| 반론 고려 | 8/15 | 약함 |\n| 구성 | 15/20 | 보통 |\n| 표현 | 12/15 | 좋음 |\n| 총점 | 73/100 | |",
    # chatter around it, full-width digits, "점수:" word
    "좋습니다. 평가는 다음과 같습니다.\n주장의 명확성 점수: ２０/25\n근거: 18/25\n반론 고려: 8/15\n조직성: 15/20\n"
    "문장 표현: 12/15\n합계: 73/100\n이상입니다.",
    # decimals written as whole numbers, points unit
    "Claim clarity: 20.0 points\nEvidence: 18 pts\nCounterarguments: 8 points\nCoherence: 15 points\n"
    "Language use: 12 points\nFinal score: 73 points",
    # tables: score and maximum columns, no header, transposed, bold cells
    "| Criterion | Score | Max | Comment |\n|---|---|---|---|\n| Clarity of claim | 20 | 25 | Clear |\n"
    "| Evidence and reasoning | 18 | 25 | Good |\n| Counter-arguments | 8 | 15 | Thin |\n| Organisation | 15 | 20 | |\n"
    "| Expression | 12 | 15 | |\n| Total | 73 | 100 | |",
    "| 주장의 명확성 | 20/25 | 분명함 |\n| 근거의 타당성 | 18/25 | 좋음 |\n| 반론 고려 | 8/15 | 약함 |\n"
    "| 구성 | 15/20 | 보통 |\n| 표현 | 12/15 | 좋음 |\n| 총점 | 73/100 | |",
    "| 주장의 명확성 | 근거의 타당성 | 반론 고려 | 구성 | 표현 | 총점 |\n|:-:|:-:|:-:|:-:|:-:|:-:|\n"
    "| 20 | 18/25 | 8점 | 15 | 12 | 73 |",
    "| 평가 항목 | 점수 |\n|---|---|\n| **주장** | **20** |\n| **근거** | **18** |\n| **반론** | **8** |\n"
    "| **구성** | **15** |\n| **표현** | **12** |\n| **총점** | **73** |",
    # JSON: flat, fenced with chatter, nested with maxima, records with Korean names, string numbers
    json.dumps(ESSAY_JSON),
    "평가 결과입니다.\n\n```json\n" + json.dumps(ESSAY_JSON, indent=2) + "\n```\n감사합니다.",
    json.dumps({"scores": {k: {"score": v, "max": m, "comment": "ok"} for (k, (m, _, _)), v
                           in zip(ESSAY_CRITERIA.items(), SCORES.values())}, "total_score": 73}),
    json.dumps({"평가": [{"항목": ko, "점수": SCORES[k]} for k, (_, ko, _) in ESSAY_CRITERIA.items()],
                "총점": 73}, ensure_ascii=False),
    '{"claim": "20/25", "evidence": "18점", "counter": "８", "organization": 15, "expression": 12, '
    '"total": "73/100"}',
    # bold labels, colon inside the bold, headings, circled numbers
    "**주장의 명확성:** 20/25\n**근거의 타당성:** 18/25\n**반론 고려:** 8/15\n**구성:** 15/20\n**표현:** 12/15\n"
    "**총점:** 73/100",
    "## Total score: 73/100\n### Clarity of claim: 20/25\n### Evidence and reasoning: 18/25\n"
    "### Counter-arguments: 8/15\n### Organisation: 15/20\n### Expression: 12/15",
    "① 주장: 20/25\n② 근거: 18/25\n③ 반론: 8/15\n④ 구성: 15/20\n⑤ 표현: 12/15\n총점은 73점입니다.",
    # a score inside parentheses after the label, or after the comment
    "- 주장의 명확성 (20/25): 분명하다.\n- 근거의 타당성 [18/25]: 좋다.\n- 반론 고려: 반론이 약함 (8/15)\n"
    "- 구성 (15/20)\n- 표현 (12/15)\n- 총점 (73/100)",
])
def test_parse_variants_read_the_same_numbers(text):
    parsed = parse_rubric(text, ESSAY_RUBRIC)
    assert parsed.scores == SCORES, (parsed.scores, parsed.problems)
    assert parsed.total == 73 and parsed.valid, parsed.problems


def test_parse_keeps_first_evaluation_and_sections():
    text = _answer(SCORES) + "\n\nRevised evaluation:\n" + _answer({k: 0 for k in KEYS})
    parsed = parse_rubric(text, ESSAY_RUBRIC)
    assert parsed.total == 73 and parsed.scores == SCORES and parsed.valid
    assert parsed.feedback == "Fine." and parsed.suggestions == "- Keep going."
    inline = parse_rubric("Claim: 20/25\nEvidence: 18/25\nCounter: 8/15\nStructure: 15/20\nStyle: 12/15\n"
                          "Total: 73/100\nFeedback: Clear and well argued.\nSuggestions: Add data.", ESSAY_RUBRIC)
    assert inline.feedback == "Clear and well argued." and inline.suggestions == "Add data."


@pytest.mark.parametrize("text, problem", [
    ("Claim: 20\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12", "missing total; computed 73"),
    ("Claim: 20\nEvidence: 18\nCounter: 8\nStructure: 15\nTotal: 61", "missing score for expression"),
    ("Claim: 20/20\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12\nTotal: 73", "claim written out of 20"),
    ("Claim: 30\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12\nTotal: 83", "outside [0, 25]"),
    ("Claim: 20\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12\nTotal: 90", "differs from the sum"),
    ("Claim: 20\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12\nTotal: 73/50", "total written out of 50"),
    ("Claim: -2\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12\nTotal: 51", "outside [0, 25]"),
])
def test_parse_flags_invalid_answers(text, problem):
    parsed = parse_rubric(text, ESSAY_RUBRIC)
    assert not parsed.valid and any(problem in p for p in parsed.problems), parsed.problems


def test_missing_total_is_computed_but_invalid():
    parsed = parse_rubric("Claim: 20\nEvidence: 18\nCounter: 8\nStructure: 15\nExpression: 12", ESSAY_RUBRIC)
    assert parsed.total == 73 and parsed.total_computed and not parsed.valid


@pytest.mark.parametrize("text", ["", "I cannot grade this.", "주장이 분명합니다. 표현이 좋습니다.", None, 42,
                                  '{"claim": 20, "total": 73}', "Total: \n\n", "|||\n|---|", "Claim: NaN"])
def test_parse_never_raises_on_garbage(text):
    parsed = parse_rubric(text, ESSAY_RUBRIC)
    assert not parsed.valid and parsed.problems and not any("internal" in p for p in parsed.problems)


def test_prose_starting_with_a_label_is_not_a_score():
    parsed = parse_rubric(_answer(SCORES).replace("Fine.", "Expression is clear in 3 places."), ESSAY_RUBRIC)
    assert parsed.scores["expression"] == 12 and parsed.feedback == "Expression is clear in 3 places."


@pytest.mark.parametrize("lang", ["ko", "en"])
@pytest.mark.parametrize("seed", range(10))
def test_render_and_parse_round_trip_random_scores(lang, seed):
    rng = random.Random(seed)
    maxes = {k: m for k, (m, _, _) in ESSAY_CRITERIA.items()}
    scores = {k: rng.choice([0, m, rng.randint(0, m)]) for k, m in maxes.items()}  # extremes look like maxima
    comments = {k: f"{k} 코멘트" for k in KEYS if rng.random() < 0.7}
    parsed = parse_rubric(render_rubric(scores, "피드백.", "- 제안.", comments, lang, ESSAY_RUBRIC), ESSAY_RUBRIC)
    assert parsed.valid and parsed.problems == [] and parsed.total == sum(scores.values())
    assert parsed.scores == scores and parsed.comments == {k: comments.get(k) for k in KEYS}
    assert (parsed.feedback, parsed.suggestions) == ("피드백.", "- 제안.")


def test_essay_rubric_checks_and_first_evaluation():
    nested = json.dumps({"claim": {"score": 20, "max": 20}} | {k: v for k, v in ESSAY_JSON.items() if k != "claim"})
    assert "claim written out of 20; its maximum is 25" in parse_rubric(nested, ESSAY_RUBRIC).problems
    later_json = _answer(SCORES) + "\n\n```json\n" + json.dumps(ESSAY_JSON | {"claim": 1, "total": 54}) + "\n```"
    parsed = parse_rubric(later_json, ESSAY_RUBRIC)
    assert parsed.scores == SCORES and parsed.total == 73 and parsed.valid
    table = ("| 항목 | 점수 |\n|---|---|\n| 주장 | 20 |\n| 근거 | 18 |\n| 반론 | 8 |\n| 구성 | 15 |\n| 표현 | 12 |\n"
             "| 총점 | 73 |\n\n| 항목 | 점수 |\n|---|---|\n| 주장 | 5 |")
    assert parse_rubric(table, ESSAY_RUBRIC).scores == SCORES


def test_each_spec_reads_only_its_own_labels():
    essay_answer = _answer(SCORES)
    summary_answer = render_rubric({"coverage": 32, "accuracy": 24, "conciseness": 14, "grammar": 8}, "Fine.",
                                   "- Shorter.", {}, "en", SUMMARY_RUBRIC)
    as_essay = parse_rubric(summary_answer, ESSAY_RUBRIC)  # "Grammar and expression" is read as expression
    assert as_essay.scores == dict.fromkeys(KEYS) | {"expression": 8} and not as_essay.valid
    as_summary = parse_rubric(essay_answer, SUMMARY_RUBRIC)  # and "Expression" as grammar
    assert as_summary.scores == {"coverage": None, "accuracy": None, "conciseness": None, "grammar": 12}
    assert not as_summary.valid
    assert parse_rubric(summary_answer, SUMMARY_RUBRIC).valid and parse_rubric(essay_answer, ESSAY_RUBRIC).valid


# ------------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("total, expected", [
    (60, {"claim": 15, "evidence": 15, "counter": 9, "organization": 12, "expression": 9}),
    (100, {"claim": 25, "evidence": 25, "counter": 15, "organization": 20, "expression": 15}),
    (0, dict.fromkeys(KEYS, 0)),
    (1, {"claim": 1, "evidence": 0, "counter": 0, "organization": 0, "expression": 0}),
    (73, {"claim": 18, "evidence": 18, "counter": 11, "organization": 15, "expression": 11}),
])
def test_split_total_without_traits_is_proportional(total, expected):
    assert split_total(total) == expected


def test_split_total_with_traits_leans_and_stays_within_range():
    # Weights 25*(0.1+1), 25*(0.1+0), 15*.6, 20*.6, 15*.6 -> shares of 60: 27.5 / 2.5 / 9 / 12 / 9 over 60 = ...
    parts = split_total(60, {"claim": 1.0, "evidence": 0.0})
    assert sum(parts.values()) == 60 and parts["claim"] == 25  # capped at its maximum; the rest is shared out
    assert parts["evidence"] < parts["counter"]
    for total in range(101):
        for strengths in (None, {"claim": 0.2, "expression": 1.0}, dict.fromkeys(KEYS, 0.0)):
            parts = split_total(total, strengths)
            assert sum(parts.values()) == total
            assert all(0 <= parts[k] <= m for k, (m, _, _) in ESSAY_CRITERIA.items())
    with pytest.raises(ValueError):
        split_total(101)


@pytest.mark.parametrize("essay_set", sorted(ASAP_SCALES))
def test_rubric_scale_round_trips_every_asap_score(essay_set):
    lo, hi = ASAP_SCALES[essay_set]
    for score in range(lo, hi + 1):
        assert from_rubric(to_rubric(score, lo, hi), lo, hi) == score
    assert to_rubric(lo, lo, hi) == 0 and to_rubric(hi, lo, hi) == 100
    assert from_rubric(-40, lo, hi) == lo and from_rubric(250, lo, hi) == hi


def test_trait_strengths_for_asap_sets():
    set7 = {"essay_set": 7, "traits": {"rater1_trait1": 3, "rater2_trait1": 1, "rater1_trait2": 0, "rater2_trait2": 0,
                                       "rater1_trait3": 3, "rater2_trait3": 3, "rater1_trait4": 0, "rater2_trait4": 0}}
    s = trait_strengths(set7, 15, 0, 30)
    assert s["claim"] == pytest.approx(2 / 3) and s["organization"] == 0 and s["expression"] == pytest.approx(0.5)
    set8 = {"essay_set": 8, "traits": {f"rater1_trait{t}": v for t, v in zip(range(1, 7), (6, 1, 6, 6, 1, 1))}}
    s = trait_strengths(set8, 30, 0, 60)
    assert s["evidence"] == 1.0 and s["organization"] == 0.0 and s["expression"] == pytest.approx(0.5)
    s = trait_strengths({"essay_set": 2, "domain2_score": 4}, 2, 1, 6)
    assert s["claim"] == pytest.approx(0.2) and s["expression"] == 1.0
    assert trait_strengths({"essay_set": 1}, 7, 2, 12) is None
    assert trait_strengths({"essay_set": "p1", "traits": {"rater1_trait1": 3}}, 3, 1, 6) is None


def test_clean_essay_turns_space_runs_into_paragraphs():
    assert clean_essay("First part.     Second part.  Still second.    Third.") == \
        "First part.\n\nSecond part. Still second.\n\nThird."
    assert clean_essay("Line one.\n\n\n\nLine   two.\n") == "Line one.\n\nLine two."


def test_features_and_feedback_from_the_essay():
    f = essay_features(GOOD_EN)
    assert (f["paragraphs"], f["sentences"]) == (4, 7) and f["claim_early"]
    assert f["markers"]["counter"] == ["Some people", "However"] and f["markers"]["conclusion"] == ["In conclusion"]
    assert f["markers"]["evidence"][:2] == ["studies", "For example"]
    weak = essay_features(WEAK_EN)
    assert weak["markers"]["counter"] == [] and weak["mean_sentence_words"] < 4 and not weak["claim_early"]
    scores = split_total(30)
    feedback, suggestions, comments = write_feedback(weak, scores, "en")
    assert "No opposing view is taken up." in feedback and "7 sentences and 1 paragraph." in feedback
    assert 1 <= suggestions.count("\n- ") + 1 <= 3 and suggestions.startswith("- ")
    assert set(comments) == set(KEYS) and "no counter-argument marker" in comments["counter"]
    feedback_ko, suggestions_ko, comments_ko = write_feedback(f, split_total(95), "ko")
    assert HANGUL.search(feedback_ko) and feedback_ko.startswith("설득력 있는 좋은 글입니다.")
    assert "'Some people' 같은 표현으로 반대 의견을 다룹니다." in feedback_ko
    assert comments_ko["organization"] == "문단 구성과 흐름이 논리적입니다(4개 문단)."
    repeated = essay_features("Phones phones phones. " * 3 + "Phones are bad for phones.")
    assert repeated["top_word"] == "phones" and repeated["top_count"] == 11


# ------------------------------------------------------------------------------------------------ scoring data


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_scoring_conversation_targets_parse_back(lang):
    rows = [normalise_essay(r) for r in ESSAYS]
    for row in rows:
        conv = build_conversation(row, lang)
        assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
        assert conv.cut == row["essay"] and row["essay"] in conv.messages[1]["content"]
        assert row["prompt"] in conv.messages[1]["content"]
        parsed = parse_rubric(conv.messages[-1]["content"], ESSAY_RUBRIC)
        assert parsed.valid, parsed.problems
        assert parsed.scores == {k: conv.meta["scores"][k] for k in KEYS}
        assert parsed.total == conv.meta["scores"]["total"] == to_rubric(row["score"], row["score_min"],
                                                                         row["score_max"])
        assert bool(HANGUL.search(parsed.feedback)) == (lang == "ko")
        assert scoring_prompt(row["essay"], row["prompt"], lang) == conv.messages[:2]
        assert build_conversation(row, lang).messages == conv.messages  # no randomness in the targets
        json.dumps(conv.meta)
    assert "주장의 명확성 (25점)" in scoring_prompt("x", None, "ko")[0]["content"]
    assert "Task:" not in scoring_prompt("x", None, "en")[1]["content"]


@pytest.mark.parametrize("row, match", [
    ({"score": 3, "score_min": 1, "score_max": 6}, "missing essay text"),
    ({"essay": "Text.", "score_min": 1, "score_max": 6}, "missing field 'domain1_score'"),
    ({"essay": "Text.", "score": 3}, "scale is unknown"),
    ({"essay": "Text.", "score": 9, "score_min": 1, "score_max": 6}, r"outside its scale \[1, 6\]"),
    ({"essay": "Text.", "score": "high", "score_min": 1, "score_max": 6}, "must be a number"),
    ({"essay": "Text.", "score": 3, "score_min": 6, "score_max": 1}, "must be below"),
])
def test_normalise_essay_rejects_bad_rows(row, match):
    with pytest.raises(BadRow, match=match):
        normalise_essay(row)


def test_normalise_knows_asap_scales_and_field_aliases():
    row = normalise_essay({"essay_id": 9, "essay_set": 8, "essay": "A  story.", "domain1_score": 40})
    assert (row["score_min"], row["score_max"], row["set"], row["id"]) == (0, 60, "8", "9")
    row = normalise_essay({"full_text": "Text.", "score": 5}, default_scale=(1, 6))
    assert row["set"] == "all" and row["id"].startswith("essay-") and row["prompt"] is None


def test_local_file_with_prompts_file_and_errors(tmp_path):
    rows = [{"essay_id": i, "essay_set": 3, "essay": f"Essay number {i}.", "domain1_score": i % 4} for i in range(8)]
    path = _write_jsonl(tmp_path / "asap.jsonl", rows)
    (tmp_path / "asap_prompts.json").write_text(json.dumps({"3": {"prompt": "Describe the cyclist."}}), "utf-8")
    data = essay.load_data(DataConfig(task="essay", data=str(path)))
    assert len(data.train) == 7 and len(data.val) == 1
    assert {r["prompt"] for r in data.train} == {"Describe the cyclist."}
    bad = _write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"essay_id": 99, "essay": "x", "domain1_score": 2}])
    with pytest.raises(UserError, match=r"bad\.jsonl: record 3: the score's scale is unknown"):
        essay.load_data(DataConfig(task="essay", data=str(bad)))
    data = essay.load_data(DataConfig(task="essay", data=str(bad), skip_bad_rows=True))
    assert data.bad_rows.count == 1 and len(data.train) + len(data.val) == 2


def test_validation_is_held_out_per_set_and_limits_balance(tmp_path):
    path = _write_jsonl(tmp_path / "essays.jsonl", ESSAYS * 4)
    data = essay.load_data(DataConfig(task="essay", train_file=str(path), max_train_samples=6))
    assert Counter(r["set"] for r in data.val) == {"p1": 1, "p2": 1}
    assert Counter(r["set"] for r in data.train) == {"p1": 3, "p2": 3}


def test_hub_default_is_aes2_on_a_one_to_six_scale(monkeypatch):
    calls = []

    def fake_hub(name, config, split, columns=None):
        calls.append((name, config, split))
        return [{"essay_id": f"h{i}", "full_text": GOOD_EN, "score": 1 + i % 6} for i in range(10)]

    monkeypatch.setattr(sources, "load_hub_records", fake_hub)
    train, val = build_datasets(DataConfig(task="essay", max_train_samples=10), seed=0)
    assert calls == [("tasksource/AES2-essay-scoring", None, "train[:10]")]
    assert len(train) == 9 and len(val) == 1
    assert all(c.meta["score_min"] == 1 and c.meta["score_max"] == 6 for c in train)


def test_holdout_and_balanced_limits():
    train, val = sources.holdout([{"set": str(i)} for i in range(10)], 0.2, "x", group="set")
    assert (len(train), len(val)) == (8, 2)  # every set a single essay: drawn from all rows
    rows = [{"set": "a", "i": i} for i in range(4)] + [{"set": "b", "i": 4}]
    train, val = sources.holdout(rows, 0.25, "x", group="set")
    assert len(val) == 1 and val[0]["set"] == "a" and {"set": "b", "i": 4} in train
    assert sources.holdout(rows, 0.25, "x", group="set") == (train, val)  # fixed seed
    with pytest.raises(UserError, match="need at least 2"):
        sources.holdout(rows[:1], 0.1, "file.jsonl")
    assert [r["i"] for r in sources.take_balanced(rows, 3, "set")] == [0, 1, 4]
    assert sources.take_balanced(rows, 2, None) == rows[:2] and sources.take_balanced(rows, None, "set") == rows


def test_no_default_data_set_is_a_user_error():
    with pytest.raises(UserError, match="has no default data set"):
        sources.load_rows(DataConfig(task="x"), dict, fields=(), demo_file=Path("none.jsonl"), hub=None)


def test_demo_essays_build():
    assert essay.DEMO_FILE.exists()
    train, val = build_datasets(DataConfig(task="essay", demo=True), seed=0)
    assert (len(train), len(val)) == (12, 4)
    assert len({c.meta["set"] for c in val}) == 4
    rows = [json.loads(line) for line in essay.DEMO_FILE.read_text(encoding="utf-8").splitlines()]
    assert Counter(r["lang"] for r in rows) == {"ko": 8, "en": 8}
    assert all(1 <= r["score"] <= 6 for r in rows)
    totals = {c.meta["id"]: c.meta["scores"]["total"] for c in train + val}
    assert totals["essay-ko-001"] == 100 and totals["essay-en-004"] == 0


def test_summary_statistics():
    convs = [build_conversation(normalise_essay(r), "en") for r in ESSAYS]
    stats = essay.summary_statistics(convs)
    assert stats["conversations"] == 6 and stats["sets"]["p2"] == {"n": 3, "scale": [0, 3], "mean_score": 5 / 3,
                                                                  "mean_total": pytest.approx(55.67, abs=0.01)}
    # totals: p1 scores 6, 2, 4 on 1-6 -> 100, 20, 60; p2 scores 0, 3, 2 on 0-3 -> 0, 100, 67
    assert stats["scores"]["total"] == {"mean": pytest.approx(347 / 6), "min": 0, "max": 100}
    writing = essay_write.build_conversations([{"id": "a", "article": ARTICLE}] * 5, "en", seed=0)
    stats = essay_write.summary_statistics(writing)
    assert stats["conversations"] == 5 and sum(stats["kinds"].values()) == 5 and stats["target_words_mean"] > 80


# ------------------------------------------------------------------------------------------------ scoring metrics


def _set_convs(humans: list[int], lo: int, hi: int, set_id: str) -> list:
    return [build_conversation(normalise_essay({"essay_id": f"{set_id}{i}", "essay_set": set_id, "essay": GOOD_EN,
                                                "score": h, "score_min": lo, "score_max": hi}), "en")
            for i, h in enumerate(humans)]


def test_scoring_metrics_hand_computed():
    convs = _set_convs([0, 1, 2, 3], 0, 3, "a")
    outputs = [_answer(split_total(t)) for t in (0, 33, 67, 67)]  # back on 0-3: 0, 1, 2, 2
    result = score_outputs(convs, outputs)
    per_set = result["metrics"]["per_set"]["a"]
    # Hand-computed QWK of (0,1,2,2) vs (0,1,2,3) on 0-3: 1 - (1/9) / (32/36) = 0.875.
    assert per_set["qwk"] == pytest.approx(0.875)
    assert per_set["spearman"] == pytest.approx(math.sqrt(0.9))  # ranks (1,2,3.5,3.5) vs (1,2,3,4)
    assert per_set["mae"] == pytest.approx(0.25) and per_set["n_valid"] == 4
    assert [r["pred"] for r in result["rows"]] == [0, 1, 2, 2]
    assert result["metrics"]["mae_rubric"] == pytest.approx(33 / 4)  # |67 - 100| on the last one
    assert result["plots"]["scores"]["x"] == [0, 33, 67, 100] and result["plots"]["scores"]["kind"] == "scatter"
    json.dumps(result)


def test_plot_specs_draw(tmp_path):
    from gemma_lowmem.evaluation.report import plot

    convs = _set_convs([1, 2, 3], 1, 6, "p")
    spec = score_outputs(convs, [c.messages[-1]["content"] for c in convs])["plots"]["scores"]
    assert spec["limits"] == [0, 100] and plot(spec, tmp_path / "scores.png").stat().st_size > 0
    writing = essay_write.build_conversations([{"id": "a", "article": ARTICLE}], "en", seed=0)
    spec = essay_write.score_outputs(writing, ["An essay."])["plots"]["length_vs_grounding"]
    assert plot(spec, tmp_path / "grounding.png").stat().st_size > 0


def test_scoring_metrics_perfect_and_garbage():
    convs = _set_convs([1, 2, 3, 4, 5, 6], 1, 6, "p") + _set_convs([0, 10, 20, 30], 0, 30, "q")
    perfect = score_outputs(convs, [c.messages[-1]["content"] for c in convs])["metrics"]
    assert perfect["mean_qwk"] == 1.0 and perfect["valid_rate"] == 1.0 and perfect["mae_rubric"] == 0.0
    assert perfect["per_set"]["q"]["spearman"] == pytest.approx(1.0)
    assert perfect["criteria_mae"] == dict.fromkeys(KEYS, 0.0)
    garbage = score_outputs(convs, ["no idea"] * len(convs))
    m = garbage["metrics"]
    assert m["valid_rate"] == 0.0 and m["total_rate"] == 0.0 and m["mean_qwk"] is None
    assert m["per_set"]["p"] == {"n": 6, "n_valid": 0, "qwk": None, "spearman": None, "mae": None}
    assert garbage["plots"]["scores"]["x"] == [] and all(r["pred"] is None for r in garbage["rows"])
    with pytest.raises(ValueError, match="must pair up"):
        score_outputs(convs, [])


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_writing_conversations_quote_the_article(lang):
    record = {"id": "a1", "article": ARTICLE}
    convs = [essay_write.build_conversation(record, kind, lang, seed=0) for kind in essay_write.KINDS]
    for conv in convs:
        target = conv.messages[-1]["content"]
        assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
        assert conv.cut == ARTICLE and ARTICLE in conv.messages[1]["content"]
        assert conv.meta["question"] in conv.messages[1]["content"] and "The city council of Harlow" in \
            conv.meta["question"]
        assert target.count("\n\n") == 4  # claim, two reasons, counter-argument, conclusion
        assert all(s in target for s in conv.meta["quoted"]) and len(conv.meta["quoted"]) == 3
        assert "Shop owners near the bridge warned" in conv.meta["quoted"][2]  # the contrast sentence
        markers = essay_features(target)["markers"]
        assert all(markers[k] for k in ("claim", "evidence", "counter", "conclusion")), markers
        assert bool(HANGUL.search(target)) == (lang == "ko")
    assert len({c.messages[-1]["content"].split("\n\n")[0] for c in convs}) == 4  # one claim per kind


def test_writing_kinds_and_determinism():
    kinds = essay_write.assign_kinds(10, seed=1)
    assert set(kinds[:4]) == set(essay_write.KINDS) == set(kinds[4:8]) and len(kinds) == 10
    records = [{"id": f"r{i}", "article": ARTICLE.replace("Harlow", f"Town{i}")} for i in range(6)]
    first = essay_write.build_conversations(records, "en", seed=4)
    assert [c.messages for c in first] == [c.messages for c in essay_write.build_conversations(records, "en", 4)]
    short = essay_write.model_essay("Only one sentence in this very short article.", "agree", "en",
                                    random.Random(0))
    assert short[0].count("\n\n") == 3 and "one article cannot tell the whole story" in short[0]


def test_grounding_and_writing_metrics():
    assert essay_write.grounding(ARTICLE, ARTICLE) == {"rouge1_recall": 1.0, "rouge1_precision": 1.0,
                                                      "grounded_sentences": 1.0}
    assert essay_write.grounding("", ARTICLE) == {"rouge1_recall": 0.0, "rouge1_precision": 0.0,
                                                 "grounded_sentences": 0.0}
    half = "Engineers found 14 cracks in the steel supports. Penguins enjoy cold water near icy southern coasts."
    assert essay_write.grounding(half, ARTICLE)["grounded_sentences"] == 0.5
    convs = essay_write.build_conversations([{"id": "a", "article": ARTICLE}] * 2, "en", seed=0)
    scorer = [_answer(split_total(80)), "nonsense"]
    result = essay_write.score_outputs(convs, [c.messages[-1]["content"] for c in convs[:1]] + [""], scorer)
    m = result["metrics"]
    assert m["empty_rate"] == 0.5 and m["has_counter"] == 0.5 and m["scorer_total_mean"] == 80.0
    assert m["scorer_valid_rate"] == 0.5 and result["rows"][1]["words"] == 0
    assert result["plots"]["length_vs_grounding"]["kind"] == "scatter"
    json.dumps(result)
    with pytest.raises(ValueError, match="must pair up"):
        essay_write.score_outputs(convs, ["x", "y"], ["only one"])


def test_writing_data_sources(tmp_path, monkeypatch):
    train, val = essay_write.build_datasets(DataConfig(task="essay_write", demo=True), seed=0)
    assert (len(train), len(val)) == (40, 10)
    path = _write_jsonl(tmp_path / "articles.jsonl", [{"text": ARTICLE}, {"title": "no article"}])
    with pytest.raises(UserError, match=r"record 2: missing field 'article'"):
        essay_write.load_data(DataConfig(task="essay_write", data=str(path)))
    calls = []

    def fake_hub(name, config, split, columns=None):
        calls.append((name, config, split))
        return [{"id": f"{split}{i}", "article": ARTICLE, "highlights": "x"} for i in range(3)]

    monkeypatch.setattr(sources, "load_hub_records", fake_hub)
    data = essay_write.load_data(DataConfig(task="essay_write", max_train_samples=3, max_val_samples=2))
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "train[:3]"), ("abisee/cnn_dailymail", "3.0.0",
                                                                       "validation[:2]")]
    assert len(data.train) == 3 and len(data.val) == 2


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not ASAP.exists(), reason="shared data not present")
def test_real_asap_essays():
    data = essay.load_data(DataConfig(task="essay", data=str(ASAP), max_train_samples=None, max_val_samples=None))
    assert len(data.train) == 720 and Counter(r["set"] for r in data.val) == {str(s): 10 for s in range(1, 9)}
    assert all(r["prompt"] for r in data.train) and sum(r["strengths"] is not None for r in data.train) >= 250
    assert sum(r["essay"].count("\n\n") > 0 for r in data.train) > 50  # ASAP space runs became paragraphs
    convs = [build_conversation(r, "ko") for r in data.val]
    result = score_outputs(convs, [c.messages[-1]["content"] for c in convs])
    assert result["metrics"]["mean_qwk"] == 1.0 and result["metrics"]["valid_rate"] == 1.0
    # Human scores and the rendered totals agree in order within every set (rescaling is monotone).
    for set_id, stats in result["metrics"]["per_set"].items():
        assert stats["spearman"] == pytest.approx(1.0), set_id


@pytest.mark.skipif(not CNN_VAL.exists(), reason="shared data not present")
def test_real_cnn_articles_give_grounded_template_essays():
    data = essay_write.load_data(DataConfig(task="essay_write", data=str(CNN_VAL), max_train_samples=30,
                                            max_val_samples=5))
    convs = essay_write.build_conversations(data.train, "en", seed=0)
    result = essay_write.score_outputs(convs, [c.messages[-1]["content"] for c in convs])
    m = result["metrics"]
    assert m["has_claim"] == m["has_counter"] == m["has_conclusion"] == 1.0
    assert m["rouge1_precision"] > 0.5 and m["grounded_sentences"] > 0.3, m
    assert not any(c.meta["question"].startswith('The article reports: "(CNN)') for c in convs)


# ------------------------------------------------------------------------------------------------ tiny training


def test_tiny_model_trains_on_scoring_and_writing_conversations(tmp_path):
    from gemma_lowmem.data.collate import collate_for
    from gemma_lowmem.data.tokenize import encode_conversations
    from gemma_lowmem.model import add_lora
    from gemma_lowmem.train import fit
    from tests.tiny import tiny_gemma3, tiny_tokenizer

    scoring, _ = build_datasets(DataConfig(task="essay", demo=True, lang="en"), seed=0)
    writing, _ = essay_write.build_datasets(DataConfig(task="essay_write", demo=True, lang="en"), seed=0)
    shortest = sorted(scoring, key=lambda c: len(c.cut))[:2]  # the two shortest essays: ~2,100 byte tokens each
    tokenizer = tiny_tokenizer()
    encoded = encode_conversations(tokenizer, shortest + writing[:2], 2200)
    assert len(encoded.examples) == 4 and encoded.n_dropped == 0
    model = add_lora(tiny_gemma3(max_position_embeddings=2200), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    cfg = TrainConfig(max_steps=5, eval_every=0, save_every=0, packing=False, batch_size=1, grad_accum=1)
    collate_fn = collate_for(model, pad_id=tokenizer.pad_token_id, packed=cfg.packing)
    result = fit(model, encoded.examples, [], cfg, run_dir=tmp_path, collate_fn=collate_fn, show_progress=False)
    assert result.steps == 5 and result.final_loss is not None and math.isfinite(result.final_loss)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
