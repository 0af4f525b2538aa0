"""Task 1 (summary evaluation): loading, student summaries, target scores, feedback and prompts."""

from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path

import pytest

from gemma_lowmem.config import DataConfig
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.rubric import RubricSpec
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.tasks import sources, summary_eval
from gemma_lowmem.tasks.student_summaries import KINDS, clean_reference, make_student_summary
from gemma_lowmem.tasks.summary_eval import (
    assign_kinds,
    build_conversation,
    build_conversations,
    build_datasets,
    evaluation_prompt,
    load_data,
    summary_statistics,
)
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from gemma_lowmem.text import cut_at_sentence_end, split_sentences

CRITERIA = SUMMARY_RUBRIC.criteria

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CNN_VAL = SHARED / "cnn_dailymail" / "validation_first1000.jsonl"
HANGUL = re.compile(r"[가-힣]")

# ------------------------------------------------------------------------------------------------ synthetic articles

_TOWNS = ["Brackford", "Lindhaven", "Corrow", "Easterby", "Fenwick", "Oakmere", "Tarrow", "Welby"]
_PEOPLE = [("Helen", "Marsh"), ("David", "Okafor"), ("Priya", "Raman"), ("Tomas", "Weller"), ("Grace", "Lindqvist"),
           ("Samuel", "Pike"), ("Nora", "Castell"), ("Ivan", "Dorsey")]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Monday"]


def _english_record(i: int) -> dict:
    """Four topics (a collapse, a match, a study, a factory), two fills each; neighbours differ in topic."""
    town, (first, last), day = _TOWNS[i], _PEOPLE[i], _DAYS[i]
    a, b, c, year = 11 + 3 * i, 40 + 5 * i, 6 + i, 1960 + 4 * i
    topic = i % 4
    if topic == 0:
        article = (
            f"A bridge collapsed in {town} on {day}, injuring {a} people, officials said. "
            f"Mayor {first} {last} said {b} firefighters searched the rubble for {c} hours. "
            f"The bridge was built in {year} and had passed an inspection last spring. "
            "Engineers blamed heavy rain that soaked the ground beneath its foundations. "
            "Local bakeries handed out free bread and coffee to the rescue workers through the night. "
            "The town's annual flower show will go ahead next month as planned. "
            "Residents were asked to avoid the area while cranes remove the debris.")
        highlights = (f"A bridge in {town} collapsed on {day}, injuring {a} people .\n"
                      f"Mayor {first} {last} said {b} firefighters searched for {c} hours .\n"
                      "Engineers blamed heavy rain that soaked the foundations .")
    elif topic == 1:
        article = (
            f"{town} Rovers won the regional cup final {c}-2 on {day} in front of {a},000 fans. "
            f"Striker {first} {last} scored a hat-trick, including a penalty in the {b}th minute. "
            f"It is the club's first trophy since {year}, when it last reached a final. "
            "The coach praised the young squad for staying calm after conceding an early goal. "
            "Ticket prices at the stadium kiosk were frozen for the whole season. "
            "Fans celebrated in the main square until the early morning hours. "
            "A parade through the old town is planned for the weekend.")
        highlights = (f"{town} Rovers won the regional cup final {c}-2 before {a},000 fans .\n"
                      f"Striker {first} {last} scored a hat-trick .\n"
                      f"It is the club's first trophy since {year} .")
    elif topic == 2:
        article = (
            f"Researchers at the {town} Institute found that adults who sleep {c} hours a night remember more words. "
            f"The study followed {b}0 volunteers for {a} weeks, lead author {first} {last} said on {day}. "
            "Volunteers who slept less recalled a third fewer words in a memory test. "
            f"The team now plans a larger trial that will start in {year + 60}. "
            "The institute's cafeteria recently switched to serving only vegetarian lunches. "
            "A new car park for visitors opened beside the laboratory building. "
            "The researchers thanked the volunteers for keeping detailed sleep diaries.")
        highlights = (f"A {town} Institute study links {c} hours of sleep with better memory .\n"
                      f"{first} {last}'s team followed {b}0 volunteers for {a} weeks .\n"
                      f"A larger trial will start in {year + 60} .")
    else:
        article = (
            f"The {town} paper mill will close in {year + 62}, putting {b}0 jobs at risk, its owner said on {day}. "
            f"Plant manager {first} {last} said demand for printed paper had fallen by {a} percent. "
            f"The company will offer retraining courses lasting {c} months to every worker. "
            "Union leaders called the decision a heavy blow for the valley's economy. "
            "The mill's red brick chimney is a well-known landmark for hikers. "
            "A local choir used to rehearse in the mill's old canteen on Thursday evenings. "
            "The site may later be turned into housing, the council said.")
        highlights = (f"The {town} paper mill will close in {year + 62}, putting {b}0 jobs at risk .\n"
                      f"Demand for printed paper fell by {a} percent, manager {first} {last} said .\n"
                      f"Workers will be offered {c}-month retraining courses .")
    return {"id": f"syn-{i}", "article": article, "highlights": highlights}


