"""ROUGE: identical to rouge-score on English, meaningful on Korean."""

import json
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer, tokenizers

from gemma_lowmem.evaluation import RougeScore, rouge_pair, rouge_scores
from gemma_lowmem.evaluation.rouge import ROUGE_TYPES, UnicodeTokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
KOREAN = SHARED / "korean" / "sci_news_sum_kr50.jsonl"
CNN = SHARED / "cnn_dailymail" / "validation_first1000.jsonl"

REFERENCE = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

FIXED_EN = [
    ("The cat sat on the mat.", "The cat was sitting on the mat."),
    ("Police said 3 men were arrested .\nThey face charges .", "Three men were arrested, police said.\nCharges."),
    ("", "Nothing was predicted."),
    ("Nothing to compare.", ""),
    ("", ""),
    ("Running runners ran; the runner's run-ups!", "run RUN running"),
    ("Café owners in München say “prices rose” — 20% in 2015.", "Cafe owners say prices rose 20% in 2015."),
    ("snake_case words and e-mail@example.com", "snake case words, e mail example com"),
    ("A b c\n\nd e f\n", "d e f\na b c"),
]

WORDS = ("the a of police said man men arrested charges court running runs ran study studies found new report "
         "city council vote votes voted year 2015 12 percent rise rising economy economic growth").split()


def _random_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 30))]
    for i in range(len(words)):  # some punctuation and capitals, and newlines for ROUGE-Lsum
        r = rng.random()
        if r < 0.1:
            words[i] = words[i].capitalize()
        elif r < 0.2:
            words[i] += rng.choice([".", ",", " .\n", "!", "'s"])
    return " ".join(words)


def _assert_same_as_rouge_score(prediction: str, reference: str) -> None:
    expected = REFERENCE.score(reference, prediction)
    got = rouge_pair(prediction, reference)
    for key in ROUGE_TYPES:
        assert (got[key].precision, got[key].recall, got[key].fmeasure) == tuple(expected[key]), key


@pytest.mark.parametrize("prediction, reference", FIXED_EN)
def test_english_equals_rouge_score_fixed(prediction: str, reference: str) -> None:
    _assert_same_as_rouge_score(prediction, reference)


def test_english_equals_rouge_score_random() -> None:
    rng = random.Random(0)
    pairs = [(_random_text(rng), _random_text(rng)) for _ in range(60)]
    for prediction, reference in pairs:
        _assert_same_as_rouge_score(prediction, reference)
    out = rouge_scores([p for p, _ in pairs], [r for _, r in pairs])
    for key in ROUGE_TYPES:
        expected = [REFERENCE.score(r, p)[key] for p, r in pairs]
        assert out[key] == pytest.approx(sum(s.fmeasure for s in expected) / len(pairs), abs=1e-12)
        assert out[f"{key}_recall"] == pytest.approx(sum(s.recall for s in expected) / len(pairs), abs=1e-12)
        assert out[f"{key}_precision"] == pytest.approx(sum(s.precision for s in expected) / len(pairs), abs=1e-12)


KO_REF = "연구진은 지카바이러스가 수컷 쥐의 생식능력을 떨어뜨린다는 결과를 발표했다."


def test_korean_identical_disjoint_partial() -> None:
    same = rouge_pair(KO_REF, KO_REF)
    assert all(same[k] == RougeScore(1.0, 1.0, 1.0) for k in ROUGE_TYPES)
    disjoint = rouge_pair("오늘 서울은 맑고 따뜻하겠습니다.", KO_REF)
    assert all(disjoint[k].fmeasure == 0.0 for k in ROUGE_TYPES)
    partial = rouge_pair("연구진은 지카바이러스가 태아에게 위험하다고 발표했다.", KO_REF)
    assert all(0.0 < partial[k].fmeasure < 1.0 for k in ROUGE_TYPES)
    # 3 of 5 prediction words and 3 of 8 reference words match (particles stay on their words).
    assert partial["rouge1"].precision == pytest.approx(3 / 5)
    assert partial["rouge1"].recall == pytest.approx(3 / 8)
    # rouge-score's own tokenizer drops Hangul entirely: the reason for the Unicode tokenizer.
    assert REFERENCE.score(KO_REF, KO_REF)["rouge1"].fmeasure == 0.0


def test_any_non_latin_letter_picks_the_unicode_tokenizer() -> None:
    # Which texts count as non-Latin: tests/test_text.py (has_non_latin_letter); here, that rouge_pair follows it.
    for text in ("Samsung 갤럭시 launched", "Москва", "北京"):
        assert rouge_pair(text, text) == rouge_pair(text, text, lang="ko")
    for text in ("Москва", "北京"):  # rouge-score's tokenizer would drop every letter
        assert rouge_pair(text, text)["rouge1"].fmeasure == 1.0
        assert rouge_pair(text, text, lang="en")["rouge1"].fmeasure == 0.0
    accented = "Café owners in München say “prices rose” — 20%."
    assert rouge_pair(accented, accented) == rouge_pair(accented, accented, lang="en")


