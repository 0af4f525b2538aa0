"""Task 2, news topic classification: name an article's topic (``topic``) or grade a student's choice (``topic_grade``).

Two task values, one per mode: :data:`TOPIC` and :data:`TOPIC_GRADE`.

- ``topic`` (classify): (system) the four topics; (user) the article; (assistant) the topic name alone, in the
  prompt language: 세계 / 스포츠 / 경제 / 과학/기술, or World / Sports / Business / Sci/Tech.
- ``topic_grade`` (grade): (user) the article, a student's chosen topic and a one-sentence reason; (assistant) three
  lines: the verdict (정답/오답, correct/incorrect), the correct topic, and an explanation that cites the article's
  topic words. Students' answers are made deterministically: in each block of two rows one answer is right and one
  is wrong (a seeded order); a wrong answer is a seeded pick among the three other topics; the reason cites a word of
  the chosen topic's word list found in the article (a plausible confusion), else a generic reason for that topic.

Data: AG News (hub ``fancyzhx/ag_news``: train / test), a local JSONL/CSV/Parquet file with ``label`` (0 World,
1 Sports, 2 Business, 3 Sci/Tech, or a label name in either language; a file whose numeric labels include 4 and
no 0 is read as the original 1-based AG News CSV and shifted) and ``text`` or ``title`` + ``description``, or the
bundled demo set. AG News' HTML debris (``#39;``, ``quot;``, ``&lt;...&gt;`` tags, backslashes) is cleaned. When
``max_*_samples`` cut, the rows are drawn round-robin over the labels (balanced).
"""

from __future__ import annotations

import hashlib
import html
import logging
import random
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.evaluation.metrics import classification_metrics
from gemma_lowmem.tasks import Task
from gemma_lowmem.tasks.sources import BadRow, HubSet, LoadedRows, MissingField, Row, load_rows
from gemma_lowmem.tasks.topic_answers import parse_grade, parse_topic
from gemma_lowmem.text import cut_at_sentence_end

log = logging.getLogger(__name__)

LABELS_EN = ("World", "Sports", "Business", "Sci/Tech")
LABELS_KO = ("세계", "스포츠", "경제", "과학/기술")
HUB = HubSet("fancyzhx/ag_news", None, "train", "test", sliced=False)  # 120k short rows: load, then balance
DEMO_FILE = Path(__file__).parents[1] / "data" / "demo" / "topic_demo.jsonl"
FIELDS = ("id", "idx", "text", "title", "description", "label", "label_name", "topic")  # what --columns may map


def label_name(label: int, lang: str) -> str:
    """The topic's name in ``lang`` (``"ko"`` or ``"en"``)."""
    return (LABELS_KO if lang == "ko" else LABELS_EN)[label]


# ------------------------------------------------------------------------------------------------------ loading

# AG News lost the "&" of its HTML entities to a space ("country #39;s", "said  quot;no"): the space goes too.
_ENTITY = re.compile(r"(?:&|\s|^)(#\d+|quot|amp|lt|gt|hellip|nbsp);")


def _entity(m: re.Match) -> str:
    name = m.group(1)
    if name.startswith("#"):
        code = int(name[1:])
        # AG News keeps Windows-1252 codes (#151; is an em dash, #36; a dollar sign).
        return bytes([code]).decode("cp1252", "ignore") if 128 <= code < 160 else chr(code)
    return html.unescape(f"&{name};")


def clean_news_text(text: str) -> str:
    """Undo AG News' HTML debris: entities whose ``&`` became a space, tags, backslashes; spaces collapsed.

    Args:
        text: a title or description.

    Returns:
        The cleaned text.
    """
    text = _ENTITY.sub(_entity, text)
    text = re.sub(r"<[^<>]*>", " ", text)  # links and ticker tags such as <TXN.N>
    text = text.replace("\\", " ")
    return " ".join(text.split())