ENGLISH = [_english_record(i) for i in range(8)]

KOREAN = [
    {
        "id": "ko-1",
        "article": (
            "한빛시에서 12일 오후 노후 육교가 무너져 시민 14명이 다쳤다. 소방당국은 구조대원 60명을 투입해 5시간 동안 "
            "수색 작업을 벌였다고 밝혔다. 이 육교는 1987년에 지어졌으며 지난해 안전 점검을 통과했다. 전문가들은 "
            "최근 내린 폭우로 지반이 약해진 것이 원인이라고 분석했다. 시는 복구 비용이 약 30억 원에 이를 것으로 "
            "내다봤다. 인근 상인들은 구조대원들에게 빵과 음료를 나눠 주었다. 근처 공원에서 열릴 예정이던 음악회는 "
            "다음 주로 미뤄졌다. 시는 주민들에게 당분간 현장 주변 통행을 자제해 달라고 당부했다."
        ),
        "highlights": (
            "한빛시에서 12일 노후 육교가 무너져 시민 14명이 다쳤다.\n소방당국은 구조대원 60명을 투입해 5시간 동안 "
            "수색했다.\n전문가들은 폭우로 약해진 지반을 원인으로 꼽았고 복구 비용은 약 30억 원으로 예상된다."
        ),
    },
    {
        "id": "ko-2",
        "article": (
            "누리대학교 연구진이 물을 적게 쓰는 벼 품종을 개발했다고 3일 밝혔다. 새 품종은 기존 품종보다 물을 40% "
            "덜 쓰면서도 수확량은 비슷했다. 연구진은 4년 동안 전국 9곳의 논에서 시험 재배를 진행했다. 연구를 이끈 "
            "김하늘 교수는 가뭄이 잦은 지역의 농가에 도움이 될 것이라고 말했다. 농촌진흥청은 2026년부터 농가에 "
            "종자를 보급할 계획이다. 연구진은 밥맛을 평가하는 시식회도 열었다. 시식회에는 주민 200명이 참여했다. "
            "연구 결과는 국제 학술지에 실렸다."
        ),
        "highlights": (
            "누리대학교 연구진이 물을 40% 덜 쓰는 벼 품종을 개발했다.\n연구진은 4년 동안 전국 9곳의 논에서 시험 "
            "재배를 진행했다.\n농촌진흥청은 2026년부터 농가에 종자를 보급할 계획이다."
        ),
    },
]


def _all_kinds(records: list[dict], lang: str, seed: int = 0) -> dict[str, list]:
    """Every kind for every record: kind -> conversations (paired by record)."""
    out: dict[str, list] = {kind: [] for kind in KINDS}
    for i, record in enumerate(records):
        other = records[(i + 1) % len(records)]
        for kind in KINDS:
            out[kind].append(build_conversation(record, other, lang, seed, kind=kind))
    return out


def _mean(convs: list, key: str) -> float:
    return statistics.fmean(c.meta["scores"][key] for c in convs)


