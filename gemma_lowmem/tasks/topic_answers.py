"""Read topic answers: :func:`parse_topic` (which of the four topics an answer names) and :func:`parse_grade`
(the verdict and the correct topic in a grading answer). Both accept Korean and English names and synonyms, Markdown,
extra words, and never raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Each pattern names one topic; at the same start the longest match wins ("World Cup" is sport, not "World").
_LATIN = [
    (0, r"world(?:\s+(?:news|affairs|politics))?"), (0, r"international(?:\s+(?:news|affairs))?"),
    (0, r"foreign\s+affairs"), (0, r"politics"), (0, r"global\s+(?:news|affairs)"),
    (1, r"sports?"), (1, r"sporting"), (1, r"athletics"), (1, r"world\s+(?:cup|series)"),
    (2, r"business(?:es)?"), (2, r"econom(?:y|ics|ic)"), (2, r"financ(?:e|ial)"), (2, r"commerce"),
    (2, r"markets?"), (2, r"world\s+(?:bank|trade)"),
    (3, r"sci(?:ence)?\s*(?:/|-|&|and)?\s*tech(?:nology)?"), (3, r"science"), (3, r"technology"), (3, r"tech"),
    (3, r"sci"),
]
_HANGUL = [
    (0, r"세계"), (0, r"국제"), (0, r"해외"), (0, r"외교"), (0, r"정치"), (1, r"스포츠"), (1, r"체육"),
    (2, r"경제"), (2, r"비즈니스"), (2, r"경영"), (2, r"금융"), (2, r"산업"),
    (3, r"과학\s*(?:/|·|및|와|과|,)?\s*기술"), (3, r"과학"), (3, r"기술"), (3, r"정보\s*통신"), (3, r"테크"),
]
# Latin names need letter-free edges ("sport" in "transport" is no mention), case-insensitive; Hangul names have no
# such edges (particles follow directly); "IT" counts only in capitals ("it" is a pronoun).
_TOPIC_RE = [(label, re.compile(rf"(?<![A-Za-z]){p}(?![A-Za-z])", re.IGNORECASE)) for label, p in _LATIN] + [
    (label, re.compile(p)) for label, p in _HANGUL] + [(3, re.compile(r"(?<![A-Za-z])IT(?![A-Za-z])"))]
# A mention followed by "이/가 아니" ("스포츠가 아니라 경제") or preceded by "not" is no answer.
_NEG_AFTER = re.compile(r"\s*['\"’”]?\s*(?:이|가|은|는)?\s*아(?:니|닙|닌)")
_NEG_BEFORE = re.compile(r"(?:\bnot|n't)\s+(?:an?\s+|the\s+|about\s+|in\s+)?['\"“‘]?$", re.IGNORECASE)
_BARE_LABEL = re.compile(r"\s*(?:label\s*[:=]?\s*)?([0-3])\s*[.)]?\s*", re.IGNORECASE)
_DECORATION = re.compile(r"[*_`#>]+")


def parse_topic(text: Any) -> int | None:
    """The topic a model's answer names: the first (non-negated) mention of a topic name or synonym.

    Args:
        text: the answer; any value (a non-string gives None).

    Returns:
        The label index (0 World, 1 Sports, 2 Business, 3 Sci/Tech) or None when no topic is named. An answer that
        is only a digit 0-3 (``"2"``, ``"label: 2"``) is read as the index.
    """
    if not isinstance(text, str):
        return None
    text = _DECORATION.sub(" ", text)
    bare = _BARE_LABEL.fullmatch(text)
    if bare:
        return int(bare.group(1))
    found: list[tuple[int, int, int]] = []  # (start, -length, label)
    for label, regex in _TOPIC_RE:
        for m in regex.finditer(text):
            if _NEG_AFTER.match(text, m.end()) or _NEG_BEFORE.search(text[max(0, m.start() - 20):m.start()]):
                continue
            found.append((m.start(), m.start() - m.end(), label))
    return min(found)[2] if found else None


@dataclass
class GradeAnswer:
    """What :func:`parse_grade` read: the verdict on the student's choice and the correct topic named."""

    verdict: bool | None  # True: the student's topic is right; None: no verdict found
    topic: int | None


_VERDICT_LABEL = re.compile(r"^\s*(?:판정|판단|결과|평가|채점|verdict|judg(?:e)?ment|decision|result|assessment)"
                            r"\s*[:：=\-–—]?\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_TOPIC_LABEL = re.compile(r"^\s*(?:정답\s*주제|올바른\s*주제|바른\s*주제|정답\s*분류|실제\s*주제|주제|정답|"
                          r"correct\s+(?:topic|label|category|answer)|right\s+(?:topic|answer)|true\s+topic|"
                          r"topic|category|label)\s*[:：=\-–—]\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_WRONG = (r"오답", r"틀렸", r"틀림", r"틀린", r"틀려", r"맞지\s*않", r"옳지\s*않", r"정답이\s*아(?:니|닙|닌)", r"잘못",
          r"\bincorrect\b", r"\bwrong\b", r"\bnot\s+(?:correct|right)\b", r"\bfalse\b", r"\bno\b")
_RIGHT = (r"정답(?!\s*(?:주제|분류|은|는|:|：))", r"맞습니다", r"맞았", r"맞음", r"맞다", r"맞아", r"맞게", r"옳습니다",
          r"옳다", r"올바르게", r"\bcorrect\b(?!\s+(?:topic|label|category|answer))",
          r"\bright\b(?!\s+(?:topic|answer))", r"\btrue\b", r"\byes\b")
_VERDICT_RE = [(False, re.compile(p, re.IGNORECASE)) for p in _WRONG] + [
    (True, re.compile(p, re.IGNORECASE)) for p in _RIGHT]


# "정답은 경제입니다", "the correct topic is Business", "it should be World": the topic follows the phrase.
_TOPIC_PHRASE = re.compile(r"(?:정답은|올바른\s*주제는|실제\s*주제는|correct\s+(?:topic|answer|label|category)\s+is|"
                           r"should\s+(?:be|have\s+been)|actually)\s*(.*)", re.IGNORECASE)


def _first_verdict(text: str) -> bool | None:
    found = [(m.start(), m.start() - m.end(), value) for value, regex in _VERDICT_RE for m in regex.finditer(text)]
    return min(found)[2] if found else None


def parse_grade(text: Any) -> GradeAnswer:
    """Read a grading answer: the verdict and the correct topic.

    The verdict comes from a labelled line (판정:, Verdict:, ...) when there is one, else from the first verdict word
    in the text (오답/정답, incorrect/correct, wrong/right, ...; "정답 주제" and "correct topic" are not verdicts).
    The topic comes from a labelled line (정답 주제:, Correct topic:, ...), else from the words after a phrase that
    names it ("정답은 ...", "the correct topic is ...", "should be ..."), else from the first topic named in the text.

    Args:
        text: the answer; any value (a non-string gives an empty result).

    Returns:
        A :class:`GradeAnswer`; missing parts are None.
    """
    if not isinstance(text, str):
        return GradeAnswer(None, None)
    text = _DECORATION.sub(" ", text)
    verdict = None
    for m in _VERDICT_LABEL.finditer(text):
        verdict = _first_verdict(m.group(1))
        if verdict is not None:
            break
    if verdict is None:
        verdict = _first_verdict(text)
    topic = None
    for m in [*_TOPIC_LABEL.finditer(text), *_TOPIC_PHRASE.finditer(text)]:
        topic = parse_topic(m.group(1))
        if topic is not None:
            break
    return GradeAnswer(verdict, topic if topic is not None else parse_topic(text))
