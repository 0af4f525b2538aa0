"""Read rubric answers: a total, one score per criterion, overall feedback and suggestions.

:func:`parse_rubric` reads the format that :func:`~gemma_lowmem.evaluation.rubric.render_rubric` writes for a
:class:`~gemma_lowmem.evaluation.rubric.RubricSpec` (Korean or English), and what models write instead: bold or
plain labels, ``점``/``points`` units, full-width digits, decimals, missing or parenthesised maximums, ``N out of
M``, ``30점 만점에 24점``, a score on the line after its label, numbered lists, Markdown tables, JSON (also fenced or
cut off), chatter around the answer, synonyms of the labels and criteria in any order. It never raises.

Decisions the parser makes (and the tests pin):

- The first evaluation counts: a second one starts where a field already read (a criterion, the total, a section
  header) appears again, and everything from there on is ignored.
- ``valid`` needs the total written in the text. A missing total is computed from the criteria's scores
  (``total_computed=True``) so callers may still use it, but the answer is not valid.
- Numbers are kept as written, even out of range (``45/40``, ``-3``, ``1e9``); they make the result invalid.
  ``N/M`` with ``M`` other than the criterion's maximum keeps ``N`` and makes the result invalid.
- A missing feedback or suggestions section is listed in ``problems`` but does not make the numbers invalid.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from gemma_lowmem.evaluation.rubric import RubricSpec


@dataclass
class RubricResult:
    """What :func:`parse_rubric` read from one answer; ``scores`` and ``comments`` have the spec's criterion keys.

    Attributes:
        total: the total as written, or computed from the criteria's scores when missing (see ``total_computed``).
        scores: criterion key -> score as written (``None`` when missing).
        comments: criterion key -> the comment written after the score on its line (``None`` when absent).
        feedback: the overall feedback text.
        suggestions: the improvement suggestions text (bullets kept as written).
        valid: every criterion's score present and within [0, max] out of the right maximum, and the total
            written, within [0, max_total] and within 1 point of the scores' sum.
        total_computed: the total was missing and was computed from the criteria's scores.
        problems: what was missing or inconsistent, in English.
    """

    total: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    comments: dict[str, str | None] = field(default_factory=dict)
    feedback: str | None = None
    suggestions: str | None = None
    valid: bool = False
    total_computed: bool = False
    problems: list[str] = field(default_factory=list)


def _empty_result(spec: RubricSpec, problems: list[str] | None = None) -> RubricResult:
    return RubricResult(scores=dict.fromkeys(spec.criteria), comments=dict.fromkeys(spec.criteria),
                        problems=problems or [])


# ---------------------------------------------------------------------------------------------------------------
# Parsing: numbers

# Full-width digits and punctuation, and the Unicode minus, to ASCII; one character to one, so offsets hold.
FULLWIDTH = str.maketrans("０１２３４５６７８９／：．－（）｜＝−", "0123456789/:.-()|=-")

_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_UNIT = r"\s*(?:점|(?:points?|pts?|pt)(?![a-z]))\.?"
_NUM_END = r"(?![^\W_]|\.\d)"  # a bare number ends here: not cut from a longer one, not part of a word ("3개")
_MAX_KEYWORDS = r"(?:max(?:imum)?|최대|만점|배점|out\s+of|총)"
# "24", "24점", "24/30", "24 / 30점", "24 out of 30", "24 (30점 만점)"; never "100점 만점" alone (a maximum).
_SCORE_RE = re.compile(
    rf"(?P<n>{_NUM})(?:{_UNIT}|{_NUM_END})"
    rf"(?:\s*(?:/|out\s+of|of)\s*(?P<m>{_NUM})(?:{_UNIT}|{_NUM_END})"
    rf"|\s*\(\s*{_MAX_KEYWORDS}?\s*:?\s*(?P<m2>{_NUM})(?:{_UNIT})?\s*(?:만점)?\s*\))?"
    rf"(?!\s*(?:만점|max))",
    re.IGNORECASE,
)
# "30점 만점에 24점": the maximum first.
_MAX_FIRST_RE = re.compile(
    rf"(?P<m>{_NUM})(?:{_UNIT})?\s*만점\s*(?:에서|에|중)?\s*,?\s*(?P<n>{_NUM})(?:{_UNIT}|{_NUM_END})"
)
_SLASH_RE = re.compile(rf"(?P<n>{_NUM})(?:{_UNIT})?\s*/\s*(?P<m>{_NUM})(?:{_UNIT}|{_NUM_END})", re.IGNORECASE)
_PAREN_RE = re.compile(r"\s*[(\[]([^()\[\]]*)[)\]]")
_SEP_RE = re.compile(r"(?:[\s\"'“”‘’:=|{]|[-–—](?=\s)|->|→|\b(?:is|was)\b)*", re.IGNORECASE)
_EXPLICIT_SEP_RE = re.compile(r"[:=|\-–—→]|\b(?:is|was)\b", re.IGNORECASE)
# Label words (of any rubric) that also start ordinary sentences; they need an explicit separator before a number.
_WEAK_LABELS = {"overall", "total", "final", "sum", "content", "expression", "language", "fluency", "style",
                "structure", "support", "reasoning", "coherence"}
_SCORE_WORD_RE = re.compile(r"[\"']?(?:score|점수|득점|value)[\"']?\s*[:=]?\s*", re.IGNORECASE)
_COMMENT_LEAD = " \t-–—:|,.;)]}\"'"  # separators between a score and its comment
_COMMENT_TAIL = " \t|,\"'"  # table pipes, JSON commas and quotes; a sentence keeps its full stop

# ---------------------------------------------------------------------------------------------------------------
# Parsing: lines

_LEAD_RE = re.compile(r"(?:#+\s*|>\s*|[-•·◦▪●○+]\s+|\(?\d{1,2}[.)](?=\s|[^\d\s.])\s*|[①-⑳]\s*|[\"'`“‘「『]+)")
_HR_RE = re.compile(r"[-*_=]{3,}")
_TABLE_SEP_CELL_RE = re.compile(r":?-+:?|")
_COL_SCORE_RE = re.compile(r"점수|득점|score|points?|평가\s*점수", re.IGNORECASE)
_COL_MAX_RE = re.compile(r"배점|만점|최대|max|out\s+of|weight", re.IGNORECASE)
_COL_COMMENT_RE = re.compile(
    r"코멘트|comment|이유|근거|의견|설명|피드백|feedback|reason|justification|notes?|비고|평가\s*내용", re.IGNORECASE
)


@dataclass
class _Event:
    """One structural line: a score, a label waiting for its score, a weak score or a section header."""

    line: int
    field: str
    kind: str  # "score" | "weak" (a bare "(40점)" that may be a maximum) | "label" | "header"
    value: float | None = None
    written_max: float | None = None
    comment: str | None = None
    inline: str | None = None


def strip_markdown(line: str) -> str:
    """Drop Markdown decoration: bold stars, heading marks, bullets, numbering, opening quotes."""
    line = line.replace("*", "").strip()
    while True:
        m = _LEAD_RE.match(line)
        if not m or not m.group(0):
            return line
        line = line[m.end():].lstrip()


def _match_label(text: str, spec: RubricSpec, fields: tuple[str, ...] | None = None) -> tuple[str, int] | None:
    """The longest label of ``spec`` at the start of ``text``: (field, end offset)."""
    best: tuple[str, int] | None = None
    for name, regex in spec.labels.items():
        if fields is not None and name not in fields:
            continue
        m = regex.match(text)
        if m and (best is None or m.end() > best[1]):
            best = (name, m.end())
    return best


def _maximum(spec: RubricSpec, name: str) -> int:
    """The maximum of a score field: a criterion's, or the total's."""
    return spec.max_total if name == "total" else spec.criteria[name][0]


def _comment(text: str) -> str | None:
    text = text.lstrip(_COMMENT_LEAD).rstrip(_COMMENT_TAIL)
    return text or None


def score_at(rest: str) -> tuple[float, float | None, int] | None:
    """A score at the start of ``rest``: (value, written maximum, end offset)."""
    m = _MAX_FIRST_RE.match(rest)
    if m:
        return float(m.group("n")), float(m.group("m")), m.end()
    m = _SCORE_RE.match(rest)
    if m:
        written = m.group("m") or m.group("m2")
        return float(m.group("n")), float(written) if written else None, m.end()
    return None


def _parse_after_label(
    line_no: int, name: str, maximum: float, rest_norm: str, rest_raw: str, weak: bool = False
) -> list[_Event]:
    """Read what follows a score field's label on its line (``maximum``: the field's); a ``weak`` label needs a
    separator before its number."""
    paren_score: tuple[float, float] | None = None
    paren_max: float | None = None
    paren_keyword = False
    pos = 0
    while m := _PAREN_RE.match(rest_norm, pos):
        inner = m.group(1)
        slash = _SLASH_RE.search(inner)
        number = re.search(_NUM, inner)
        if slash and paren_score is None:
            paren_score = (float(slash.group("n")), float(slash.group("m")))
        elif number and "%" not in inner and paren_max is None:  # "(30%)" is a weight, not a maximum
            paren_max = float(number.group(0))
            paren_keyword = re.search(_MAX_KEYWORDS, inner, re.IGNORECASE) is not None
        pos = m.end()
    sep_start, pos = pos, _SEP_RE.match(rest_norm, pos).end()
    # "Overall 3 facts are missing" is prose; "Overall: 78", "Content 32/40" and a lone "Total" heading are labels.
    prose_like = weak and not (paren_max or paren_score or _EXPLICIT_SEP_RE.search(rest_norm[sep_start:pos]))
    if m := _SCORE_WORD_RE.match(rest_norm, pos):  # "정확성 점수: 24", {"score": 24}
        pos = _SEP_RE.match(rest_norm, m.end()).end()
    found = score_at(rest_norm[pos:])
    if prose_like and (found is None or found[1] is None):
        return [_Event(line_no, name, "label")] if not rest_norm[pos:].strip() else []
    if found:
        value, written, end = found
        return [_Event(line_no, name, "score", value, written if written is not None else paren_max,
                       _comment(rest_raw[pos + end:]))]
    if paren_score:
        return [_Event(line_no, name, "score", paren_score[0], paren_score[1], _comment(rest_raw[pos:]))]
    slash = _SLASH_RE.search(rest_norm, pos)  # "정확성: 사실 오류 없음 (24/30)"
    if slash:
        comment = _comment(rest_raw[pos:slash.start()] + " " + rest_raw[slash.end():])
        return [_Event(line_no, name, "score", float(slash.group("n")), float(slash.group("m")), comment)]
    events = []
    if not rest_norm[pos:].strip():
        events.append(_Event(line_no, name, "label", written_max=paren_max))  # the score may be on the next line
    if paren_max is not None and not paren_keyword:
        # "핵심 내용 포함도 (40점)": a rubric echo when it equals the maximum, else the score itself.
        kind = "weak" if paren_max == maximum else "score"
        events.append(_Event(line_no, name, kind, paren_max, None, _comment(rest_raw[pos:])))
    return events


def _table_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _parse_table_row(
    line_no: int, raw_cells: list[str], roles: dict[str, int], columns: dict[int, str], spec: RubricSpec
) -> list[_Event]:
    """Read one Markdown table row; ``roles`` and ``columns`` come from the header row."""
    cells = [strip_markdown(c) for c in raw_cells]
    norm = [c.translate(FULLWIDTH) for c in cells]
    if columns:  # transposed table: labels in the header, scores in the row
        events = []
        for i, name in columns.items():
            if i < len(norm) and (found := score_at(norm[i])):
                events.append(_Event(line_no, name, "score", found[0], found[1]))
        return events
    label = _match_label(norm[0], spec, spec.score_fields) if norm else None
    if label is None:
        return []
    name, end = label
    if "score" in roles:
        i = roles["score"]
        found = score_at(norm[i].strip()) if i < len(norm) else None
        if found is None:
            return []
        value, written, _ = found
        if written is None and "max" in roles and roles["max"] < len(norm):
            m = re.search(_NUM, norm[roles["max"]])
            written = float(m.group(0)) if m else None
        comment = None
        if "comment" in roles and roles["comment"] < len(cells):
            comment = _comment(cells[roles["comment"]])
        return [_Event(line_no, name, "score", value, written, comment)]
    # No header: the label cell, then the score cell ("24", "24/30"), an optional maximum cell, then a comment.
    events = _parse_after_label(line_no, name, _maximum(spec, name), norm[0][end:], cells[0][end:])
    if any(e.kind == "score" for e in events):
        return events
    for i in range(1, len(norm)):
        found = score_at(norm[i].strip())
        if found is None:
            continue
        value, written, _ = found
        rest = list(range(i + 1, len(norm)))
        if written is None and rest and (nxt := score_at(norm[rest[0]].strip())) is not None:
            written = nxt[0]
            rest = rest[1:]
        comment = next((_comment(cells[j]) for j in rest if _comment(cells[j])), None)
        return [_Event(line_no, name, "score", value, written, comment)]
    return events


def _table_header(cells: list[str], spec: RubricSpec) -> tuple[dict[str, int], dict[int, str]] | None:
    """Column roles (score / max / comment -> index) or criterion columns (index -> field) of a header row.

    Returns None when the row is not a header: it holds a digit, or it is a criterion row without numbers.
    """
    if any(re.search(r"\d", c) for c in cells):
        return None
    columns = {}
    for j, c in enumerate(cells):
        label = _match_label(c, spec, spec.score_fields)
        if label and not c[label[1]:].strip(" :"):
            columns[j] = label[0]
    if len(columns) >= 2:  # transposed: one column per criterion
        return {}, columns
    roles: dict[str, int] = {}
    for j, c in enumerate(cells[1:], start=1):
        for role, regex in (("comment", _COL_COMMENT_RE), ("max", _COL_MAX_RE), ("score", _COL_SCORE_RE)):
            if role not in roles and regex.search(c):
                roles[role] = j
                break
    if roles or not _match_label(cells[0], spec):
        return roles, {}
    return None


def _scan_lines(raw_lines: list[str], spec: RubricSpec) -> list[_Event]:
    """Turn lines into events, in order."""
    events: list[_Event] = []
    pending: str | None = None  # a score label whose number may come on a later line
    table_roles: dict[str, int] = {}
    table_columns: dict[int, str] = {}
    for i, raw in enumerate(raw_lines):
        stripped = raw.strip()
        if not stripped:
            continue
        if stripped.startswith("|") or stripped.count("|") >= 2:
            cells = _table_cells(stripped)
            if all(_TABLE_SEP_CELL_RE.fullmatch(c) for c in cells):
                continue
            header = _table_header([strip_markdown(c).translate(FULLWIDTH) for c in cells], spec)
            if header is not None:
                table_roles, table_columns = header
                continue
            row = _parse_table_row(i, cells, table_roles, table_columns, spec)
            if row:
                events += row
                pending = None
                continue
        else:
            table_roles, table_columns = {}, {}
        cleaned = strip_markdown(raw)
        norm = cleaned.translate(FULLWIDTH)
        label = _match_label(norm, spec)
        if label is not None:
            name, end = label
            if name in spec.score_fields:
                weak = norm[:end].strip().lower() in _WEAK_LABELS
                found = _parse_after_label(i, name, _maximum(spec, name), norm[end:], cleaned[end:], weak)
                if found:
                    events += found
                    pending = name if any(e.kind == "label" for e in found) else None
                    continue
            else:
                m = re.match(r"\s*(?:[:：]|[-–—]\s)\s*(.*)$|\s*:?\s*$", norm[end:])
                if m:
                    inline = cleaned[end:][m.start(1):].strip() if m.group(1) else None
                    events.append(_Event(i, name, "header", inline=inline or None))
                    pending = None
                    continue
        if pending is not None:  # "점수: 24/30" under a criterion heading
            word = _SCORE_WORD_RE.match(norm)
            pos = _SEP_RE.match(norm, word.end() if word else 0).end()
            found_value = score_at(norm[pos:])
            if found_value:
                value, written, end = found_value
                events.append(_Event(i, pending, "score", value, written, _comment(cleaned[pos + end:])))
                pending = None
    return events


def _first_block(events: list[_Event], n_lines: int) -> tuple[dict[str, _Event], int]:
    """The events of the first evaluation and the line where a second one begins (``n_lines`` if none)."""
    chosen: dict[str, _Event] = {}
    weak: dict[str, _Event] = {}
    has_score = False
    end = n_lines
    for ev in events:
        if ev.kind == "label":
            continue
        if ev.kind == "weak":
            weak.setdefault(ev.field, ev)
            continue
        if ev.field in chosen:
            if has_score:
                end = ev.line
                break
            continue
        chosen[ev.field] = ev
        has_score = has_score or ev.kind == "score"
    for name, ev in weak.items():
        if name not in chosen and ev.line < end:
            chosen[name] = ev
    return chosen, end


def _back_over_intro(raw_lines: list[str], end: int) -> int:
    """Move a block end up over the line that introduces the next evaluation: "수정된 평가:" after a blank line,
    right above the next evaluation or with blank lines between."""
    i = end - 1
    while i >= 0 and not raw_lines[i].strip():
        i -= 1
    if i >= 0 and raw_lines[i].replace("*", "").rstrip().endswith((":", "：")) and (
        i == 0 or not raw_lines[i - 1].strip()
    ):
        return i
    return end


def _section(events: list[_Event], header: _Event, raw_lines: list[str], end: int) -> str | None:
    """A section's text: the header's inline text, then the raw lines up to the next structural line."""
    stop = min([e.line for e in events if e.line > header.line] + [end])
    lines = [header.inline] if header.inline else []
    lines += [ln.rstrip() for ln in raw_lines[header.line + 1:stop] if not _HR_RE.fullmatch(ln.strip())
              and not ln.strip().startswith("```")]
    text = "\n".join(lines).strip()
    return text or None


# ---------------------------------------------------------------------------------------------------------------
# Parsing: JSON

_NAME_KEYS = ("criterion", "criteria", "name", "항목", "기준", "평가 항목", "category", "aspect", "item")
_SCORE_KEYS = ("score", "점수", "득점", "value", "points")
_MAX_KEYS = ("max", "max score", "max_score", "maximum", "만점", "배점", "out of", "out_of", "최대")
_COMMENT_KEYS = ("comment", "코멘트", "reason", "이유", "근거", "설명", "explanation", "justification", "feedback",
                 "평가", "note")


def _json_key(key: Any, spec: RubricSpec) -> str | None:
    if not isinstance(key, str):
        return None
    text = key.replace("_", " ").strip().translate(FULLWIDTH)
    label = _match_label(text, spec)
    if label is None:
        return None
    name, end = label
    if re.fullmatch(r"\s*(?:score|점수)?\s*", text[end:], re.IGNORECASE):
        return name
    return None


def _json_number(value: Any) -> tuple[float, float | None] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # JSON integers are unbounded; past float's range they are just absurd
        return (float(value) if abs(value) < 2**1023 else (math.inf if value > 0 else -math.inf)), None
    if isinstance(value, float):
        return value, None
    if isinstance(value, str):
        text = value.strip().translate(FULLWIDTH)
        found = score_at(text)
        if found:
            return found[0], found[1]
    return None


def _pick(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    lowered = {k.strip().lower(): v for k, v in obj.items() if isinstance(k, str)}
    return next((lowered[k] for k in keys if k in lowered), None)


def _json_text(value: Any, bullets: bool) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        items = [str(v).strip() for v in value if str(v).strip()]
        if bullets:
            items = [s if s.startswith(("-", "*", "•")) else f"- {s}" for s in items]
        return "\n".join(items) or None
    return None


def _json_score(name: str, value: Any) -> _Event | None:
    if isinstance(value, dict):
        number = _json_number(_pick(value, _SCORE_KEYS))
        if number is None:
            return None
        written = number[1]
        if written is None and (maximum := _json_number(_pick(value, _MAX_KEYS))) is not None:
            written = maximum[0]
        comment = _pick(value, _COMMENT_KEYS)
        return _Event(0, name, "score", number[0], written, _comment(comment) if isinstance(comment, str) else None)
    number = _json_number(value)
    return None if number is None else _Event(0, name, "score", number[0], number[1])


def _walk_json(obj: Any, found: dict[str, Any], spec: RubricSpec, depth: int = 0) -> None:
    """Collect scores and texts from a parsed JSON answer; the first occurrence of each field wins."""
    if depth > 8:
        return
    if isinstance(obj, list):
        for item in obj:
            _walk_json(item, found, spec, depth + 1)
        return
    if not isinstance(obj, dict):
        return
    name_value = _pick(obj, _NAME_KEYS)
    record = _json_key(name_value, spec) if isinstance(name_value, str) else None
    if record in spec.score_fields and record not in found:  # {"criterion": "정확성", "score": 24, ...}
        if (ev := _json_score(record, obj)) is not None:
            found[record] = ev
            return
    for key, value in obj.items():
        name = _json_key(key, spec)
        if name in spec.score_fields:
            if name not in found and (ev := _json_score(name, value)) is not None:
                found[name] = ev
                continue
        elif name in ("feedback", "suggestions"):
            if name not in found and (text := _json_text(value, bullets=name == "suggestions")) is not None:
                found[name] = text
                continue
        if isinstance(value, (dict, list)):
            _walk_json(value, found, spec, depth + 1)


def _close_json(text: str) -> str:
    """Close a JSON object cut off mid-way: end an open string, drop a dangling key or comma, close brackets."""
    stack: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    if in_string:
        text += '"'
    text = re.sub(r'(?:,\s*"[^"]*"\s*:?\s*|,|:)\s*$', "", text.rstrip())
    if text.rstrip().endswith(":"):
        text = text.rstrip()[:-1]
    return text + "".join(reversed(stack))


def _parse_json(text: str, spec: RubricSpec) -> tuple[int, dict[str, Any]] | None:
    """The first JSON value in ``text`` that holds a score (fenced or not, complete or cut off): (offset, fields).

    Only the first 20 ``{``/``[`` are tried, so chatter such as "[24/30]" or "{coverage}" before the JSON is skipped
    without making a long answer slow.
    """
    decoder = json.JSONDecoder()
    for match in itertools.islice(re.finditer(r"[{\[]", text), 20):
        start = match.start()
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            body = text[start:]
            body = body[: body.find("```")] if "```" in body else body
            try:
                obj = json.loads(_close_json(body))
            except (ValueError, RecursionError):
                continue
        found: dict[str, Any] = {}
        _walk_json(obj, found, spec)
        if any(name in found for name in spec.score_fields):
            return start, found
    return None


# ---------------------------------------------------------------------------------------------------------------
# Parsing: checks


def _finish(
    result: RubricResult, total_max: float | None, written_max: dict[str, float | None], spec: RubricSpec
) -> RubricResult:
    """Fill ``valid``, ``total_computed`` and ``problems`` from the numbers read."""
    numeric: list[str] = []
    for key, (maximum, _, _) in spec.criteria.items():
        value = result.scores[key]
        if value is None:
            numeric.append(f"missing score for {key}")
            continue
        if written_max[key] is not None and written_max[key] != maximum:
            numeric.append(f"{key} written out of {written_max[key]:g}; its maximum is {maximum}")
        if not 0 <= value <= maximum:  # also catches NaN
            numeric.append(f"{key} score {value:g} is outside [0, {maximum}]")
    present = [v for v in result.scores.values() if v is not None]
    all_present = len(present) == len(spec.criteria) and all(math.isfinite(v) for v in present)
    max_total = spec.max_total
    if result.total is None:
        if all_present:
            result.total = float(sum(present))
            result.total_computed = True
            numeric.append(f"missing total; computed {result.total:g} from the {len(present)} scores")
        else:
            numeric.append("missing total")
    else:
        if total_max is not None and total_max != max_total:
            numeric.append(f"total written out of {total_max:g}; the maximum is {max_total}")
        if not 0 <= result.total <= max_total:
            numeric.append(f"total {result.total:g} is outside [0, {max_total}]")
        if all_present and not abs(result.total - sum(present)) <= 1:
            numeric.append(f"total {result.total:g} differs from the sum of the scores {sum(present):g}")
    result.valid = not numeric
    result.problems = numeric
    if result.feedback is None:
        result.problems.append("missing overall feedback")
    if result.suggestions is None:
        result.problems.append("missing suggestions")
    return result


def _parse(text: str, spec: RubricSpec) -> RubricResult:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    raw_lines = text.split("\n")
    events = _scan_lines(raw_lines, spec)
    line_starts = [0]
    for ln in raw_lines[:-1]:
        line_starts.append(line_starts[-1] + len(ln) + 1)
    first_score_offset = min((line_starts[e.line] for e in events if e.kind == "score"), default=len(text) + 1)
    parsed_json = _parse_json(text, spec)
    result = _empty_result(spec)
    written_max: dict[str, float | None] = dict.fromkeys(spec.criteria)
    total_max = None
    if parsed_json is not None and parsed_json[0] <= first_score_offset:
        found = parsed_json[1]
        scored = {name: ev for name, ev in found.items() if name in spec.score_fields}
        result.feedback = found.get("feedback")
        result.suggestions = found.get("suggestions")
    else:
        chosen, end = _first_block(events, len(raw_lines))
        if end < len(raw_lines):
            end = _back_over_intro(raw_lines, end)
        scored = {name: ev for name, ev in chosen.items() if name in spec.score_fields}
        for name in ("feedback", "suggestions"):
            if name in chosen:
                setattr(result, name, _section(events, chosen[name], raw_lines, end))
    for name, ev in scored.items():
        if name == "total":
            result.total, total_max = ev.value, ev.written_max
        else:
            result.scores[name], written_max[name], result.comments[name] = ev.value, ev.written_max, ev.comment
    return _finish(result, total_max, written_max, spec)


def parse_rubric(text: str, spec: RubricSpec) -> RubricResult:
    """Read a rubric answer; never raises.

    Args:
        text: the model's answer (any value: a non-string gives an invalid result).
        spec: the rubric the answer follows; it names the criteria, their maxima and the words read as labels.

    Returns:
        The scores (keyed by ``spec``'s criteria), total, texts, validity and problems; see :class:`RubricResult`
        and the module docstring.
    """
    if not isinstance(text, str):
        return _empty_result(spec, [f"input is not a string (got {type(text).__name__})"])
    try:
        return _parse(text, spec)
    except Exception as err:  # the contract is "never raises"; tests assert this branch is never taken
        return _empty_result(spec, [f"internal parser error: {type(err).__name__}: {err}"])