def _check_ranking(by_kind: dict[str, list]) -> None:
    cov = {kind: _mean(convs, "coverage") for kind, convs in by_kind.items()}
    assert cov["near_reference"] > cov["partial"] > cov["off_topic"], cov
    acc = {kind: _mean(convs, "accuracy") for kind, convs in by_kind.items()}
    assert acc["factual_error"] < acc["near_reference"] - 5, acc
    total = {kind: _mean(convs, "total") for kind, convs in by_kind.items()}
    assert total["near_reference"] > total["partial"] > total["off_topic"] > total["empty"], total
    assert total["near_reference"] > max(v for k, v in total.items() if k != "near_reference"), total
    grammar = {kind: _mean(convs, "grammar") for kind, convs in by_kind.items()}
    assert grammar["ungrammatical"] < grammar["near_reference"], grammar
    concise = {kind: _mean(convs, "conciseness") for kind, convs in by_kind.items()}
    assert concise["verbose"] < concise["near_reference"], concise


# ---------------------------------------------------------------------------------------------------------- tests


def test_every_kind_appears_and_scores_add_up():
    convs = build_conversations(ENGLISH, "en", seed=3)
    assert {c.meta["kind"] for c in convs} == set(KINDS)
    for conv in convs:
        scores = conv.meta["scores"]
        for key, (maximum, _, _) in CRITERIA.items():
            assert isinstance(scores[key], int) and 0 <= scores[key] <= maximum, (key, scores)
        assert scores["total"] == sum(scores[key] for key in CRITERIA)
        assert set(conv.meta) == {"kind", "scores", "id", "lang", "edits"}
        assert conv.meta["edits"], conv.meta
        json.dumps(conv.meta)  # the prepare-data script writes it as JSON


@pytest.mark.parametrize("n, seed", [(8, 0), (9, 1), (13, 5), (24, 7)])
def test_assign_kinds_covers_every_block(n, seed):
    kinds = assign_kinds(n, seed)
    assert len(kinds) == n and set(kinds[:8]) == set(KINDS)
    for start in range(0, n - 7, 8):
        assert set(kinds[start:start + 8]) == set(KINDS)


def test_shifted_kinds_give_each_row_different_kinds():
    lists = [assign_kinds(13, seed=3, shift=shift) for shift in range(len(KINDS))]
    assert lists[0] == assign_kinds(13, seed=3)
    for row_kinds in zip(*lists):
        assert sorted(row_kinds) == sorted(KINDS)
    for kinds in lists:  # each shifted list still covers every block
        assert set(kinds[:8]) == set(KINDS)


@pytest.mark.parametrize("per_row", [2, 3, 8])
def test_kinds_per_row_grades_one_article_several_ways(per_row):
    single = build_conversations(ENGLISH, "en", seed=4)
    several = build_conversations(ENGLISH, "en", seed=4, kinds_per_row=per_row)
    assert len(several) == per_row * len(ENGLISH)
    assert [c.messages for c in several[:len(ENGLISH)]] == [c.messages for c in single]  # the first pass as before
    for i, record in enumerate(ENGLISH):
        copies = several[i::len(ENGLISH)]
        assert {c.meta["id"] for c in copies} == {record["id"]}
        assert len({c.meta["kind"] for c in copies}) == per_row
    with pytest.raises(UserError, match="kinds_per_row"):
        build_conversations(ENGLISH, "en", seed=4, kinds_per_row=9)
    with pytest.raises(UserError, match="kinds_per_row"):
        DataConfig(kinds_per_row=0)


def test_kinds_per_row_multiplies_training_only():
    train, val = build_datasets(DataConfig(demo=True, lang="en"), seed=0)
    train2, val2 = build_datasets(DataConfig(demo=True, lang="en", kinds_per_row=2), seed=0)
    assert len(train2) == 2 * len(train)
    assert [c.messages for c in val2] == [c.messages for c in val]