def _row_label(row: Row) -> int:
    for key in ("label", "label_name", "topic"):
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, bool):
            raise BadRow(f"field '{key}' is {value!r}; use 0 World, 1 Sports, 2 Business, 3 Sci/Tech")
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
            number = float(value)
            if number.is_integer() and 0 <= number <= 3:
                return int(number)
            raise BadRow(f"field '{key}' is {value!r}; use 0 World, 1 Sports, 2 Business, 3 Sci/Tech")
        label = parse_topic(value)
        if label is None:
            raise BadRow(f"field '{key}' is {value!r}, not a topic; use 0-3 or World, Sports, Business, Sci/Tech")
        return label
    raise MissingField("label", f"missing field 'label' (0 World, 1 Sports, 2 Business, 3 Sci/Tech, or a label "
                                f"name) (fields present: {', '.join(row) or 'none'})")


def _row_text(row: Row) -> str:
    text = row.get("text")
    if isinstance(text, str) and text.strip():
        return clean_news_text(text)
    title, description = row.get("title"), row.get("description")
    parts = [clean_news_text(p) for p in (title, description) if isinstance(p, str) and p.strip()]
    if not parts:
        raise MissingField("text", "missing text: give 'text', or 'title' and 'description' "
                                   f"(fields present: {', '.join(row) or 'none'})")
    return "\n".join(parts)


def _shift_one_based(path: Path, rows: list[Any]) -> list[Any]:
    """Rows of the original AG News CSV number the labels 1-4: shift them to 0-3 (and say so)."""
    values = [r.get("label") for r in rows if isinstance(r, dict)]
    numbers = {int(v) for v in values if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())}
    if 4 in numbers and numbers <= {1, 2, 3, 4}:
        log.warning("%s: labels are 1-4 (the original AG News CSV); reading them as 0-3", path)
        return [{**r, "label": int(r["label"]) - 1} if isinstance(r, dict) and str(r.get("label")).strip().isdigit()
                else r for r in rows]
    return rows


def load_data(cfg: DataConfig) -> LoadedRows:
    """Training and validation rows ``{"id", "text", "label"}`` (sources in the module docstring).

    Args:
        cfg: the data configuration.

    Returns:
        The rows (``text`` cut to ``max_article_length`` at a sentence end) and what was skipped.
    """
    def normalise(row: Row) -> Row:
        if not isinstance(row, dict):
            raise BadRow(f"expected an object with fields, got {type(row).__name__}")
        label, text = _row_label(row), cut_at_sentence_end(_row_text(row), cfg.max_article_length)
        row_id = row.get("id", row.get("idx"))
        if row_id in (None, ""):
            row_id = "topic-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        return {"id": str(row_id), "text": text, "label": label}

    data = load_rows(cfg, normalise, fields=FIELDS, demo_file=DEMO_FILE, hub=HUB, demo_val_fraction=0.25, group="label",
                     balance="label", prepare=_shift_one_based)
    log.info("%s: %d training rows, %d validation rows", data.source, len(data.train), len(data.val))
    return data


# ------------------------------------------------------------------------------------------------------ prompts

_KEYWORDS = {  # topic words, for students' reasons and the grader's explanation (whole words, lowercase)
    0: ("president", "prime minister", "minister", "government", "election", "troops", "military", "war", "rebels",
        "militants", "iraq", "iraqi", "palestinian", "israeli", "united nations", "diplomats", "parliament",
        "embassy", "ceasefire", "refugees", "대통령", "총리", "정부", "선거", "병력", "전쟁", "외교", "유엔", "휴전",
        "난민", "의회", "장관"),
    1: ("game", "season", "team", "coach", "players", "victory", "championship", "cup", "tournament", "league",
        "olympic", "olympics", "medal", "goals", "quarterback", "inning", "nba", "nfl", "baseball", "football",
        "soccer", "tennis", "golf", "playoff", "선수", "시즌", "감독", "우승", "리그", "대회", "올림픽", "메달",
        "결승", "경기장"),
    2: ("company", "shares", "stock", "stocks", "profit", "profits", "earnings", "revenue", "investors", "economy",
        "oil prices", "sales", "merger", "acquisition", "ceo", "inflation", "interest rates", "retailer", "bank",
        "기업", "주가", "주식", "매출", "영업이익", "투자", "금리", "수출", "인수", "합병", "소비자"),
    3: ("software", "internet", "computer", "computers", "microsoft", "google", "technology", "scientists",
        "researchers", "space", "nasa", "web", "online", "mobile", "chip", "chips", "wireless", "linux", "virus",
        "spam", "network", "digital", "satellite", "planet", "species", "broadband", "연구진", "연구팀", "과학자",
        "소프트웨어", "인터넷", "반도체", "스마트폰", "인공지능", "우주", "위성", "데이터", "컴퓨터"),
}
_ABOUT = {  # what each topic is about: (English, Korean)
    0: ("events between countries and politics", "나라 사이의 일이나 정치"),
    1: ("games, teams and athletes", "경기와 팀, 선수"),
    2: ("companies, markets and the economy", "기업과 시장, 경제"),
    3: ("scientific research and technology", "과학 연구와 기술"),
}


