"""Task 2 (topic classification and grading): answer parsing, data, conversations, metrics and a tiny training run."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from gemma_lowmem.config import DataConfig, LoraConfig, TrainConfig
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.errors import UserError
from gemma_lowmem.tasks import get_task, sources, topic
from gemma_lowmem.tasks.topic import (
    LABELS_EN,
    LABELS_KO,
    build_conversation,
    build_conversations,
    build_datasets,
    classify_prompt,
    clean_news_text,
    grade_prompt,
    load_data,
    right_or_wrong,
    score_outputs,
)
from gemma_lowmem.tasks.topic_answers import parse_grade, parse_topic

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
AG_NEWS = SHARED / "ag_news" / "ag_news_test_even.jsonl"
HANGUL = re.compile(r"[가-힣]")

ROWS = [  # tiny fixtures, two per topic
    {"id": "w1", "label": 0, "text": "The prime minister met rebels for ceasefire talks as troops left the border."},
    {"id": "w2", "label": 0, "text": "Voters chose a new parliament after the president called an early election."},
    {"id": "s1", "label": 1, "text": "The home team won the cup final after the coach changed the lineup at halftime."},
    {"id": "s2", "label": 1, "text": "A rookie pitcher threw seven shutout innings as the club clinched the league."},
    {"id": "b1", "label": 2, "text": "Shares of the retailer fell after the company cut its profit forecast."},
    {"id": "b2", "label": 2, "text": "Investors cheered the merger, which creates the largest bank in the region."},
    {"id": "t1", "label": 3, "text": "Researchers released open software that finds spam on mobile networks faster."},
    {"id": "t2", "label": 3, "text": "A satellite launched by the space agency will map the planet's ice sheets."},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ parse_topic


@pytest.mark.parametrize("text, label", [
    ("세계", 0), ("스포츠", 1), ("경제", 2), ("과학/기술", 3),
    ("World", 0), ("Sports", 1), ("Business", 2), ("Sci/Tech", 3),
    ("sports", 1), ("Sport", 1), ("SPORTS", 1), ("business", 2), ("world news", 0),
    ("Sci-Tech", 3), ("Science", 3), ("Technology", 3), ("tech", 3), ("Science and Technology", 3),
    ("과학", 3), ("기술", 3), ("과학 기술", 3), ("IT", 3), ("국제", 0), ("정치", 0), ("비즈니스", 2), ("금융", 2),
    ("체육", 1), ("International", 0), ("Economy", 2), ("Finance", 2), ("markets", 2),
    ("**경제**", 2), ("# Sports", 1), ("`Business`", 2), ("> 세계", 0),
    ("주제: 스포츠", 1), ("Topic: Sci/Tech", 3), ("The topic is Business.", 2), ("이 기사의 주제는 경제입니다.", 2),
    ("경제 기사입니다. 스포츠와는 관련이 없습니다.", 2), ("Business, not Sports", 2),
    ("스포츠가 아니라 경제 기사입니다", 2), ("This is not sports news but business.", 2),
    ("It isn't World; it is Sci/Tech.", 3), ("World Cup qualifier: Sports", 1), ("World Bank loan", 2),
    ("2", 2), ("label: 3", 3), (" 0 ", 0), ("1.", 1),
    ("세계적인 기업의 실적 발표이므로 경제", 0),  # first mention wins, even inside a longer word
])
def test_parse_topic_finds_the_first_named_topic(text, label):
    assert parse_topic(text) == label


@pytest.mark.parametrize("text", [
    "", "   ", "I don't know.", "모르겠습니다", "transport", "sportsmanship aside", "it is hard to say", "7",
    "label: 9", None, 3, ["Sports"], "Politically neutral", "Worldwide",
])
def test_parse_topic_gives_none_without_a_topic(text):
    assert parse_topic(text) is None


# ------------------------------------------------------------------------------------------------ parse_grade


@pytest.mark.parametrize("text, verdict, label", [
    ("판정: 정답\n정답 주제: 경제\n설명: 맞습니다.", True, 2),
    ("판정: 오답\n정답 주제: 스포츠\n설명: 학생은 경제를 골랐지만 스포츠 기사입니다.", False, 1),
    ("Verdict: correct\nCorrect topic: Business\nExplanation: ...", True, 2),
    ("Verdict: incorrect\nCorrect topic: World\nExplanation: The student chose Sports.", False, 0),
    ("**판정:** 정답\n**정답 주제:** 과학/기술", True, 3),
    ("- Verdict: Wrong\n- Correct topic: Sci/Tech", False, 3),
    ("오답입니다. 정답은 스포츠입니다.", False, 1),
    ("오답. 학생은 스포츠를 골랐지만 정답은 경제입니다.", False, 2),
    ("Incorrect: the student picked Sports, but the correct topic is Business.", False, 2),
    ("The student's answer is not correct. It should be World.", False, 0),
    ("Wrong, it should be World.", False, 0),
    ("학생의 답은 맞습니다. 주제: 경제", True, 2),
    ("학생의 답이 틀렸습니다. 올바른 주제: 세계", False, 0),
    ("맞지 않습니다. 실제 주제는 과학/기술입니다.", False, 3),
    ("Correct! The article is about Sports.", True, 1),
    ("Yes, the student is right: Business.", True, 2),
    ("No. Correct answer: World", False, 0),
    ("판정: 정답이 아닙니다\n정답 주제: 경제", False, 2),
    ("결과: 맞음\n주제: 스포츠", True, 1),
    ("정답 주제: 경제\n판정: 오답", False, 2),  # the labelled verdict line wins over "정답" in the topic line
])
def test_parse_grade_reads_verdict_and_topic(text, verdict, label):
    answer = parse_grade(text)
    assert (answer.verdict, answer.topic) == (verdict, label)


@pytest.mark.parametrize("text", ["", "음...", None, 12])
def test_parse_grade_without_answer(text):
    answer = parse_grade(text)
    assert answer.verdict is None and answer.topic is None


# ------------------------------------------------------------------------------------------------ cleaning


@pytest.mark.parametrize("raw, clean", [
    ("Dubai #39;s ruling family", "Dubai's ruling family"),
    ("said  quot;no comment quot; today", 'said "no comment" today'),
    ("Texas Instruments Inc. &lt;TXN.N&gt;, on Thursday", "Texas Instruments Inc. , on Thursday"),
    ("was\\responsible for", "was responsible for"),
    ("prices  #151; and more", "prices \u2014 and more"),
    ("the company's  #36;2.6 billion", "the company's $2.6 billion"),
    ("Johnson  amp; Johnson and AT amp;T", "Johnson & Johnson and AT&T"),
    ("quot;Quoted quot; start", '"Quoted" start'),
    ("Fish &amp; chips", "Fish & chips"),
    ("  many   spaces ", "many spaces"),
])
def test_clean_news_text(raw, clean):
    assert clean_news_text(raw) == clean


# ------------------------------------------------------------------------------------------------ conversations


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_classify_conversation_layout(lang):
    conv = build_conversation(ROWS[4], "classify", lang, seed=0)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    names = LABELS_KO if lang == "ko" else LABELS_EN
    assert conv.messages[-1]["content"] == names[2]
    assert all(name in conv.messages[0]["content"] for name in names)
    assert conv.cut == ROWS[4]["text"] and conv.cut in conv.messages[1]["content"]
    assert bool(HANGUL.search(conv.messages[1]["content"])) == (lang == "ko")
    assert conv.meta == {"mode": "classify", "label": 2, "id": "b1", "lang": lang}
    assert classify_prompt(ROWS[4]["text"], lang) == conv.messages[:2]


@pytest.mark.parametrize("lang", ["ko", "en"])
def test_grade_targets_parse_back_and_half_the_students_are_right(lang):
    convs = build_conversations(ROWS * 2, "grade", lang, seed=5)
    assert sum(c.meta["student_right"] for c in convs) == len(convs) // 2
    for conv in convs:
        meta = conv.meta
        assert (meta["chosen"] == meta["label"]) == meta["student_right"]
        answer = parse_grade(conv.messages[-1]["content"])
        assert (answer.verdict, answer.topic) == (meta["student_right"], meta["label"])
        names = LABELS_KO if lang == "ko" else LABELS_EN
        assert f"{'학생의 답' if lang == 'ko' else 'Student' + chr(39) + 's answer'}: {names[meta['chosen']]}" in \
            conv.messages[1]["content"]
        assert conv.messages[-1]["content"].count("\n") == 2
        json.dumps(meta)


def test_grade_explanation_cites_the_articles_topic_words():
    conv = build_conversation(ROWS[4], "grade", "en", seed=0, student_right=False)
    explanation = conv.messages[-1]["content"].splitlines()[2]
    assert "'Shares', 'retailer'" in explanation and "Business" in explanation
    assert LABELS_EN[conv.meta["chosen"]] in explanation
    ko = build_conversation(ROWS[4], "grade", "ko", seed=0, student_right=True).messages[-1]["content"]
    assert ko.startswith("판정: 정답\n정답 주제: 경제\n설명: 학생의 선택이 맞습니다.")


def test_grade_is_deterministic_and_depends_on_the_seed():
    first = build_conversations(ROWS, "grade", "ko", seed=3)
    assert [c.messages for c in first] == [c.messages for c in build_conversations(ROWS, "grade", "ko", seed=3)]
    others = [build_conversations(ROWS, "grade", "ko", seed=s) for s in range(4, 9)]
    assert any([c.meta["chosen"] for c in o] != [c.meta["chosen"] for c in first] for o in others)
    assert right_or_wrong(7, 1)[:6].count(True) == 3 and len(right_or_wrong(7, 1)) == 7


def test_grade_prompt_matches_training_layout():
    conv = build_conversation(ROWS[0], "grade", "en", seed=0, student_right=True)
    chosen_line, reason_line = conv.messages[1]["content"].split("\n\n")[1].splitlines()
    prompt = grade_prompt(ROWS[0]["text"], chosen_line.split(": ", 1)[1], reason_line.split(": ", 1)[1], "en")
    assert prompt == conv.messages[:2]


# ------------------------------------------------------------------------------------------------ loading


def test_local_files_with_names_title_description_and_one_based_labels(tmp_path):
    named = _write_jsonl(tmp_path / "named.jsonl", [{"label": "Sports", "title": "Cup final", "description": "Won."},
                                                     {"label": "과학/기술", "text": "New chip."},
                                                     {"label_name": "Business", "text": "Profit."}])
    data = load_data(DataConfig(task="topic", train_file=str(named), val_file=str(named)))
    assert [r["label"] for r in data.val] == [1, 3, 2]
    assert data.val[0]["text"] == "Cup final\nWon." and data.val[0]["id"].startswith("topic-")
    csv_path = tmp_path / "ag.csv"
    csv_path.write_text("label,title,description\n1,A,x\n2,B,y\n3,C,z\n4,D,w\n", encoding="utf-8")
    rows = load_data(DataConfig(task="topic", train_file=str(csv_path), val_file=str(csv_path))).val
    assert [r["label"] for r in rows] == [0, 1, 2, 3]  # the original AG News CSV counts 1-4


def test_bad_rows_name_file_record_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"text": "No label."}, ROWS[1]])
    with pytest.raises(UserError, match=r"bad\.jsonl: record 2: missing field 'label'"):
        load_data(DataConfig(task="topic", train_file=str(path)))
    path = _write_jsonl(tmp_path / "bad2.jsonl", [ROWS[0], {"label": 7, "text": "x"}])
    with pytest.raises(UserError, match=r"record 2: field 'label' is 7"):
        load_data(DataConfig(task="topic", train_file=str(path)))
    path = _write_jsonl(tmp_path / "bad3.jsonl", [ROWS[0], {"label": 1, "title": " "}])
    with pytest.raises(UserError, match=r"record 2: missing text: give 'text', or 'title' and 'description'"):
        load_data(DataConfig(task="topic", train_file=str(path)))
    rows = ROWS * 3 + [{"text": "x"}, {"label": "Weather", "text": "Rain."}]
    data = load_data(DataConfig(task="topic", train_file=str(_write_jsonl(tmp_path / "mixed.jsonl", rows)),
                                skip_bad_rows=True))
    assert data.bad_rows.count == 2 and len(data.train) + len(data.val) == 24
    assert Counter(r["label"] for r in data.val) == {0: 1, 1: 1, 2: 1, 3: 1}  # held out per label


def test_sample_limits_balance_the_labels(tmp_path):
    rows = [r | {"id": f"{r['id']}-{i}"} for i in range(5) for r in ROWS if r["label"] == 0] + ROWS
    path = _write_jsonl(tmp_path / "skewed.jsonl", rows)
    data = load_data(DataConfig(task="topic", train_file=str(path), val_file=str(path), max_train_samples=4,
                                max_val_samples=8))
    assert Counter(r["label"] for r in data.train) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert Counter(r["label"] for r in data.val) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_hub_loads_train_and_test_whole_then_balances(monkeypatch):
    calls = []

    def fake_hub(name, config, split, columns=None):
        calls.append((name, config, split))
        return [{"text": r["text"], "label": r["label"]} for r in ROWS] * 3

    monkeypatch.setattr(sources, "load_hub_records", fake_hub)
    data = load_data(DataConfig(task="topic", max_train_samples=8, max_val_samples=4))
    assert calls == [("fancyzhx/ag_news", None, "train"), ("fancyzhx/ag_news", None, "test")]
    assert Counter(r["label"] for r in data.train) == {0: 2, 1: 2, 2: 2, 3: 2} and len(data.val) == 4


def test_demo_set_builds_both_modes():
    assert topic.DEMO_FILE.exists()
    train, val = build_datasets(DataConfig(task="topic", demo=True), seed=0)
    assert (len(train), len(val)) == (16, 8)
    assert Counter(c.meta["label"] for c in val) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert {c.meta["lang"] for c in train} == {"ko"}
    train, val = get_task("topic_grade").build_datasets(DataConfig(demo=True, lang="en"), 0)
    assert {c.meta["mode"] for c in train + val} == {"grade"}
    rows = [json.loads(line) for line in topic.DEMO_FILE.read_text(encoding="utf-8").splitlines()]
    assert Counter(r["lang"] for r in rows) == {"en": 16, "ko": 8}
    assert all(LABELS_EN[r["label"]] == r["label_name"] for r in rows)


def test_summary_statistics():
    stats = topic.summary_statistics(build_conversations(ROWS, "grade", "en", seed=0))
    assert stats == {"conversations": 8, "labels": {"World": 2, "Sports": 2, "Business": 2, "Sci/Tech": 2},
                     "students_right": 4}
    assert "students_right" not in topic.summary_statistics(build_conversations(ROWS[:3], "classify", "ko", 0))


# ------------------------------------------------------------------------------------------------ metrics


def test_classify_metrics_perfect_garbage_and_hand_computed():
    convs = build_conversations(ROWS, "classify", "ko", seed=0)
    perfect = score_outputs(convs, [c.messages[-1]["content"] for c in convs])
    assert perfect["metrics"]["accuracy"] == 1.0 and perfect["metrics"]["macro_f1"] == 1.0
    assert perfect["plots"]["confusion"]["matrix"] == [[2, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 2, 0, 0],
                                                       [0, 0, 0, 2, 0]]
    garbage = score_outputs(convs, ["???"] * 8)
    assert garbage["metrics"]["accuracy"] == 0.0 and garbage["metrics"]["valid_rate"] == 0.0
    assert garbage["metrics"]["n_invalid"] == 8 and garbage["metrics"]["macro_f1"] == 0.0
    assert [row[4] for row in garbage["plots"]["confusion"]["matrix"]] == [2, 2, 2, 2]
    # truth 0 0 1 1 2 2 3 3; predictions World, Sports, Sports, Sports, Business, ?, Sci/Tech, Business
    outputs = ["세계", "Sports", "스포츠", "sport", "경제", "모름", "과학", "Business"]
    result = score_outputs(convs, outputs)
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(5 / 8) and m["n_invalid"] == 1 and m["valid_rate"] == pytest.approx(7 / 8)
    # F1 per class: World p=1 r=.5 -> 2/3; Sports p=2/3 r=1 -> .8; Business p=.5 r=.5 -> .5; Sci/Tech p=1 r=.5 -> 2/3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.5 + 2 / 3) / 4)
    assert m["per_class"]["Sports"]["precision"] == pytest.approx(2 / 3)
    confusion = result["plots"]["confusion"]
    assert confusion["labels"] == list(LABELS_EN) and confusion["columns"] == [*LABELS_EN, "invalid"]
    assert confusion["matrix"] == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 1, 0, 1], [0, 0, 1, 1, 0]]
    assert [r["correct"] for r in result["rows"]] == [True, False, True, True, True, False, True, False]
    assert result["rows"][5]["pred"] is None and result["rows"][1]["pred"] == "Sports"
    json.dumps(result)


def test_grade_metrics_perfect_garbage_and_hand_computed():
    convs = build_conversations(ROWS, "grade", "en", seed=2)
    perfect = score_outputs(convs, [c.messages[-1]["content"] for c in convs])["metrics"]
    assert perfect["verdict_accuracy"] == perfect["topic_accuracy"] == perfect["valid_rate"] == 1.0
    assert perfect["verdict_accuracy_right"] == perfect["verdict_accuracy_wrong"] == 1.0
    garbage = score_outputs(convs, ["blah"] * 8)
    assert garbage["metrics"]["verdict_accuracy"] == garbage["metrics"]["topic_accuracy"] == 0.0
    assert garbage["metrics"]["valid_rate"] == 0.0
    assert garbage["plots"]["verdict_confusion"]["matrix"] == [[0, 0, 4], [0, 0, 4]]
    # Always "correct" with the student's own topic: right on every right student, wrong on every wrong one.
    lazy = [f"Verdict: correct\nCorrect topic: {LABELS_EN[c.meta['chosen']]}" for c in convs]
    result = score_outputs(convs, lazy)
    m = result["metrics"]
    assert m["verdict_accuracy"] == 0.5 and m["topic_accuracy"] == 0.5
    assert m["verdict_accuracy_right"] == 1.0 and m["verdict_accuracy_wrong"] == 0.0
    assert result["plots"]["verdict_confusion"]["matrix"] == [[4, 0, 0], [4, 0, 0]]
    assert sum(map(sum, result["plots"]["topic_confusion"]["matrix"])) == 8
    json.dumps(result)


def test_plot_specs_draw(tmp_path):
    from gemma_lowmem.evaluation.report import plot

    for mode in ("classify", "grade"):
        convs = build_conversations(ROWS, mode, "en", seed=0)
        for name, spec in score_outputs(convs, ["Sports"] * 8)["plots"].items():
            assert plot(spec, tmp_path / f"{mode}-{name}.png").stat().st_size > 0


def test_score_outputs_rejects_mismatches():
    convs = build_conversations(ROWS, "classify", "en", seed=0)
    with pytest.raises(ValueError, match="must pair up"):
        score_outputs(convs, ["World"])
    mixed = convs[:1] + build_conversations(ROWS[:2], "grade", "en", seed=0)
    with pytest.raises(ValueError, match="mix modes"):
        score_outputs(mixed, ["x"] * 3)


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not AG_NEWS.exists(), reason="shared data not present")
def test_real_ag_news_rows():
    data = load_data(DataConfig(task="topic", data=str(AG_NEWS), max_train_samples=200, max_val_samples=40))
    assert Counter(r["label"] for r in data.train) == {0: 50, 1: 50, 2: 50, 3: 50}
    assert not any(re.search(r"#39;|quot;|&lt;|\\", r["text"]) for r in data.train + data.val)
    for mode in ("classify", "grade"):
        convs = build_conversations(data.val, mode, "ko", seed=0)
        result = score_outputs(convs, [c.messages[-1]["content"] for c in convs])
        key = "accuracy" if mode == "classify" else "verdict_accuracy"
        assert result["metrics"][key] == 1.0
    # Topic words: most real articles give the grader a word of their own topic to cite.
    cited = sum(bool(topic.topic_words(r["text"], r["label"])) for r in data.train)
    assert cited >= 0.6 * len(data.train), cited


# ------------------------------------------------------------------------------------------------ tiny training


def test_tiny_model_trains_on_topic_conversations(tmp_path):
    from gemma_lowmem.data.collate import collate_for
    from gemma_lowmem.data.tokenize import encode_conversations
    from gemma_lowmem.model import add_lora
    from gemma_lowmem.train import fit
    from tests.tiny import tiny_gemma3, tiny_tokenizer

    train, _ = build_datasets(DataConfig(task="topic", demo=True, lang="en"), seed=0)
    tokenizer = tiny_tokenizer()
    encoded = encode_conversations(tokenizer, train[:5], 512)
    assert len(encoded.examples) == 5 and encoded.n_dropped == 0
    model = add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    cfg = TrainConfig(max_steps=5, eval_every=0, save_every=0, packing=False, batch_size=1, grad_accum=1)
    collate_fn = collate_for(model, pad_id=tokenizer.pad_token_id, packed=cfg.packing)
    result = fit(model, encoded.examples, [], cfg, run_dir=tmp_path, collate_fn=collate_fn, show_progress=False)
    assert result.steps == 5 and result.final_loss is not None and math.isfinite(result.final_loss)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_conversation_type_is_respected():
    conv = build_conversation(ROWS[1], "classify", "en", seed=0)
    assert isinstance(conv, Conversation) and conv.messages[-1]["role"] == "assistant"
    with pytest.raises(ValueError, match="mode must be"):
        build_conversation(ROWS[1], "summarise", "en", seed=0)