def test_auto_language_per_pair() -> None:
    # A Korean reference switches both sides to the Unicode tokenizer, so English words still match.
    mixed = rouge_pair("Samsung Galaxy phones", "삼성 Galaxy 스마트폰 phone")
    assert mixed["rouge1"].precision == pytest.approx(2 / 3)  # galaxi, phone (stemmed) match
    assert rouge_pair(KO_REF, KO_REF, lang="en")["rouge1"].fmeasure == 0.0  # forcing "en" reproduces rouge-score
    assert rouge_pair(KO_REF, KO_REF, lang="ko")["rouge1"].fmeasure == 1.0
    english = "The councils voted on a new budget."
    assert rouge_pair(english, english, lang="ko") == rouge_pair(english, english)
    with pytest.raises(ValueError):
        rouge_pair("a", "b", lang="fr")


def test_unicode_tokenizer() -> None:
    tok = UnicodeTokenizer()
    assert tok.tokenize("연구진은, 'Running' 실험을 했다!") == ["연구진은", "run", "실험을", "했다"]
    assert tok.tokenize("ＡＢＣ　１２３") == ["abc", "123"]  # full-width to ASCII (NFKC)
    assert tok.tokenize("snake_case—x") == ["snake", "case", "x"]
    assert tok.tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs stay inside their word
    assert tok.tokenize("") == []


def test_rouge_lsum_splits_on_newlines() -> None:
    reference = "the cat sat on the mat\nthe dog ran in the park"
    swapped = "the dog ran in the park\nthe cat sat on the mat"
    scores = rouge_pair(swapped, reference)
    assert scores["rougeLsum"].fmeasure == pytest.approx(1.0)  # sentence order does not matter to Lsum
    assert scores["rougeL"].fmeasure < 0.7  # but does to the LCS over the whole text
    flat = rouge_pair(swapped.replace("\n", " "), reference.replace("\n", " "))
    assert flat["rougeLsum"] == flat["rougeL"]  # one line is one sentence
    ko_ref = "연구진은 결과를 발표했다\n쥐의 생식능력이 줄었다"
    ko = rouge_pair("쥐의 생식능력이 줄었다\n연구진은 결과를 발표했다", ko_ref)
    assert ko["rougeLsum"].fmeasure == pytest.approx(1.0) and ko["rougeL"].fmeasure < 1.0


def test_empty_and_errors() -> None:
    assert all(s.fmeasure == 0.0 for s in rouge_pair("", "").values())
    assert rouge_scores([""], ["text"])["rouge1"] == 0.0
    with pytest.raises(ValueError):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        rouge_scores([], [])
    with pytest.raises(TypeError):
        rouge_pair(None, "a")  # type: ignore[arg-type]


def test_bootstrap_interval_brackets_the_mean() -> None:
    rng = random.Random(1)
    pairs = [(_random_text(rng), _random_text(rng)) for _ in range(40)]
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    out = rouge_scores(preds, refs, bootstrap=True, n_resamples=300, seed=3)
    for key in ROUGE_TYPES:
        assert out[f"{key}_low"] < out[key] < out[f"{key}_high"]
    assert out == rouge_scores(preds, refs, bootstrap=True, n_resamples=300, seed=3)  # seeded
    assert "rouge1_low" not in rouge_scores(preds, refs)
    same = rouge_scores(["a b c"] * 5, ["a b c"] * 5, bootstrap=True, n_resamples=50)
    assert same["rouge1_low"] == same["rouge1"] == same["rouge1_high"] == 1.0


@pytest.mark.skipif(not KOREAN.exists(), reason="shared data not present")
def test_korean_news_extractive_summaries() -> None:
    rows = [json.loads(line) for line in KOREAN.read_text(encoding="utf-8").splitlines() if line.strip()]
    summaries, articles = [r["extractive_summary"] for r in rows], [r["article"] for r in rows]
    out = rouge_scores(summaries, articles)
    # Every word of an extractive summary is in its article: precision 1; the summary is a part: recall < 1.
    assert out["rouge1_precision"] == pytest.approx(1.0)
    assert 0.0 < out["rouge1_recall"] < 1.0
    assert out["rouge1"] > 0.3 and out["rouge2"] > 0.3
    # rouge-score's tokenizer would keep only the digits and Latin words of these articles.
    kept = sum(len(tokenizers.DefaultTokenizer().tokenize(a)) for a in articles)
    assert kept < 0.1 * sum(len(UnicodeTokenizer().tokenize(a)) for a in articles)


@pytest.mark.skipif(not CNN.exists(), reason="shared data not present")
def test_cnn_dailymail_lead3_equals_rouge_score() -> None:
    with CNN.open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    leads = ["\n".join(r["article"].split(". ")[:3]) for r in rows]  # Lead-3, one sentence per line
    for lead, row in zip(leads, rows):
        _assert_same_as_rouge_score(lead, row["highlights"])
    out = rouge_scores(leads, [r["highlights"] for r in rows])
    assert 0.2 < out["rouge1"] < 0.6 and out["rouge2"] < out["rouge1"]