def topic_words(text: str, label: int, limit: int = 2) -> list[str]:
    """Up to ``limit`` words of the topic's word list found in ``text``, in the order they appear.

    Args:
        text: the article.
        label: the topic.
        limit: how many to return.

    Returns:
        The words as written in the article.
    """
    hits = []
    for word in _KEYWORDS[label]:
        pattern = re.escape(word) if re.match(r"[가-힣]", word) else rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])"
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            hits.append((m.start(), m.group(0)))
    return [w for _, w in sorted(hits)][:limit]


def _has_final_consonant(word: str) -> bool:
    last = word.rstrip()[-1:]
    return "가" <= last <= "힣" and (ord(last) - 0xAC00) % 28 != 0


def _obj(word: str) -> str:
    """``word`` with the Korean object particle: 경제를, 과학/기술을."""
    return word + ("을" if _has_final_consonant(word) else "를")


def system_prompt(mode: str, lang: str = "ko") -> str:
    """The instructions for classifying (``mode="classify"``) or grading a student's choice (``"grade"``)."""
    names = ", ".join(LABELS_KO if lang == "ko" else LABELS_EN)
    if mode == "classify":
        if lang == "ko":
            return (f"당신은 뉴스 기사의 주제를 분류하는 교사입니다. 기사를 읽고 다음 네 주제 중 하나를 "
                    f"고르세요: {names}. 주제 이름만 답하세요.")
        return f"You are a teacher who classifies news articles by topic. Read the article and choose one of four " \
               f"topics: {names}. Answer with the topic name only."
    if lang == "ko":
        return (f"당신은 학생이 뉴스 기사의 주제를 고른 답안을 채점하는 교사입니다. 주제는 {names} 네 가지입니다. "
                "학생이 고른 주제가 맞는지 판정하고, 올바른 주제와 그 이유를 '판정', '정답 주제', '설명' 세 줄로 "
                "답하세요.")
    return f"You are a teacher who grades students' choices of a news article's topic. The topics are {names}. " \
           "Say whether the student's topic is right, and give the correct topic and why, in three lines: " \
           "'Verdict', 'Correct topic', 'Explanation'."


def classify_prompt(text: str, lang: str = "ko") -> list[Message]:
    """Messages asking for an article's topic; the answer is left out."""
    question = f"기사:\n{text}\n\n이 기사의 주제는 무엇인가요?" if lang == "ko" else \
        f"Article:\n{text}\n\nWhat is the topic of this article?"
    return [{"role": "system", "content": system_prompt("classify", lang)}, {"role": "user", "content": question}]


def grade_prompt(text: str, chosen: str, reason: str, lang: str = "ko") -> list[Message]:
    """Messages asking to grade a student's topic choice (``chosen``, ``reason``); the answer is left out."""
    if lang == "ko":
        question = f"기사:\n{text}\n\n학생의 답: {chosen}\n이유: {reason}\n\n학생의 답이 맞는지 평가해 주세요."
    else:
        question = f"Article:\n{text}\n\nStudent's answer: {chosen}\nReason: {reason}\n\n" \
                   "Is the student's answer right? Grade it."
    return [{"role": "system", "content": system_prompt("grade", lang)}, {"role": "user", "content": question}]


