"""Text helpers for English and Korean: language, sentences, content words.

A leaf module (imports nothing of ours), so tasks, grading, tokenizing and ``evaluation/`` can all use it. Sentences
split on ``. ? !`` (so also ``다.``) and newlines, never after an abbreviation or an initial.
"""

from __future__ import annotations

import re
import unicodedata

HANGUL_RE = re.compile(r"[가-힣]")
LETTER_RE = re.compile(r"[^\W\d_]")  # a letter of any script
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
# A sentence ends at . ? ! (with closing quotes or brackets) followed by space, at 다. directly followed by Hangul,
# or at a newline.
_BOUNDARY = re.compile(r"(?P<end>[.?!…]+[\"'”’)\]]*)(?P<space>\s+)(?=\S)|(?<=다\.)(?=[가-힣])|\s*\n\s*")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "gov", "sen", "rep", "rev", "lt", "col", "capt", "sgt",
    "no", "vs", "u.s", "u.k", "u.n", "e.g", "i.e", "inc", "corp", "co", "ltd", "jan", "feb", "mar", "apr", "aug",
    "sep", "sept", "oct", "nov", "dec", "mt", "ft", "a.m", "p.m",
}
_WORD = re.compile(r"\d+(?:[.,]\d+)*%?|[A-Za-z]+(?:['’][A-Za-z]+)*|[가-힣]+|[^\W_]+")

STOPWORDS_EN = frozenset((
    "a an the and or but if of to in on at by for from with about as into onto over after before than then so "
    "is are was were be been being am has have had do does did will would can could should may might must shall "
    "it its it's this that these those there their they them he him his she her we our us you your i me my "
    "not no yes who whom whose which what when where why how all any some more most other such only also just "
    "very up down out off again further once here both each few own same too s t said says say"
).split())


def detect_lang(text: str) -> str:
    """The language of a text: ``"ko"`` when at least a fifth of its letters are Hangul, else ``"en"``.

    A share, not "any Hangul letter": the answer picks a task's prompts, word lists and feedback language, so an
    English article that quotes one Korean word (or a Korean one full of English names) must keep its language.
    Which ROUGE tokenizer a text needs is another question, answered by :func:`has_non_latin_letter`.

    Args:
        text: any text.

    Returns:
        ``"ko"`` or ``"en"``.
    """
    letters = len(LETTER_RE.findall(text))
    return "ko" if letters and len(HANGUL_RE.findall(text)) >= 0.2 * letters else "en"


def has_non_latin_letter(text: str) -> bool:
    """Whether ``text`` holds a letter of a non-Latin script (Hangul, CJK, Cyrillic, ...).

    Accented Latin letters (café, München) do not count: rouge-score's tokenizer, which keeps ``[a-z0-9]`` only,
    drops the accented letter but keeps the rest of the word, so such text scores as English does.

    Args:
        text: any text.

    Returns:
        True when some letter's Unicode name does not start with ``LATIN``.
    """
    if text.isascii():
        return False
    return any(ch.isalpha() and not unicodedata.name(ch, "").startswith("LATIN")
               for ch in set(_NON_ASCII_RE.findall(text)))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text`` (English or Korean).

    Args:
        text: the text to split.

    Returns:
        ``(start, end)`` of each non-empty sentence, in order, without surrounding space.
    """
    spans, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group("end"):
            nxt = text[m.end()]
            before = re.search(r"(\S+)$", text[start:m.start()])
            word = before.group(1).lower() if before else ""
            # "e.g. this", "Mr. Smith", "J. Smith", "U.S. forces": not a sentence end.
            if (nxt.isascii() and nxt.islower()) or word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
            end = m.end("end")
        else:
            end = m.start()
        _add_span(text, start, end, spans)
        start = m.end()
    _add_span(text, start, len(text), spans)
    return spans


def _add_span(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        spans.append((start + lead, start + lead + len(stripped)))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see :func:`sentence_spans`).

    Args:
        text: the text to split.

    Returns:
        The sentences, stripped.
    """
    return [text[a:b] for a, b in sentence_spans(text)]


def cut_at_sentence_end(text: str, max_chars: int) -> str:
    """Shorten ``text`` to at most ``max_chars`` characters, ending at a sentence end where one fits.

    Args:
        text: the text.
        max_chars: the length limit.

    Returns:
        ``text`` itself when short enough; else the longest prefix of whole sentences, or (when even the first
        sentence is too long) the prefix up to the last space before the limit.
    """
    if len(text) <= max_chars:
        return text
    ends = [b for _, b in sentence_spans(text) if b <= max_chars]
    if ends:
        return text[: ends[-1]]
    space = text.rfind(" ", 0, max_chars + 1)
    return text[: space if space > 0 else max_chars].rstrip()


def content_tokens(text: str, keep_case: bool = False) -> list[str]:
    """Words and numbers that carry content: English stopwords and one-letter words dropped, numbers kept.

    Args:
        text: English or Korean text.
        keep_case: give the words as written instead of lowercased (same tokens, same order).

    Returns:
        Lowercased tokens (numbers without thousands separators), in order.
    """
    out = []
    for tok in _WORD.findall(text):
        low = tok.lower()
        if tok[0].isdigit():
            out.append(low.replace(",", ""))
        elif low not in STOPWORDS_EN and len(low) > 1:
            out.append(tok if keep_case else low)
    return out
