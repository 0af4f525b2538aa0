"""Student summaries of graded quality, made from an article and its reference summary.

CNN/DailyMail (and the Korean sets) hold an article and a reference summary, but no student summaries and no
scores. :func:`make_student_summary` writes one summary of a chosen *kind* and records every edit it made, so the
scores of :mod:`gemma_lowmem.tasks.summary_eval` follow from what was done, not from chance:

- ``near_reference``: the reference reworded (synonym swaps, a clause or the sentence order changed);
- ``lead``: the first three usable sentences of the article;
- ``partial``: the reference with some sentences (or, for one sentence, its second half) dropped;
- ``factual_error``: the reference with numbers, names, dates or words swapped for others (``original -> new``);
- ``verbose``: the reference padded with irrelevant article sentences (and a filler sentence);
- ``ungrammatical``: the reference with word-order swaps, dropped words and typos (counted);
- ``off_topic``: another article's reference summary;
- ``empty``: nothing, or a single word.

Everything is deterministic given the ``random.Random`` passed in. English and Korean both work: sentences split on
``. ? !`` (so also ``다.``) and newlines; numbers are swapped the same way in both; names are capitalised words,
so Korean errors come mostly from numbers, weekdays and antonyms.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from gemma_lowmem.text import HANGUL_RE, LETTER_RE, STOPWORDS_EN, content_tokens, detect_lang, split_sentences

KINDS = ("near_reference", "lead", "partial", "factual_error", "verbose", "ungrammatical", "off_topic", "empty")

_NUMBER = re.compile(r"(?<![\d.,])\d+(?:[.,]\d+)*(?!\d)")
# Korean particles and endings stripped from the end of a word before looking it up in the article.
_JOSA = sorted(
    ("은 는 이 가 을 를 의 에 에서 에게 께서 으로 로 와 과 도 만 까지 부터 이라고 라고 이라는 라는 이다 였다 했다 "
     "하고 하며 하는 한 된 될 되는 에는 에도 으로는 로는 이며 며 고 다").split(),
    key=len,
    reverse=True,
)

_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "billion")
_DATE_WORDS = {
    "en": [("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
           ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
            "November", "December")],
    "ko": [("월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"), ("오전", "오후")],
}
_ANTONYMS = {
    "en": {"increased": "decreased", "decreased": "increased", "rose": "fell", "fell": "rose", "won": "lost",
           "lost": "won", "higher": "lower", "lower": "higher", "before": "after",
           "after": "before", "first": "last", "last": "first", "largest": "smallest", "approved": "rejected",
           "rejected": "approved", "arrested": "released", "released": "arrested", "increase": "decrease",
           "decrease": "increase", "guilty": "innocent", "survived": "died", "died": "survived",
           "opened": "closed", "closed": "opened", "new": "old", "older": "younger", "younger": "older"},
    # Korean stems replaced inside words: only pairs whose endings fit both (높은/낮은, 늘어/줄어).
    "ko": {"증가": "감소", "감소": "증가", "늘어": "줄어", "줄어": "늘어", "높은": "낮은", "낮은": "높은",
           "커졌": "작아졌", "작아졌": "커졌", "많은": "적은", "적은": "많은", "빠르게": "느리게", "이상": "미만",
           "미만": "이상",
           "처음": "마지막", "성공": "실패", "실패": "성공", "늘었": "줄었", "줄었": "늘었", "상승": "하락",
           "하락": "상승", "최대": "최소", "최소": "최대"},
}
_SYNONYMS = {
    "en": {"said": "stated", "says": "states", "told": "informed", "announced": "declared", "big": "large",
           "large": "big", "help": "assist", "helped": "assisted", "began": "started", "begins": "starts",
           "started": "began", "died": "passed away", "kids": "children", "bought": "purchased", "buy": "purchase",
           "shows": "reveals", "showed": "revealed", "found": "discovered", "new": "recent", "after": "following",
           "police": "officers", "attack": "assault", "car": "vehicle", "home": "house", "many": "numerous",
           "nearly": "almost", "almost": "nearly", "quickly": "rapidly", "officials": "authorities",
           "claims": "alleges", "important": "key", "more than": "over", "wants": "hopes", "try": "attempt",
           "tried": "attempted", "get": "obtain", "people": "individuals", "hurt": "injured", "job": "position"},
    "ko": {"밝혔다": "발표했다", "연구진": "연구팀", "연구팀": "연구진", "나타났다": "드러났다", "발견했다": "찾아냈다",
           "진행했다": "실시했다", "설명했다": "말했다", "최근": "요즘", "하지만": "그러나", "그러나": "하지만",
           "또한": "아울러", "많은": "다수의", "이용해": "활용해", "사용해": "이용해", "매우": "아주",
           "가능성이": "여지가", "확인했다": "알아냈다", "전했다": "알렸다", "예정이다": "계획이다"},
}
_FILLER = {
    "en": "This article covers several different points, and there is a lot to say about each of them.",
    "ko": "이 기사는 여러 가지 내용을 다루고 있어서 하나씩 자세히 정리해 보겠습니다.",
}
_OFF_TOPIC_FALLBACK = {
    "en": "The weather stayed mild over the weekend. Many families visited the city park. Local shops reported "
          "busy days.",
    "ko": "주말 동안 날씨가 포근했다. 많은 가족이 시내 공원을 찾았다. 주변 상점들도 손님이 많았다고 전했다.",
}
_EMPTY_WORD = {"en": "Summary", "ko": "요약"}
_DROPPABLE_EN = {"the", "a", "an", "to", "of", "is", "was", "are", "were", "and", "in", "on", "for", "has", "have"}


@dataclass
class StudentSummary:
    """One generated student summary and the record of how it was made.

    Attributes:
        kind: one of :data:`KINDS`.
        text: the summary the student "wrote".
        clean_text: ``text`` before grammar noise (typos are charged to grammar, not to accuracy).
        edits: JSON-ready records of what was done, e.g. ``{"op": "swap", "type": "number", "from": "21", "to": "12"}``.
        factual_errors: how many facts were changed or invented.
        noise: how many grammar-noise edits (word-order swaps, dropped words, typos) were made.
    """

    kind: str
    text: str
    clean_text: str
    edits: list[dict[str, Any]] = field(default_factory=list)
    factual_errors: int = 0
    noise: int = 0


# -------------------------------------------------------------------------------------------------------- references


def clean_reference(highlights: str) -> str:
    """Normalise a reference summary to one sentence per line, ending in punctuation.

    CNN/DailyMail highlights put " ." before each newline and sometimes no period at all; other sets give
    running text. Both become ``"Sentence one.\\nSentence two."``.

    Args:
        highlights: the reference as stored in the data set.

    Returns:
        The cleaned reference.
    """
    lines = []
    for sent in split_sentences(highlights):
        sent = re.sub(r"\s+([.?!])$", r"\1", sent.strip())
        if not re.search(r"[.?!…]['\"”’)\]]*$", sent):
            sent += "."
        lines.append(sent)
    return "\n".join(lines)


def _stem_en(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _strip_josa(word: str) -> str:
    for ending in _JOSA:
        if len(word) > len(ending) + 1 and word.endswith(ending):
            return word[: -len(ending)]
    return word


class ArticleIndex:
    """What an article supports: its numbers, (stemmed) English words and its text for Korean look-ups."""

    def __init__(self, article: str) -> None:
        self.text = article.lower()
        tokens = content_tokens(article)
        self.numbers = {t for t in tokens if t[0].isdigit()}
        self.words = {_stem_en(t) for t in tokens if not t[0].isdigit()}

    def supports(self, token: str) -> bool:
        """Whether a content token of a summary is found in the article.

        Args:
            token: from :func:`content_tokens`.

        Returns:
            Numbers must appear as numbers; English words by crude stem; Korean words (particles stripped) as
            a substring of the article.
        """
        if token[0].isdigit():
            return token in self.numbers
        if HANGUL_RE.search(token):
            return _strip_josa(token) in self.text
        return _stem_en(token) in self.words


# ----------------------------------------------------------------------------------------------------------- helpers


def _join(sentences: list[str]) -> str:
    return " ".join(s.strip() for s in sentences if s.strip())


def _usable(sentence: str) -> bool:
    """An article sentence a student might copy: not a byline, caption stub or run-on page furniture."""
    letters = len(LETTER_RE.findall(sentence))
    balanced = sentence.count('"') % 2 == 0 and sentence.count("“") == sentence.count("”")
    return 20 <= letters and len(sentence) <= 400 and len(sentence.split()) >= 4 and balanced


def _strip_dateline(sentence: str) -> str:
    # "LONDON, England (CNN) -- The ..." / "(CNN)Share, ...": a student would not copy the agency marker.
    return re.sub(r"^.{0,60}?\((?:CNN|AP|Reuters)\)\s*(?:--\s*)?", "", sentence)


def _overlap(sentence: str, reference_tokens: set[str]) -> float:
    toks = set(content_tokens(sentence))
    return len(toks & reference_tokens) / max(1, len(toks))


def _minor_sentences(article_sents: list[str], reference: str, skip: int) -> list[str]:
    """Usable article sentences after the first ``skip``, least related to the reference first."""
    ref_tokens = set(content_tokens(reference))
    pool = [s for s in article_sents[skip:] if _usable(s)] or [s for s in article_sents if _usable(s)]
    ranked = sorted(range(len(pool)), key=lambda i: (_overlap(pool[i], ref_tokens), i))
    return [_strip_dateline(pool[i]) for i in ranked]


def _word_pattern(word: str) -> str:
    """A regex for ``word`` as a whole word or number (Korean: anywhere, since particles attach to words)."""
    if HANGUL_RE.search(word):
        return re.escape(word)
    if word[0].isdigit():  # "68년", "75mg", "20th": a unit may follow a number directly
        return r"(?<![\d.,])" + re.escape(word) + r"(?![\d])"
    return r"(?<![\w])" + re.escape(word) + r"(?![\w])"


def _replace_word(text: str, old: str, new: str, count: int = 0) -> str:
    """Replace whole words (or numbers) ``old`` with ``new``: the first ``count`` ones, or all with 0."""
    return re.sub(_word_pattern(old), new.replace("\\", "\\\\"), text, count=count)


# -------------------------------------------------------------------------------------------------------- generators


def _near_reference(ref_sents: list[str], lang: str, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    edits: list[dict[str, Any]] = []
    sents = list(ref_sents)
    if len(sents) >= 2 and rng.random() < 0.6:
        i = rng.randrange(len(sents) - 1)
        sents[i], sents[i + 1] = sents[i + 1], sents[i]
        edits.append({"op": "reorder_sentences", "positions": [i + 1, i + 2]})
    if lang == "en":
        for i, sent in enumerate(sents):
            # "X happened on Tuesday, police said." -> "Police said x happened on Tuesday."
            m = re.fullmatch(r"(.{12,}?), ((?:[a-z]+ ){0,3}(?:said|says|reported|told \w+))\.", sent)
            if m and rng.random() < 0.7:
                head = m.group(1)
                first, _, rest = head.partition(" ")
                if first.lower() in {"the", "a", "an", "it", "this", "they", "he", "she", "there"}:
                    head = first.lower() + " " + rest
                sents[i] = m.group(2)[0].upper() + m.group(2)[1:] + " " + head + "."
                edits.append({"op": "reorder_clause", "sentence": i + 1})
                break
    text = _join(sents)
    candidates = [w for w in _SYNONYMS[lang] if _word_in(text, w)]
    rng.shuffle(candidates)
    used: set[str] = set()
    for word in candidates[: rng.randint(1, 4)]:
        new = _SYNONYMS[lang][word]
        if word in used or new in used:  # 연구진 -> 연구팀 must not be swapped back
            continue
        text = _replace_word(text, word, new, count=1)
        used |= {word, new}
        edits.append({"op": "synonym", "from": word, "to": new})
    return text, edits


def _word_in(text: str, word: str) -> bool:
    return re.search(_word_pattern(word), text) is not None


def _lead(article_sents: list[str]) -> tuple[str, list[dict[str, Any]]]:
    picked = [s for s in article_sents if _usable(s)][:3] or article_sents[:3]
    picked = [_strip_dateline(picked[0])] + picked[1:] if picked else []
    return " ".join(picked), [{"op": "lead", "sentences": len(picked)}]


def _partial(ref_sents: list[str], article_sents: list[str], reference: str, lang: str,
             rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    edits: list[dict[str, Any]] = []
    if len(ref_sents) >= 2:
        keep_n = max(1, len(ref_sents) // 2) if rng.random() < 0.7 else 1
        keep = sorted(rng.sample(range(len(ref_sents)), keep_n))
        dropped = [ref_sents[i] for i in range(len(ref_sents)) if i not in keep]
        kept = [ref_sents[i] for i in keep]
        edits.append({"op": "drop_sentences", "dropped": dropped, "kept": len(kept), "of": len(ref_sents)})
    else:
        words = ref_sents[0].split()
        cut = max(1, len(words) // 2)
        kept = [" ".join(words[:cut]).rstrip(",;:") + ("." if lang == "en" else "")]
        dropped = [" ".join(words[cut:])] if words[cut:] else []
        edits.append({"op": "drop_sentences", "dropped": dropped, "kept": 0, "of": 1})
    if rng.random() < 0.5:
        minor = _minor_sentences(article_sents, reference, skip=3)
        if minor:
            kept.append(minor[0])
            edits.append({"op": "add_minor_detail", "sentence": minor[0]})
    return _join(kept), edits


def _swap_candidates(text: str, article: str, lang: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """Facts in ``text`` that can be swapped: ``(type, original, replacement)``, one per original."""
    out: list[tuple[str, str, str]] = []
    summary_numbers = {m.group() for m in _NUMBER.finditer(text)}
    article_numbers = list(dict.fromkeys(m.group() for m in _NUMBER.finditer(article)))
    for num in sorted(summary_numbers):
        is_year = bool(re.fullmatch(r"(19|20)\d\d", num))
        pool = [n for n in article_numbers
                if n not in summary_numbers and bool(re.fullmatch(r"(19|20)\d\d", n)) == is_year]
        out.append(("number", num, rng.choice(pool) if pool else _perturb_number(num)))
    words = set(re.findall(r"[^\W\d_]+", text))
    if lang == "en":
        for word in sorted(words):
            if word.lower() in _NUMBER_WORDS:
                others = [w for w in _NUMBER_WORDS[:11] if w != word.lower() and w not in text]
                if others:
                    out.append(("number", word, rng.choice(others)))
    for group in _DATE_WORDS[lang]:
        for word in group:
            if _word_in(text, word):
                others = [w for w in group if w != word and not _word_in(text, w)]
                in_article = [w for w in others if _word_in(article, w)]
                out.append(("date", word, (in_article or others)[0]))
    names_in_text = _names(text)
    article_names = {n: surname for n, surname in _names(article).items() if n not in names_in_text}
    for name, surname in names_in_text.items():
        pool = [n for n, s in article_names.items() if s == surname] or list(article_names)
        if pool and _word_in(article, name):
            out.append(("name", name, rng.choice(pool)))
    return out


def _names(text: str) -> dict[str, bool]:
    """Capitalised words that are not sentence starts, weekdays or months, in order of first use.

    Returns:
        name -> whether it follows another capitalised word (a surname like "Broussard" in "Zully Broussard"),
        so surnames are swapped with surnames rather than with places or companies.
    """
    skip = {w for group in _DATE_WORDS["en"] for w in group} | {"I", "CNN", "The"}
    found: dict[str, bool] = {}
    for m in re.finditer(r"(?<=[\w,;:] )([A-Z][a-z]{2,})\b", text):
        if m.group(1) not in skip:
            surname = re.search(r"[A-Z][a-z]+ $", text[: m.start()]) is not None
            found[m.group(1)] = found.get(m.group(1), False) or surname
    return found


def _perturb_number(num: str) -> str:
    digits = num.replace(",", "")
    if not re.fullmatch(r"\d+", digits):  # 3.5 -> 4.5, 2016.11.14 -> 2016.12.14
        parts = re.split(r"([.,])", num)
        parts[-1] = str(int(parts[-1]) + 1) if parts[-1].isdigit() else parts[-1]
        return "".join(parts)
    value = int(digits)
    if re.fullmatch(r"(19|20)\d\d", digits):
        return str(value - 2)
    if value < 10:
        return str(value + 3)
    return f"{value * 2:,}" if "," in num else str(value * 2)


def _factual_error(ref_sents: list[str], article: str, lang: str,
                   rng: random.Random) -> tuple[str, list[dict[str, Any]], int]:
    text = _join(ref_sents)
    candidates = _swap_candidates(text, article, lang, rng)
    if not candidates:
        candidates = [("antonym", w, r) for w, r in _ANTONYMS[lang].items() if _word_in(text, w)]
    edits: list[dict[str, Any]] = []
    if candidates:
        # One fact per type in turn (numbers, names and dates in random order, antonyms last), so summaries rich in
        # capitalised words do not get only name swaps.
        rng.shuffle(candidates)
        # sorted() before the random keys: iterating a set of strings depends on PYTHONHASHSEED
        types = sorted(sorted({c[0] for c in candidates}), key=lambda t: (t == "antonym", rng.random()))
        rank = {t: i for i, t in enumerate(types)}
        seen: dict[str, int] = {}
        order = []
        for cand in candidates:
            seen[cand[0]] = seen.get(cand[0], -1) + 1
            order.append((seen[cand[0]], rank[cand[0]], cand))
        candidates = [cand for *_, cand in sorted(order)]
        wanted = rng.choice((1, 1, 2))
        for kind, old, new in candidates:
            if len(edits) == wanted:
                break
            if _word_in(text, new):  # already in the summary (an earlier swap put it there)
                continue
            before = text
            text = _replace_word(text, old, new, count=0 if kind == "name" else 1)
            if text != before:
                edits.append({"op": "swap", "type": kind, "from": old, "to": new,
                              "context_from": _context(before, old), "context_to": _context(text, new)})
    if not edits:  # nothing to swap: invent a number the article never gives
        invented = {"en": "More than 300 people were affected.", "ko": "이 일로 300명 이상이 영향을 받았다."}[lang]
        text = text + " " + invented
        edits.append({"op": "invent", "text": invented})
    return text, edits, len(edits)


def _context(text: str, value: str) -> str:
    """The value with its whole word and, for English, a following content word ("12 deaths"; Korean "12명")."""
    m = re.search(_word_pattern(value), text)
    if m is None:
        return value
    start, end = m.start(), m.end()
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    nxt = re.match(r" ([a-z]+)\b", text[end:])
    if nxt and nxt.group(1) not in STOPWORDS_EN:
        end += nxt.end()
    return text[start:end].strip(".,;:\"'()")


def _verbose(ref_sents: list[str], article_sents: list[str], reference: str, lang: str,
             rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    minor = _minor_sentences(article_sents, reference, skip=0)
    added = minor[: rng.randint(2, 4)]
    sents = list(ref_sents)
    for sent in added:
        sents.insert(rng.randint(1, len(sents)), sent)
    edits: list[dict[str, Any]] = [{"op": "add_irrelevant", "sentences": added}] if added else []
    if rng.random() < 0.5 or not added:  # an article too short to pad from still gets padded
        sents.insert(0, _FILLER[lang])
        edits.append({"op": "add_filler", "sentence": _FILLER[lang]})
    return _join(sents), edits


def _typo(word: str, lang: str, rng: random.Random) -> str:
    if lang == "ko" or HANGUL_RE.search(word):
        chars = list(word)
        i = rng.randrange(len(chars) - 1)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    i = rng.randrange(1, len(word) - 2)
    how = rng.randrange(3)
    if how == 0:  # swap two letters
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if how == 1:  # double a letter
        return word[: i + 1] + word[i] + word[i + 1:]
    return word[:i] + word[i + 1:]  # drop a letter


def _ungrammatical(ref_sents: list[str], lang: str, rng: random.Random) -> tuple[str, str, list[dict[str, Any]], int]:
    clean = _join(ref_sents)
    words = clean.split()
    most = min(8, max(2, len(words) // 5))  # up to one error per five words
    n_noise = rng.randint(2, most)
    counts = {"word_swaps": 0, "dropped_words": 0, "typos": 0}
    examples: list[dict[str, str]] = []
    for _ in range(n_noise):
        op = rng.choice(("word_swaps", "dropped_words", "typos"))
        if op == "word_swaps":
            # Swap inside a sentence only: the first word of the pair must not end it.
            spots = [i for i in range(len(words) - 1) if words[i][-1].isalnum() and words[i + 1][-1].isalnum()]
            if spots:
                i = rng.choice(spots)
                examples.append({"op": op, "from": f"{words[i]} {words[i + 1]}", "to": f"{words[i + 1]} {words[i]}"})
                words[i], words[i + 1] = words[i + 1], words[i]
                counts[op] += 1
                continue
        if op in ("word_swaps", "dropped_words") and len(words) > 3:
            droppable = [i for i, w in enumerate(words) if w.lower() in _DROPPABLE_EN] if lang == "en" else []
            droppable = droppable or [i for i, w in enumerate(words[1:], 1) if w[-1].isalnum()]
            if droppable:
                i = rng.choice(droppable)
                examples.append({"op": "dropped_words", "from": words[i], "to": ""})
                del words[i]
                counts["dropped_words"] += 1
                continue
        long_words = [i for i, w in enumerate(words) if len(w.strip(".,;:\"'")) >= (3 if HANGUL_RE.search(w) else 5)
                      and w.strip(".,;:\"'").isalpha()]
        if long_words:
            i = rng.choice(long_words)
            core = words[i].strip(".,;:\"'")
            bad = _typo(core, lang, rng)
            if bad == core:  # swapped two equal letters: no typo made, none counted
                continue
            examples.append({"op": "typos", "from": core, "to": bad})
            words[i] = words[i].replace(core, bad, 1)
            counts["typos"] += 1
    total = sum(counts.values())
    edits = [{"op": "noise", **counts, "examples": examples[:4]}]
    return " ".join(words), clean, edits, total


def _empty(reference: str, lang: str, rng: random.Random) -> tuple[str, list[dict[str, Any]]]:
    if rng.random() < 0.3:
        return "", [{"op": "empty"}]
    words = [w.strip(".,;:\"'()`“”‘’") for w in reference.split()]
    words = [w for w in words if len(w) > 1 and w.isalpha() and w.lower() not in STOPWORDS_EN]
    word = words[0] if words and rng.random() < 0.6 else _EMPTY_WORD[lang]
    return word, [{"op": "one_word", "word": word}]


def make_student_summary(
    kind: str,
    article: str,
    reference: str,
    other_reference: str | None,
    rng: random.Random,
    lang: str | None = None,
) -> StudentSummary:
    """Write a student summary of the given kind.

    Args:
        kind: one of :data:`KINDS`.
        article: the article text.
        reference: the reference summary (cleaned, see :func:`clean_reference`).
        other_reference: another article's reference, for ``off_topic`` (None: a fixed unrelated text).
        rng: the only source of randomness.
        lang: the article's language, ``"en"`` or ``"ko"`` (None: detected).

    Returns:
        The summary with its edits and counts of factual errors and noise.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown summary kind {kind!r}; expected one of {KINDS}")
    lang = lang or detect_lang(article)
    ref_sents = split_sentences(reference) or [reference]
    article_sents = split_sentences(article)
    errors = noise = 0
    clean = None
    if kind == "near_reference":
        text, edits = _near_reference(ref_sents, lang, rng)
    elif kind == "lead":
        text, edits = _lead(article_sents)
    elif kind == "partial":
        text, edits = _partial(ref_sents, article_sents, reference, lang, rng)
    elif kind == "factual_error":
        text, edits, errors = _factual_error(ref_sents, article, lang, rng)
    elif kind == "verbose":
        text, edits = _verbose(ref_sents, article_sents, reference, lang, rng)
    elif kind == "ungrammatical":
        text, clean, edits, noise = _ungrammatical(ref_sents, lang, rng)
    elif kind == "off_topic":
        text = _join(split_sentences(other_reference or _OFF_TOPIC_FALLBACK[lang]))
        edits = [{"op": "other_reference", "fallback": other_reference is None}]
    else:
        text, edits = _empty(reference, lang, rng)
    return StudentSummary(kind, text, text if clean is None else clean, edits, errors, noise)
