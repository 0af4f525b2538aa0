"""Text helpers: language by Hangul share, non-Latin letters, sentence splitting and cutting, content tokens."""

from gemma_lowmem.text import (
    content_tokens,
    cut_at_sentence_end,
    detect_lang,
    has_non_latin_letter,
    split_sentences,
)

KO = "연구진은 지카바이러스가 수컷 쥐의 생식능력을 떨어뜨린다는 결과를 발표했다."


def test_detect_lang_counts_the_share_of_hangul_letters() -> None:
    assert detect_lang("") == "en"
    assert detect_lang("The cat sat. 20%") == "en"
    assert detect_lang(KO) == "ko"
    assert detect_lang("삼성은 Galaxy S24를 발표했다.") == "ko"  # a Korean sentence with an English name
    # One Korean word in English text, or another script, leaves the text English.
    assert detect_lang("Samsung 갤럭시 launched") == "en"
    assert detect_lang("Москва") == "en"


def test_has_non_latin_letter() -> None:
    assert not has_non_latin_letter("The cat sat.")
    assert not has_non_latin_letter("Café in München, “quoted” — 20%")
    assert not has_non_latin_letter("")
    assert has_non_latin_letter(KO)
    assert has_non_latin_letter("Samsung 갤럭시 launched")
    assert has_non_latin_letter("Москва")
    assert has_non_latin_letter("北京")


def test_sentence_splitting() -> None:
    assert split_sentences("Mr. Smith met U.S. officials. He left! 결과가 나왔다.다음 문장이다") == [
        "Mr. Smith met U.S. officials.", "He left!", "결과가 나왔다.", "다음 문장이다"]


def test_cut_at_sentence_end() -> None:
    text = "One sentence here. Two sentence here. Three."
    assert cut_at_sentence_end(text, 40) == "One sentence here. Two sentence here."
    text = "One two. Three four five. Six."
    assert cut_at_sentence_end(text, 100) == text
    assert cut_at_sentence_end(text, 20) == "One two."
    assert cut_at_sentence_end("한 문장입니다. 두 번째 문장입니다.", 12) == "한 문장입니다."
    assert cut_at_sentence_end("nosentenceendhere", 5) == "nosen"
    assert cut_at_sentence_end("A first sentence that runs long.", 12) == "A first"  # at a space, not mid-word


def test_content_tokens() -> None:
    assert content_tokens("The 1,200 Police said a man fled.") == ["1200", "police", "man", "fled"]
    assert content_tokens("The Police fled.", keep_case=True) == ["Police", "fled"]
    assert content_tokens("연구진은 3명") == ["연구진은", "3"]  # the unit 명 is a one-letter word