def test_same_seed_same_output_other_seed_differs():
    first = build_conversations(ENGLISH, "ko", seed=11)
    second = build_conversations(ENGLISH, "ko", seed=11)
    assert [c.messages for c in first] == [c.messages for c in second]
    assert [c.meta for c in first] == [c.meta for c in second]
    other = build_conversations(ENGLISH, "ko", seed=12)
    assert [c.messages for c in first] != [c.messages for c in other]
    # A row's summary depends on the seed, its kind and its article, not on its position.
    again = build_conversation(ENGLISH[3], ENGLISH[4], "ko", 11, kind=first[3].meta["kind"])
    assert again.messages[2] == first[3].messages[2]


def test_ranking_on_synthetic_articles():
    _check_ranking(_all_kinds(ENGLISH, "en"))


@pytest.mark.skipif(not CNN_VAL.exists(), reason="shared data not present")
def test_ranking_on_real_cnn_rows():
    rows = [json.loads(line) for line in CNN_VAL.read_text(encoding="utf-8").splitlines()[:40]]
    records = [{"id": r["id"], "article": cut_at_sentence_end(r["article"], 2000), "highlights": r["highlights"]}
               for r in rows]
    _check_ranking(_all_kinds(records, "en"))


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_target_parses_back_to_the_same_numbers(lang):
    for conv in build_conversations(ENGLISH + KOREAN, lang, seed=2):
        answer = conv.messages[-1]["content"]
        parsed = parse_rubric(answer, SUMMARY_RUBRIC)
        assert parsed.valid, (parsed.problems, answer)
        assert parsed.total == conv.meta["scores"]["total"]
        assert parsed.scores == {key: conv.meta["scores"][key] for key in CRITERIA}
        assert all(parsed.comments[key] for key in CRITERIA)
        assert parsed.feedback and parsed.suggestions.startswith("- ")


def test_score_loss_weight_marks_the_scores_of_the_answer():
    plain = build_conversations(ENGLISH[:4], "en", seed=2)
    weighted = build_conversations(ENGLISH[:4], "en", seed=2, score_loss_weight=5)
    assert all(c.answer_weights == [] for c in plain)
    for a, b in zip(plain, weighted):
        assert a.messages == b.messages  # the same conversation: only what the loss counts changes
        answer, scores = b.messages[-1]["content"], b.meta["scores"]
        assert [answer[lo:hi] for lo, hi, _ in b.answer_weights] == [str(scores[k]) for k in (*CRITERIA, "total")]
        assert {w for _, _, w in b.answer_weights} == {5}
    train, _ = summary_eval.build_datasets(DataConfig(demo=True, lang="en", score_loss_weight=5), seed=0)
    assert all(len(c.answer_weights) == 1 + len(CRITERIA) for c in train)


def test_korean_articles_give_every_kind_and_korean_feedback():
    by_kind = _all_kinds(KOREAN, "ko")
    for kind, convs in by_kind.items():
        for conv in convs:
            parsed = parse_rubric(conv.messages[-1]["content"], SUMMARY_RUBRIC)
            assert HANGUL.search(parsed.feedback) and HANGUL.search(parsed.suggestions), (kind, parsed.feedback)
            assert conv.messages[-1]["content"].startswith("요약 평가 결과:")
            if kind not in ("empty", "off_topic", "lead"):
                assert HANGUL.search(conv.messages[2]["content"]), kind  # built from the Korean reference
    # Korean factual errors swap numbers, and the feedback names both values.
    for conv in by_kind["factual_error"]:
        swaps = [e for e in conv.meta["edits"] if e["op"] == "swap"]
        assert swaps and all(e["type"] == "number" for e in swaps), conv.meta["edits"]
        feedback = parse_rubric(conv.messages[-1]["content"], SUMMARY_RUBRIC).feedback
        for e in swaps:
            assert e["from"] in feedback and e["to"] in feedback
            assert e["to"] in conv.messages[2]["content"]
    _check_ranking(by_kind)