def student_reason(text: str, chosen: int, lang: str) -> tuple[str, str | None]:
    """A student's one-sentence reason for choosing ``chosen``: it cites a topic word found in the article.

    Args:
        text: the article.
        chosen: the student's topic.
        lang: ``"ko"`` or ``"en"``.

    Returns:
        (the reason, the cited word or None when the reason is generic).
    """
    words = topic_words(text, chosen, 1)
    name = label_name(chosen, lang)
    if words:
        if lang == "ko":
            return f"기사에 나오는 '{words[0]}' 같은 말을 보고 {name} 기사라고 생각했습니다.", words[0]
        return f"I chose {name} because the article mentions '{words[0]}'.", words[0]
    if lang == "ko":
        return f"기사가 {_ABOUT[chosen][1]}에 관한 내용인 것 같아서 {_obj(name)} 골랐습니다.", None
    return f"The article seems to be about {_ABOUT[chosen][0]}, so I chose {name}.", None


def grade_answer(text: str, label: int, chosen: int, cited: str | None, lang: str) -> str:
    """The grader's target: verdict, correct topic and an explanation citing the article's topic words.

    Args:
        text: the article.
        label: the true topic.
        chosen: the student's topic.
        cited: the word the student's reason cited, if any.
        lang: ``"ko"`` or ``"en"``.

    Returns:
        Three lines: verdict, correct topic, explanation.
    """
    name, chosen_name, ko = label_name(label, lang), label_name(chosen, lang), lang == "ko"
    words = ", ".join(f"'{w}'" for w in topic_words(text, label))
    about = _ABOUT[label][ko]
    if ko:
        evidence = (f"기사에 {words} 같은 {about} 관련 표현이 나오고, 중심 내용이 {about}에 관한 것이므로 "
                    f"{name} 기사입니다." if words
                    else f"기사의 중심 내용이 {about}에 관한 것이므로 {name} 기사입니다.")
        if chosen == label:
            return f"판정: 정답\n정답 주제: {name}\n설명: 학생의 선택이 맞습니다. {evidence}"
        misled = f" '{cited}' 같은 말이 나온다고 해서 {chosen_name} 기사가 되는 것은 아닙니다." if cited else ""
        return f"판정: 오답\n정답 주제: {name}\n설명: 학생은 {_obj(chosen_name)} 골랐지만 {evidence}{misled}"
    evidence = (f"The article uses words such as {words} and is mainly about {about}, so it is a {name} article."
                if words else f"The article is mainly about {about}, so it is a {name} article.")
    if chosen == label:
        return f"Verdict: correct\nCorrect topic: {name}\nExplanation: The student's choice is right. {evidence}"
    misled = f" Mentioning '{cited}' does not make it a {chosen_name} article." if cited else ""
    return (f"Verdict: incorrect\nCorrect topic: {name}\nExplanation: The student chose {chosen_name}, but "
            f"{evidence[0].lower()}{evidence[1:]}{misled}")


# ------------------------------------------------------------------------------------------------ conversations


def _row_rng(seed: int, text: str) -> random.Random:
    return random.Random(f"{seed}:{hashlib.sha1(text.encode('utf-8')).hexdigest()}")


def right_or_wrong(n: int, seed: int) -> list[bool]:
    """Whether each of ``n`` students answers right: each block of two holds one right and one wrong (seeded)."""
    flags: list[bool] = []
    for block in range(0, n, 2):
        flags += random.Random(f"{seed}:right:{block}").sample([True, False], 2)
    return flags[:n]


