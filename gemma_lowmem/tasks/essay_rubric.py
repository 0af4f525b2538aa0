"""The essay rubric (claim 25, evidence 25, counter-arguments 15, organisation 20, expression 15): write and read it.

:func:`render_essay_rubric` writes the training format, laid out like task 1's rubric answer (title, bold total,
one line per criterion with a comment, overall feedback, suggestions). :func:`parse_essay_rubric` reads it back and
what models write instead: bold or plain labels, ``점``/``points`` units, ``N/M``, ``N out of M``, "25점 만점에 18점",
numbered lists, Markdown table rows, label synonyms, criteria in any order, a score on the line after its label.
Numbers are read with the criterion-independent helpers of :mod:`gemma_lowmem.evaluation.rubric`; that module's
label table and checks are fixed to task 1's four criteria, so this one has its own (see the lead's note in the
task report on generalising ``parse_rubric`` over a criteria table). It never raises.

Decisions (pinned by the tests): the first evaluation counts (a score field read twice ends it); ``valid`` needs all
five scores within [0, max] (a written maximum must be the criterion's), the total written, within [0, 100] and
within 1 point of the sum; a missing total is computed from the five scores (``total_computed``, not valid).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gemma_lowmem.evaluation.rubric import FULLWIDTH, score_at, strip_markdown

ESSAY_CRITERIA: MappingProxyType[str, tuple[int, str, str]] = MappingProxyType({
    "claim": (25, "주장의 명확성", "Clarity of claim"),
    "evidence": (25, "근거의 타당성", "Evidence and reasoning"),
    "counter": (15, "반론 고려", "Counter-arguments"),
    "organization": (20, "구성", "Organisation"),
    "expression": (15, "표현", "Expression"),
})
"""Criterion key -> (maximum, Korean label, English label), in the order the answer lists them; 100 in total."""

MAX_TOTAL = 100
CRITERIA_HELP = {  # what each criterion asks: (English, Korean)
    "claim": ("is the writer's position stated clearly and kept throughout?",
              "글의 주장(입장)이 분명하고 끝까지 유지되는가"),
    "evidence": ("are the reasons and examples relevant, specific and sufficient?",
                 "주장을 뒷받침하는 근거와 예시가 타당하고 구체적이며 충분한가"),
    "counter": ("does it take up an opposing view and answer it?", "반대 의견을 다루고 그에 대해 반박하는가"),
    "organization": ("is it organised into introduction, body and conclusion, with paragraphs and transitions?",
                     "서론-본론-결론의 구성과 문단 나누기, 연결이 논리적인가"),
    "expression": ("are the sentences clear, and the word choice, spelling and grammar accurate?",
                   "문장이 명확하고 어휘, 맞춤법, 문법이 정확한가"),
}
_HEADINGS = {
    "ko": {"title": "에세이 평가 결과:", "total": "총점", "details": "세부 평가", "feedback": "전체 피드백",
           "suggestions": "개선 제안"},
    "en": {"title": "Essay evaluation:", "total": "Total score", "details": "Detailed evaluation",
           "feedback": "Overall feedback", "suggestions": "Suggestions for improvement"},
}


@dataclass
class EssayRubricResult:
    """What :func:`parse_essay_rubric` read (fields as in task 1's ``RubricResult``)."""

    total: float | None = None
    scores: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(ESSAY_CRITERIA))
    comments: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(ESSAY_CRITERIA))
    feedback: str | None = None
    suggestions: str | None = None
    valid: bool = False
    total_computed: bool = False
    problems: list[str] = field(default_factory=list)