def test_factual_error_feedback_names_the_swap_in_english():
    record = {"article": "Police said 21 people died in the fire in Dunmore on Sunday. Another 12 were hurt. "
                         "Fire crews from Ashby helped.",
              "highlights": "A fire in Dunmore killed 21 people, police said.\nAnother 12 were hurt."}
    summary = make_student_summary("factual_error", record["article"], clean_reference(record["highlights"]), None,
                                   random.Random(0), "en")
    swap = summary.edits[0]
    assert swap["op"] == "swap" and swap["from"] in record["article"] and swap["to"] in summary.text
    conv = build_conversation(record, None, "en", random.Random(0), kind="factual_error")
    feedback = parse_rubric(conv.messages[-1]["content"], SUMMARY_RUBRIC).feedback
    assert f"The summary says '{swap['context_to']}', but the article says '{swap['context_from']}'" in feedback
    assert conv.meta["scores"]["accuracy"] < 30


def test_noise_is_counted_and_charged_to_grammar():
    rng = random.Random(4)
    reference = clean_reference(ENGLISH[0]["highlights"])
    summary = make_student_summary("ungrammatical", ENGLISH[0]["article"], reference, None, rng, "en")
    edit = summary.edits[0]
    assert summary.noise == edit["word_swaps"] + edit["dropped_words"] + edit["typos"] >= 2
    assert summary.text != summary.clean_text == " ".join(split_sentences(reference))
    scores, _ = summary_eval.score_summary(summary, ENGLISH[0]["article"], reference)
    assert scores["grammar"] < 10 and scores["accuracy"] == 30