def build_conversation(record: Row, mode: str, lang: str, seed: int, student_right: bool = True) -> Conversation:
    """One conversation for a row ``{"text", "label"}`` (and optionally ``"id"``).

    Args:
        record: the row.
        mode: ``"classify"`` or ``"grade"``.
        lang: prompt language, ``"ko"`` or ``"en"``.
        seed: the seed; a wrong answer and its reason depend only on it and the article.
        student_right: grade mode: the student picks the true topic.

    Returns:
        The conversation; ``cut`` is the article; ``meta`` holds mode, label, id, lang (and, for grading, the
        student's ``chosen`` topic and ``student_right``).
    """
    text, label = record["text"], record["label"]
    meta: dict[str, Any] = {"mode": mode, "label": label, "id": record.get("id"), "lang": lang}
    if mode == "classify":
        messages = classify_prompt(text, lang) + [{"role": "assistant", "content": label_name(label, lang)}]
        return Conversation(messages, cut=text, meta=meta)
    if mode != "grade":
        raise ValueError(f"mode must be 'classify' or 'grade', got {mode!r}")
    rng = _row_rng(seed, text)
    chosen = label if student_right else rng.choice([k for k in range(4) if k != label])
    reason, cited = student_reason(text, chosen, lang)
    answer = grade_answer(text, label, chosen, cited, lang)
    messages = grade_prompt(text, label_name(chosen, lang), reason, lang) + [{"role": "assistant", "content": answer}]
    meta.update(chosen=chosen, student_right=student_right)
    return Conversation(messages, cut=text, meta=meta)


def build_conversations(records: list[Row], mode: str, lang: str, seed: int) -> list[Conversation]:
    """Conversations for rows, in order (grade mode: right and wrong students from :func:`right_or_wrong`)."""
    flags = right_or_wrong(len(records), seed)
    return [build_conversation(r, mode, lang, seed, flag) for r, flag in zip(records, flags)]


def build_datasets(cfg: DataConfig, seed: int, mode: str = "classify"
                   ) -> tuple[list[Conversation], list[Conversation]]:
    """Conversations of the rows named by ``cfg``: classify (``topic``) or grade (``topic_grade``) a topic.

    Args:
        cfg: the data configuration.
        seed: the seed for students' answers.
        mode: ``"classify"`` or ``"grade"``.

    Returns:
        Training and validation conversations.
    """
    data = load_data(cfg)
    return (build_conversations(data.train, mode, cfg.lang, seed),
            build_conversations(data.val, mode, cfg.lang, seed))


def summary_statistics(conversations: list[Conversation]) -> dict[str, Any]:
    """Counts for the prepare-data script: conversations, per topic, and (grading) students right.

    Args:
        conversations: from :func:`build_datasets`.

    Returns:
        ``{"conversations": n, "labels": {English name: count}}`` plus ``"students_right"`` for grading.
    """
    counts = Counter(LABELS_EN[c.meta["label"]] for c in conversations)
    out: dict[str, Any] = {"conversations": len(conversations), "labels": {k: counts[k] for k in LABELS_EN}}
    if any(c.meta["mode"] == "grade" for c in conversations):
        out["students_right"] = sum(bool(c.meta.get("student_right")) for c in conversations)
    return out


# ------------------------------------------------------------------------------------------------------ scoring


def _confusion(pred: list[Any], true: list[Any], labels: list[str], title: str) -> dict[str, Any]:
    """A confusion plot spec: rows the true labels, columns the predictions plus "invalid" (nothing read)."""
    cm = classification_metrics(pred, true, labels)
    return {"kind": "confusion", "matrix": cm["confusion_matrix"], "labels": labels, "columns": cm["columns"],
            "title": title}