def render_essay_rubric(scores: dict[str, int], feedback: str, suggestions: str, comments: dict[str, str],
                        lang: str = "ko") -> str:
    """Write an essay rubric answer; the total is the sum of the five scores.

    Args:
        scores: criterion key -> whole-number score within [0, max], for every criterion of :data:`ESSAY_CRITERIA`.
        feedback: the overall feedback paragraph.
        suggestions: the suggestions, as given (``- `` bullets).
        comments: criterion key -> one-sentence comment (missing or empty: the line has none).
        lang: ``"ko"`` or ``"en"``.

    Returns:
        The answer text, without a trailing newline.

    Raises:
        ValueError: a missing or unknown criterion, or a score that is not a whole number within its range.
    """
    if lang not in _HEADINGS:
        raise ValueError(f"lang must be 'ko' or 'en', got {lang!r}")
    if set(scores) != set(ESSAY_CRITERIA) or not set(comments) <= set(ESSAY_CRITERIA):
        raise ValueError(f"scores must have exactly the keys {list(ESSAY_CRITERIA)} (comments some of them), "
                         f"got {sorted(scores)} and {sorted(comments)}")
    values = {}
    for key, (maximum, _, _) in ESSAY_CRITERIA.items():
        value = scores[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or not (
                0 <= value <= maximum):
            raise ValueError(f"scores[{key!r}] = {value!r} must be a whole number within [0, {maximum}]")
        values[key] = int(value)
    h = _HEADINGS[lang]
    lines = [h["title"], "", f"**{h['total']}: {sum(values.values())}/{MAX_TOTAL}**", "", f"**{h['details']}:**"]
    for key, (maximum, label_ko, label_en) in ESSAY_CRITERIA.items():
        comment = " ".join((comments.get(key) or "").split())
        line = f"- {label_ko if lang == 'ko' else label_en}: {values[key]}/{maximum}"
        lines.append(f"{line} - {comment}" if comment else line)
    lines += ["", f"**{h['feedback']}:**", feedback.strip(), "", f"**{h['suggestions']}:**", suggestions.strip()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ parsing

_LABELS = {
    "claim": [r"주장\s*의?\s*(?:명확|명료|분명)\s*(?:성|함|도)?", r"논지\s*(?:의\s*)?(?:명확\s*성)?", r"주장",
              r"(?:clarity\s+of\s+(?:the\s+)?)?(?:claim|position|thesis)(?:\s+clarity)?"],
    "evidence": [r"근거\s*(?:의\s*)?(?:타당\s*성|적절\s*성|충분\s*성)?", r"논거",
                 r"evidence(?:\s+(?:and|&)\s+reasoning)?", r"support(?:ing\s+evidence)?", r"reasoning"],
    "counter": [r"반론\s*(?:의\s*)?(?:고려|검토|반박|처리)?", r"반대\s*(?:의견|입장)\s*(?:고려)?",
                r"counter(?:[\s-]*(?:arguments?|claims?))?", r"opposing\s+views?", r"rebuttal"],
    "organization": [r"(?:글\s*의\s*)?구성\s*(?:력)?", r"조직\s*성?", r"구조", r"organi[sz]ation", r"structure",
                     r"coherence"],
    "expression": [r"(?:문장\s*)?표현\s*력?", r"(?:문법|어법)\s*(?:및|과|와|/)?\s*(?:표현)?",
                   r"expression", r"language(?:\s+use)?", r"style", r"grammar(?:\s+(?:and|&)\s+expression)?",
                   r"conventions", r"mechanics"],
    "total": [r"총\s*점\s*수?", r"합계(?:\s*점수)?", r"총합", r"(?:최종|전체|종합)\s*점수",
              r"(?:total|overall|final)(?:\s+score)?"],
    "title": [r"(?:에세이|글)\s*평가(?:\s*결과)?", r"평가\s*결과", r"essay\s+evaluation(?:\s+results?)?",
              r"evaluation\s+results?"],
    "details": [r"세부\s*(?:평가|점수)", r"항목별\s*(?:평가|점수)", r"detailed\s+(?:evaluation|scores?)",
                r"(?:score\s+)?breakdown"],
    "feedback": [r"(?:전체|종합)\s*(?:피드백|평가|의견)", r"총평", r"피드백", r"(?:overall|general)\s+feedback",
                 r"feedback", r"comments?"],
    "suggestions": [r"개선\s*(?:제안|사항|방안|점)(?:\s*사항)?", r"제안\s*(?:사항)?",
                    r"(?:suggestions?|recommendations?)(?:\s+for\s+improvement)?", r"how\s+to\s+improve",
                    r"improvements?"],
}
_SCORE_FIELDS = (*ESSAY_CRITERIA, "total")
_LABEL_RE = {name: re.compile(rf"(?:{'|'.join(alts)})" + (r"(?:은|는|이|가)?" if name in _SCORE_FIELDS else "")
                              + r"(?![^\W_])", re.IGNORECASE) for name, alts in _LABELS.items()}
# Between a label and its number: an echoed maximum "(25점)", separators, a "점수:" word.
# A dash is a separator only before a space: "Claim: -2" keeps its sign.
_GAP_RE = re.compile(r"(?:\s*[(\[][^()\[\]]*[)\]])*(?:[\s:=|→*]|[-–—](?=\s))*(?:(?:점수|score)\s*[:=]?\s*)?",
                     re.IGNORECASE)
_HEADER_REST_RE = re.compile(r"\s*(?:(?:[:：]|[-–—]\s)\s*(.*))?$")  # "피드백:", "Feedback: inline text"
_SECTIONS = ("feedback", "suggestions")


def _label_at(text: str) -> tuple[str, int] | None:
    """The longest label at the start of ``text``: (field, end offset)."""
    best = None
    for name, regex in _LABEL_RE.items():
        m = regex.match(text)
        if m and (best is None or m.end() > best[1]):
            best = (name, m.end())
    return best


def _score_after(rest: str) -> tuple[float, float | None, str | None] | None:
    """A score right after a label: (value, written maximum, the comment after it)."""
    pos = _GAP_RE.match(rest).end()
    found = score_at(rest[pos:])
    if found is None:
        return None
    value, written, end = found
    comment = rest[pos + end:].lstrip(" \t-–—:|,.;)]}\"'").rstrip(" \t|")
    return value, written, comment or None


def _drop_intro(texts: dict[str, list[str]], last: str | None) -> None:
    """Drop a line such as "Revised evaluation:" that introduces a second evaluation from the section before it."""
    while last and texts[last] and texts[last][-1].replace("*", "").rstrip().endswith((":", "：")):
        texts[last].pop()


def _parse(text: str) -> EssayRubricResult:
    result = EssayRubricResult()
    written_max: dict[str, float | None] = {}
    texts: dict[str, list[str]] = {"feedback": [], "suggestions": []}
    section: str | None = None  # the section whose lines are being collected
    last: str | None = None  # the section that got the latest line
    pending: str | None = None  # a score label alone on its line: the number may come on the next line
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not raw.strip():
            continue
        found = None
        cells = raw.strip().strip("|").split("|") if raw.count("|") >= 2 else [raw]
        head = strip_markdown(cells[0]).translate(FULLWIDTH)
        rest_cells = " | ".join(c.strip() for c in cells[1:])
        label = _label_at(head)
        name, rest = (label[0], head[label[1]:] + " " + rest_cells) if label else (None, head + " " + rest_cells)
        if name not in _SCORE_FIELDS and pending is not None and (found := _score_after(head)) is not None:
            name = pending  # "점수: 18/25" under a criterion heading
        elif name in _SCORE_FIELDS:
            found = _score_after(rest)
            if found is None and not rest.strip(" :：*"):
                pending, section = name, None
                continue
        pending = None
        scored = result.total is not None or any(v is not None for v in result.scores.values())
        if name in _SCORE_FIELDS and found is not None:
            if (result.total if name == "total" else result.scores[name]) is not None:
                _drop_intro(texts, last)
                break  # a second evaluation starts: the first one counts
            value, written, comment = found
            written_max[name] = written
            if name == "total":
                result.total = value
            else:
                result.scores[name], result.comments[name] = value, comment
            section = None
            continue
        header = _HEADER_REST_RE.match(head[label[1]:]) if label and name not in _SCORE_FIELDS else None
        if header and (name in _SECTIONS or not header.group(1)):
            if (name in _SECTIONS and texts[name]) or (name == "title" and scored):
                _drop_intro(texts, last)
                break  # the section or the title again: a second evaluation
            section = name if name in _SECTIONS else None
            if section and header.group(1):
                texts[section].append(header.group(1))
                last = section
            continue
        if section:
            texts[section].append(raw.rstrip())
            last = section
    result.feedback = "\n".join(texts["feedback"]).strip() or None
    result.suggestions = "\n".join(texts["suggestions"]).strip() or None
    return _check(result, written_max)


def _check(result: EssayRubricResult, written_max: dict[str, float | None]) -> EssayRubricResult:
    problems = []
    for key, (maximum, _, _) in ESSAY_CRITERIA.items():
        value = result.scores[key]
        if value is None:
            problems.append(f"missing score for {key}")
            continue
        if written_max.get(key) is not None and written_max[key] != maximum:
            problems.append(f"{key} written out of {written_max[key]:g}; its maximum is {maximum}")
        if not 0 <= value <= maximum:  # also catches NaN
            problems.append(f"{key} score {value:g} is outside [0, {maximum}]")
    present = [v for v in result.scores.values() if v is not None and math.isfinite(v)]
    if result.total is None:
        if len(present) == len(ESSAY_CRITERIA):
            result.total, result.total_computed = float(sum(present)), True
            problems.append(f"missing total; computed {result.total:g} from the five scores")
        else:
            problems.append("missing total")
    else:
        if written_max.get("total") is not None and written_max["total"] != MAX_TOTAL:
            problems.append(f"total written out of {written_max['total']:g}; the maximum is {MAX_TOTAL}")
        if not 0 <= result.total <= MAX_TOTAL:
            problems.append(f"total {result.total:g} is outside [0, {MAX_TOTAL}]")
        if len(present) == len(ESSAY_CRITERIA) and not abs(result.total - sum(present)) <= 1:
            problems.append(f"total {result.total:g} differs from the sum of the scores {sum(present):g}")
    result.valid = not problems
    if result.feedback is None:
        problems.append("missing overall feedback")
    if result.suggestions is None:
        problems.append("missing suggestions")
    result.problems = problems
    return result


def parse_essay_rubric(text: Any) -> EssayRubricResult:
    """Read an essay rubric answer; never raises.

    Args:
        text: the model's answer (a non-string gives an invalid result).

    Returns:
        Scores, total, comments, texts, validity and problems (see the module docstring).
    """
    if not isinstance(text, str):
        return EssayRubricResult(problems=[f"input is not a string (got {type(text).__name__})"])
    try:
        return _parse(text)
    except Exception as err:  # the contract is "never raises"; the tests check this branch is not taken
        return EssayRubricResult(problems=[f"internal parser error: {type(err).__name__}: {err}"])
