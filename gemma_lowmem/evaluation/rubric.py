"""Rubric answers as data and text: a :class:`RubricSpec` and the answer format it writes.

A :class:`RubricSpec` is one rubric as data: its criteria (maximum and Korean and English labels), the title and
headings of the answer and more words models use for its labels. Each task defines its own beside it
(:mod:`gemma_lowmem.tasks.summary_rubric`, :mod:`gemma_lowmem.tasks.essay_rubric`) and passes it: nothing here
knows any task's rubric.

:func:`rubric_template` is the answer format as fixed text and slots (a total, one score and comment per
criterion, overall feedback and suggestions); :func:`render_rubric` fills it in Korean or English, as training
writes it, and :func:`~gemma_lowmem.evaluation.rubric_parse.parse_rubric` reads it back, and what models write
instead.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_HEADING_NAMES = ("title", "total", "details", "feedback", "suggestions")

# The headings under a rubric answer's title, as :func:`render_rubric` writes them.
SECTION_HEADINGS: Mapping[str, Mapping[str, str]] = MappingProxyType({
    "ko": MappingProxyType({"total": "총점", "details": "세부 평가", "feedback": "전체 피드백",
                            "suggestions": "개선 제안"}),
    "en": MappingProxyType({"total": "Total score", "details": "Detailed evaluation", "feedback": "Overall feedback",
                            "suggestions": "Suggestions for improvement"}),
})

# Words for the total and the sections that every rubric shares; a spec adds its criteria and title words.
# The longest match over all fields wins, so "내용 정확성" is accuracy and "문법 및 표현" is one label, not "문법".
_SHARED_LABELS: dict[str, tuple[str, ...]] = {
    "total": (r"총\s*점\s*수?", r"총합(?:\s*점수)?", r"합계(?:\s*점수)?", r"(?:최종|전체|종합)\s*점수",
              r"점수\s*(?:합계|총합)", r"(?:total|overall|final)(?:\s+score)?", r"sum"),
    "title": (r"평가\s*결과", r"evaluation\s+results?"),
    "details": (r"세부\s*(?:평가|점수)(?:\s*(?:항목|내용|결과))?", r"항목별\s*(?:평가|점수)",
                r"detailed\s+(?:evaluation|scores?|breakdown|assessment)", r"(?:score|scoring)\s+breakdown",
                r"breakdown"),
    "feedback": (r"(?:전체|종합|총괄)\s*(?:피드백|평가|의견)", r"총평", r"피드백",
                 r"(?:overall|general)\s+(?:feedback|comments?|assessment)", r"feedback", r"comments?"),
    "suggestions": (r"개선\s*(?:제안|사항|방안|점|할\s*점)(?:\s*사항)?", r"개선을\s*위한\s*제안", r"제안\s*(?:사항)?",
                    r"(?:suggestions?|recommendations?)(?:\s+for\s+improvement)?", r"improvement\s+suggestions?",
                    r"areas?\s+for\s+improvement", r"how\s+to\s+improve", r"improvements?"),
}


def _written(label: str) -> str:
    """A label as written in the answer, as a pattern: its spaces may be missing or doubled; a final colon drops."""
    return r"\s*".join(re.escape(word) for word in label.rstrip(":：").split())


@dataclass(frozen=True)
class RubricSpec:
    """One rubric as data: its criteria, the title and headings of its answer and the words read as each label.

    Attributes:
        criteria: criterion key -> (maximum, Korean label, English label), in the order the answer lists them.
        titles: language (``"ko"``, ``"en"``) -> the answer's first line; the languages the rubric is written in.
        aliases: criterion key or ``"title"`` -> more regular expressions read as that label. The labels and
            titles the spec writes are always read, and the total and sections have words shared by every rubric.
        max_total: the total's maximum; the criteria's maxima add up to it.
        headings: language -> ``{"total", "details", "feedback", "suggestions"}`` -> the heading written, for every
            language of ``titles``.
        labels: built from the fields above: field name (criterion key, ``"total"``, heading name) -> the compiled
            pattern that reads its label at the start of a line.
    """

    criteria: Mapping[str, tuple[int, str, str]]
    titles: Mapping[str, str]
    aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    max_total: int = 100
    headings: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: SECTION_HEADINGS)
    # Criteria first: the longest label wins and a tie goes to the field listed first.
    labels: Mapping[str, re.Pattern[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.criteria:
            raise ValueError("RubricSpec.criteria is empty; give at least one criterion")
        for key, value in self.criteria.items():
            if key in _HEADING_NAMES:
                raise ValueError(f"RubricSpec.criteria key {key!r} is a heading name; rename the criterion")
            ok = isinstance(value, tuple) and len(value) == 3 and type(value[0]) is int and value[0] > 0
            if not ok or not all(isinstance(label, str) and label.strip() for label in value[1:]):
                raise ValueError(f"RubricSpec.criteria[{key!r}] = {value!r}; write (maximum > 0, Korean label, "
                                 "English label)")
        maxima = sum(value[0] for value in self.criteria.values())
        if maxima != self.max_total:
            raise ValueError(f"RubricSpec.criteria maxima add up to {maxima}, not max_total={self.max_total}; "
                             "fix the maxima or max_total")
        if not self.titles or not set(self.titles) <= {"ko", "en"}:
            raise ValueError(f"RubricSpec.titles has languages {sorted(self.titles)}; use 'ko' and/or 'en'")
        for lang in self.titles:
            names = self.headings.get(lang, {})
            if set(names) != set(_HEADING_NAMES[1:]):
                raise ValueError(f"RubricSpec.headings[{lang!r}] has keys {sorted(names)}; it needs exactly "
                                 f"{list(_HEADING_NAMES[1:])}")
        unknown = set(self.aliases) - {*self.criteria, "title"}
        if unknown:
            raise ValueError(f"RubricSpec.aliases has unknown keys {sorted(unknown)}; use criterion keys or 'title'")
        for name, alts in self.aliases.items():
            if isinstance(alts, str) or not all(isinstance(alt, str) and alt for alt in alts):
                raise ValueError(f"RubricSpec.aliases[{name!r}] = {alts!r}; give a tuple of non-empty patterns")
        alternatives: dict[str, list[str]] = {
            key: [*self.aliases.get(key, ()), _written(ko), _written(en)] for key, (_, ko, en) in self.criteria.items()
        }
        for name, shared in _SHARED_LABELS.items():
            alternatives[name] = [*shared, *self.aliases.get(name, ())]
        alternatives["title"] += [_written(title) for title in self.titles.values()]
        labels = {}
        for name, alts in alternatives.items():
            # A label ends where a letter or digit cannot continue it; Korean score labels may carry a particle.
            particle = r"(?:은|는|이|가)?" if name in self.score_fields else ""
            try:
                labels[name] = re.compile(rf"(?:{'|'.join(alts)}){particle}(?![^\W_])", re.IGNORECASE)
            except re.error as err:
                raise ValueError(f"RubricSpec.aliases[{name!r}] is not a valid regular expression ({err})") from err
        object.__setattr__(self, "criteria", MappingProxyType(dict(self.criteria)))
        object.__setattr__(self, "titles", MappingProxyType(dict(self.titles)))
        object.__setattr__(self, "headings", MappingProxyType({k: MappingProxyType(dict(v))
                                                               for k, v in self.headings.items()}))
        object.__setattr__(self, "aliases", MappingProxyType({k: tuple(v) for k, v in self.aliases.items()}))
        object.__setattr__(self, "labels", MappingProxyType(labels))

    @property
    def score_fields(self) -> tuple[str, ...]:
        """The fields that hold a number: the criterion keys, then ``"total"``."""
        return (*self.criteria, "total")



# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _check_score(key: str, value: Any, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"scores[{key!r}] must be a whole number, got {value!r}")
    if not 0 <= value <= maximum:
        raise ValueError(f"scores[{key!r}] = {value} is not within [0, {maximum}]")
    return int(value)


@dataclass(frozen=True)
class Slot:
    """A place in a rubric answer that the grader fills; the rest of the answer is fixed text.

    Attributes:
        kind: ``"score"`` (a whole number, then ``/max``), ``"comment"`` (a criterion's `` - comment``, or nothing),
            ``"feedback"`` or ``"suggestions"``.
        key: the criterion key or ``"total"`` for a score, the criterion key for a comment, else ``""``.
    """

    kind: str
    key: str = ""


def rubric_template(lang: str, spec: RubricSpec) -> list[str | Slot]:
    """The training format as fixed text and slots, in order; :func:`render_rubric` fills it, guided decoding
    writes the fixed text itself and lets the model write only the slots.

    Args:
        lang: ``"ko"`` or ``"en"`` labels and headings (one of ``spec.titles``).
        spec: the rubric.

    Returns:
        Strings (fixed text) and :class:`Slot` s; adjacent strings are merged.
    """
    if lang not in spec.titles:
        raise ValueError(f"lang must be one of {list(spec.titles)}, got {lang!r}")
    h = spec.headings[lang]
    parts: list[str | Slot] = [f"{spec.titles[lang]}\n\n**{h['details']}:**"]
    for key, (maximum, label_ko, label_en) in spec.criteria.items():
        parts += [f"\n- {label_ko if lang == 'ko' else label_en}: ", Slot("score", key), f"/{maximum}",
                  Slot("comment", key)]
    parts += [f"\n\n**{h['total']}: ", Slot("score", "total"), f"/{spec.max_total}**"]
    parts += [f"\n\n**{h['feedback']}:**\n", Slot("feedback"), f"\n\n**{h['suggestions']}:**\n",
              Slot("suggestions")]
    merged: list[str | Slot] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return merged


def render_rubric(
    scores: dict[str, int],
    feedback: str,
    suggestions: str,
    comments: dict[str, str],
    lang: str,
    spec: RubricSpec,
) -> str:
    """Write a rubric answer in the training format; see :func:`render_rubric_spans`, which also says where its
    scores are."""
    return render_rubric_spans(scores, feedback, suggestions, comments, lang, spec)[0]


def render_rubric_spans(
    scores: dict[str, int],
    feedback: str,
    suggestions: str,
    comments: dict[str, str],
    lang: str,
    spec: RubricSpec,
) -> tuple[str, list[tuple[int, int]]]:
    """Write a rubric answer in the training format (:func:`rubric_template`); the total is the sum of the scores.

    Args:
        scores: criterion key -> whole-number score within [0, max], for every criterion of ``spec``.
        feedback: the overall feedback paragraph.
        suggestions: the suggestions, written as given (usually ``- `` bullets, one per line).
        comments: criterion key -> one-sentence comment written after the score; a missing or empty one leaves
            the line without `` - comment``; line breaks become spaces.
        lang: ``"ko"`` or ``"en"`` labels and headings (one of ``spec.titles``).
        spec: the rubric.

    Returns:
        The answer text, without a trailing newline, and the ``(start, end)`` character span of each score in it
        (the criteria in the spec's order, then the total).

    Raises:
        ValueError: a criterion is missing or unknown, or a score is not a whole number within its range.
    """
    template = rubric_template(lang, spec)
    keys = list(spec.criteria)
    if set(scores) != set(keys) or not set(comments) <= set(keys):
        raise ValueError(f"scores must have exactly the keys {keys} (comments some of them), got {sorted(scores)} "
                         f"and {sorted(comments)}")
    values = {key: _check_score(key, scores[key], spec.criteria[key][0]) for key in keys}
    values["total"] = sum(values.values())
    out: list[str] = []
    spans, length = [], 0
    for part in template:
        if isinstance(part, str):
            out.append(part)
        elif part.kind == "score":
            out.append(str(values[part.key]))
            spans.append((length, length + len(out[-1])))
        elif part.kind == "comment":
            comment = " ".join((comments.get(part.key) or "").split())
            out.append(f" - {comment}" if comment else "")
        else:
            out.append((feedback if part.kind == "feedback" else suggestions).strip())
        length += len(out[-1])
    return "".join(out), spans