def _mean(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def score_outputs(conversations: list[Conversation], outputs: list[str]) -> dict[str, Any]:
    """Score model answers against the conversations' truth.

    Classify: ``accuracy``, ``macro_f1`` (unparsed answers count as wrong), ``valid_rate``, ``n_invalid`` and
    per-class precision/recall/F1; plot ``confusion`` (true x predicted English label names, plus an "invalid"
    column for answers that name no topic).
    Grade: ``verdict_accuracy`` (the right/wrong verdict agrees with the truth), ``verdict_accuracy_right`` and
    ``verdict_accuracy_wrong`` (on students who were right / wrong), ``topic_accuracy`` (the correct topic named),
    ``valid_rate`` (both parts read); plots ``verdict_confusion`` and ``topic_confusion``.

    Args:
        conversations: from :func:`build_datasets` (one mode).
        outputs: the model's answers, one per conversation.

    Returns:
        ``{"metrics": {...}, "rows": [per-example dicts], "plots": {name: spec}}``.
    """
    if len(conversations) != len(outputs):
        raise ValueError(f"{len(conversations)} conversations but {len(outputs)} outputs; they must pair up")
    modes = {c.meta["mode"] for c in conversations}
    if len(modes) > 1:
        raise ValueError(f"conversations mix modes {sorted(modes)}; score each mode separately")
    true = [c.meta["label"] for c in conversations]
    if modes == {"grade"}:
        return _score_grade(conversations, outputs, true)
    pred = [parse_topic(o) for o in outputs]
    cm = classification_metrics(pred, true, labels=range(4))
    n_valid = sum(p is not None for p in pred)
    metrics = {"n": cm["n"], "accuracy": cm["accuracy"], "macro_f1": cm["macro_f1"],
               "valid_rate": n_valid / len(pred) if pred else None, "n_invalid": cm["n_invalid"],
               "per_class": {LABELS_EN[k]: v for k, v in cm["per_class"].items()}}
    rows = [{"id": c.meta.get("id"), "label": LABELS_EN[t], "pred": None if p is None else LABELS_EN[p],
             "correct": p == t, "output": o} for c, t, p, o in zip(conversations, true, pred, outputs)]
    plots = {"confusion": _confusion([None if p is None else LABELS_EN[p] for p in pred],
                                     [LABELS_EN[t] for t in true], list(LABELS_EN), "topic: true vs predicted")}
    return {"metrics": metrics, "rows": rows, "plots": plots}


def _score_grade(conversations: list[Conversation], outputs: list[str], true: list[int]) -> dict[str, Any]:
    parsed = [parse_grade(o) for o in outputs]
    right = [c.meta["student_right"] for c in conversations]
    verdict_ok = [p.verdict == r for p, r in zip(parsed, right)]
    topic_ok = [p.topic == t for p, t in zip(parsed, true)]
    metrics = {
        "n": len(outputs),
        "verdict_accuracy": _mean(verdict_ok),
        "verdict_accuracy_right": _mean([ok for ok, r in zip(verdict_ok, right) if r]),
        "verdict_accuracy_wrong": _mean([ok for ok, r in zip(verdict_ok, right) if not r]),
        "topic_accuracy": _mean(topic_ok),
        "valid_rate": _mean([p.verdict is not None and p.topic is not None for p in parsed]),
    }
    verdict_names = {True: "student right", False: "student wrong"}
    rows = [{"id": c.meta.get("id"), "label": LABELS_EN[t], "chosen": LABELS_EN[c.meta["chosen"]],
             "student_right": r, "pred_verdict": p.verdict,
             "pred_topic": None if p.topic is None else LABELS_EN[p.topic],
             "verdict_correct": v, "topic_correct": k, "output": o}
            for c, t, r, p, v, k, o in zip(conversations, true, right, parsed, verdict_ok, topic_ok, outputs)]
    plots = {
        "verdict_confusion": _confusion([verdict_names.get(p.verdict) for p in parsed],
                                        [verdict_names[r] for r in right], list(verdict_names.values()),
                                        "verdict: truth vs grader"),
        "topic_confusion": _confusion([None if p.topic is None else LABELS_EN[p.topic] for p in parsed],
                                      [LABELS_EN[t] for t in true], list(LABELS_EN), "correct topic named"),
    }
    return {"metrics": metrics, "rows": rows, "plots": plots}


TOPIC = Task("topic", partial(build_datasets, mode="classify"), score_outputs=score_outputs,
             summary_statistics=summary_statistics)
TOPIC_GRADE = Task("topic_grade", partial(build_datasets, mode="grade"), score_outputs=score_outputs,
                   summary_statistics=summary_statistics)