def test_conversation_layout_and_evaluation_prompt():
    conv = build_conversation(ENGLISH[0], ENGLISH[1], "ko", 0, kind="lead")
    roles = [m["role"] for m in conv.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert "40점" in conv.messages[0]["content"] and "100점" in conv.messages[0]["content"]
    assert conv.cut == ENGLISH[0]["article"] and conv.cut in conv.messages[1]["content"]
    assert "3-4문장" in conv.messages[1]["content"]
    assert "참고 요약" in conv.messages[3]["content"]
    assert clean_reference(ENGLISH[0]["highlights"]) in conv.messages[3]["content"]
    prompt = evaluation_prompt(ENGLISH[0]["article"], "My summary.", ENGLISH[0]["highlights"], "en")
    assert [m["role"] for m in prompt] == roles[:4]
    assert prompt[2]["content"] == "My summary." and "Content coverage (40 points)" in prompt[0]["content"]
    assert " .\n" not in prompt[3]["content"]  # CNN highlights are cleaned


def test_summary_statistics():
    convs = build_conversations(ENGLISH + KOREAN, "en", seed=0)
    stats = summary_statistics(convs)
    assert stats["conversations"] == 10 and sum(stats["kinds"].values()) == 10
    totals = [c.meta["scores"]["total"] for c in convs]
    assert stats["scores"]["total"]["max"] == max(totals)
    assert stats["scores"]["total"]["mean"] == pytest.approx(statistics.fmean(totals))
    assert set(stats["scores"]) == {*CRITERIA, "total"}


def test_the_default_rubric_prompt_names_four_criteria_and_100_points():
    assert "다음 네 가지 기준으로 평가하세요." in summary_eval.system_prompt("ko")
    assert "총점은 100점입니다." in summary_eval.system_prompt("ko")
    assert "score it on four criteria." in summary_eval.system_prompt("en")
    assert "The total is 100 points." in summary_eval.system_prompt("en")


# ------------------------------------------------------------------------------- a teacher's rubric is data

TEACHER = RubricSpec(  # three of the four criteria, in another order, other maxima and labels: 60 points
    criteria={"accuracy": (30, "사실 정확성", "Factual accuracy"), "coverage": (20, "핵심 내용", "Key points"),
              "grammar": (10, "맞춤법", "Spelling")},
    titles={"ko": "요약 채점:", "en": "Summary grade:"}, max_total=60,
)


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_a_teachers_rubric_builds_data_with_its_criteria_maxima_and_prompt(lang):
    task = summary_eval.summary_task(TEACHER, "teacher_summary")
    assert task.rubric is TEACHER
    train, val = task.build_datasets(DataConfig(demo=True, lang=lang, score_loss_weight=3), 0)
    default = build_conversations(ENGLISH, lang, seed=0)
    teacher = build_conversations(ENGLISH, lang, seed=0, spec=TEACHER)
    for conv in [*train, *val, *teacher]:
        scores, answer = conv.meta["scores"], conv.messages[-1]["content"]
        assert list(scores) == ["accuracy", "coverage", "grammar", "total"]
        assert all(0 <= scores[k] <= m for k, (m, _, _) in TEACHER.criteria.items())
        assert scores["total"] == scores["accuracy"] + scores["coverage"] + scores["grammar"] <= 60
        parsed = parse_rubric(answer, TEACHER)
        assert parsed.valid and parsed.scores == {k: scores[k] for k in TEACHER.criteria}, parsed.problems
        assert all(parsed.comments.values()) and answer.startswith(TEACHER.titles[lang])
        assert not parse_rubric(answer, SUMMARY_RUBRIC).valid
        system = conv.messages[0]["content"]
        if lang == "ko":
            assert "다음 세 가지 기준으로" in system and "총점은 60점입니다." in system
            assert "- 사실 정확성 (30점): " in system and "간결성" not in system
        else:
            assert "score it on three criteria." in system and "The total is 60 points." in system
            assert "- Factual accuracy (30 points): " in system and "Conciseness" not in system
    assert all(len(c.answer_weights) == 1 + 3 for c in train)  # each criterion's score and the total
    for d, c in zip(default, teacher):  # the same measurements, on the teacher's maxima
        assert d.messages[1:3] == c.messages[1:3] and d.meta["kind"] == c.meta["kind"]
        for key, (maximum, _, _) in TEACHER.criteria.items():
            assert abs(c.meta["scores"][key] / maximum - d.meta["scores"][key] / CRITERIA[key][0]) <= 0.5 / maximum \
                + 0.5 / CRITERIA[key][0]
    stats = task.summary_statistics(train)
    assert set(stats["scores"]) == {"accuracy", "coverage", "grammar", "total"}
    result = task.score_outputs(val, [c.messages[-1]["content"] for c in val])
    assert result["metrics"]["valid_rate"] == 1.0 and set(result["metrics"]["agreement"]) == set(TEACHER.score_fields)
    assert all(a["mae"] == 0.0 for a in result["metrics"]["agreement"].values())
    assert result["plots"]["scatter_total"]["limits"] == [0, 60]


def test_a_teachers_rubric_is_answered_guided_on_a_tiny_model(monkeypatch):
    from gemma_lowmem.evaluation.answers import answer_and_score
    from gemma_lowmem.evaluation.guided import Decoding
    from tests.tiny import tiny_gemma3, tiny_tokenizer

    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", {"comment": 3, "feedback": 4, "suggestions": 4})
    task = summary_eval.summary_task(TEACHER, "teacher_summary")
    conversations = build_conversations(ENGLISH[:3], "en", seed=0, spec=TEACHER)
    result = answer_and_score(tiny_gemma3(), tiny_tokenizer(), conversations, task.score_outputs,
                              Decoding(max_new_tokens=6, batch_size=2, show_progress=False), rubric=task.rubric)
    assert result["metrics"]["valid_rate"] == 1.0
    assert set(result["metrics"]["expected_agreement"]) == set(TEACHER.score_fields)
    for output in result["outputs"]:
        parsed = parse_rubric(output, TEACHER)
        assert parsed.valid and output.startswith("Summary grade:") and "/30\n- Key points: " in output
        assert parsed.total == sum(parsed.scores.values()) <= 60


def test_a_rubric_with_a_criterion_the_task_cannot_measure_is_refused():
    style = RubricSpec(criteria={"coverage": (70, "핵심", "Key points"), "style": (30, "문체", "Style")},
                       titles={"en": "Grade:"})
    with pytest.raises(UserError, match=r"rubric criteria \['style'\]: summary_eval measures only coverage, "
                                        "accuracy, conciseness, grammar"):
        summary_eval.summary_task(style, "styled")
    with pytest.raises(UserError, match="style"):
        build_conversations(ENGLISH[:2], "en", seed=0, spec=style)


def test_reference_cleaning():
    # Sentence splitting and cutting themselves: tests/test_text.py.
    assert clean_reference("First point .\nSecond \"quoted\"\n") == "First point.\nSecond \"quoted\"."


# -------------------------------------------------------------------------------------------------------- loading


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_missing_highlights_names_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [ENGLISH[0], {"id": "x", "article": "Text."}, ENGLISH[1]])
    with pytest.raises(UserError, match=r"train\.jsonl: line 2: missing field 'highlights'"):
        load_data(DataConfig(train_file=str(path)))
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('id,article\n1,"Some text."\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"train\.csv: row 2: missing field 'highlights'"):
        load_data(DataConfig(data=str(csv_path)))


def test_skip_bad_rows_skips_and_counts(tmp_path):
    rows = [_english_record(i % 8) | {"id": f"r{i}"} for i in range(20)]
    rows[4] = {"id": "bad1", "article": "Text."}
    rows[9] = {"id": "bad2", "article": "Text.", "highlights": "  "}
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_data(DataConfig(train_file=str(path), skip_bad_rows=True))
    assert data.bad_rows.count == 2 and "line 5" in data.bad_rows.reasons[0]
    assert len(data.train) + len(data.val) == 18 and len(data.val) == 2  # 10% held out
    assert not {r["id"] for r in data.train} & {r["id"] for r in data.val}
    assert load_data(DataConfig(train_file=str(path), skip_bad_rows=True)).val == data.val  # fixed hold-out


def test_local_files_limits_and_cleaning(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [_english_record(i) | {"id": f"t{i}"} for i in range(8)])
    val = _write_jsonl(tmp_path / "val.jsonl", [_english_record(i) | {"id": f"v{i}"} for i in range(8)])
    cfg = DataConfig(train_file=str(train), val_file=str(val), max_train_samples=5, max_val_samples=3,
                     max_article_length=300)
    data = load_data(cfg)
    train_rows, val_rows = data.train, data.val
    assert [r["id"] for r in train_rows] == [f"t{i}" for i in range(5)]
    assert [r["id"] for r in val_rows] == ["v0", "v1", "v2"]
    for row in train_rows:
        assert len(row["article"]) <= 300 and row["article"].endswith(".")
        assert " .\n" not in row["highlights"] and row["lang"] == "en"


def test_demo_split(tmp_path, monkeypatch):
    rows = [_english_record(i % 8) | {"id": f"d{i}", "lang": "en"} for i in range(40)]
    rows += [KOREAN[i % 2] | {"id": f"k{i}", "lang": "ko"} for i in range(10)]
    monkeypatch.setattr(summary_eval, "DEMO_FILE", _write_jsonl(tmp_path / "summary_demo.jsonl", rows))
    data = load_data(DataConfig(demo=True, train_file="ignored.jsonl"))
    assert (len(data.train), len(data.val)) == (40, 10)
    assert {r["id"] for r in data.train} | {r["id"] for r in data.val} == {r["id"] for r in rows}
    train, val = build_datasets(DataConfig(demo=True), seed=0)
    assert len(train) == 40 and len(val) == 10
    assert {c.meta["kind"] for c in train} == set(KINDS) == {c.meta["kind"] for c in val[:8]}


@pytest.mark.skipif(not summary_eval.DEMO_FILE.exists(), reason="bundled demo set not written yet")
def test_bundled_demo_set_builds():
    train, val = build_datasets(DataConfig(demo=True, lang="en"), seed=1)
    assert len(train) == 40 and len(val) == 10
    assert all(parse_rubric(c.messages[-1]["content"], SUMMARY_RUBRIC).valid for c in train + val)


def test_hub_splits_are_sliced(monkeypatch):
    calls = []

    def fake_hub(name, config, split, columns=None):
        calls.append((name, config, split))
        return [ENGLISH[i] | {"id": f"{split}-{i}"} for i in range(4)]

    monkeypatch.setattr(sources, "load_hub_records", fake_hub)
    data = load_data(DataConfig(max_train_samples=3, max_val_samples=2))
    train, val = data.train, data.val
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "train[:3]"), ("abisee/cnn_dailymail", "3.0.0",
                                                                       "validation[:2]")]
    assert len(train) == 3 and len(val) == 2
