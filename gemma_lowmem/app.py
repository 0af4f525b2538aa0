"""The teachers' grading page: an article and a student summary in, rubric scores and feedback out, in a browser.

:func:`build_page` makes a Gradio page around a loaded evaluator (:class:`Grader`) with two tabs:

- **one summary**: article, student summary and an optional reference -> each criterion's score with its expected
  value (``sum p(s) * s``) and a bar, the total, the comments, the feedback and the suggestions, beside the rubric;
- **a class set**: a CSV, XLSX or JSONL upload (JSON and Parquet too), its columns mapped as ``scripts/grade.py
  --columns`` maps them, a progress bar, the graded rows as a table and the graded file to download in the same
  format; bad rows are listed, the others graded.

Both grade through :meth:`Grader.grade_rows`, which is :func:`~gemma_lowmem.grading.grade` with the settings bound,
and a class set goes through :func:`~gemma_lowmem.grading.read_grading_input` and
:func:`~gemma_lowmem.grading.grade_file`: what ``scripts/grade.py`` calls, so the page and the command line grade
alike. The page shows which model and adapter grade; a base model without an adapter was never trained as a judge,
and every result then carries a warning (and the download's name says ``UNTRAINED``).

One model serves the page, so one grading runs at a time: a request that comes while another grades is told so at
once rather than queued behind a class set that may take many minutes. Bad input (an empty article, a paste longer
than the limits below, a file of another type, a missing column) is a message on the page; the server keeps
serving. Gradio is imported by :func:`build_page` and :func:`serve` only: it is the ``[app]`` extra.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gemma_lowmem.data.records import SUPPORTED_SUFFIXES, read_rows
from gemma_lowmem.errors import UserError
from gemma_lowmem.grading import Grade, Grader, grade_file, read_grading_input
from gemma_lowmem.tasks.summary_rubric import CRITERIA_HELP

MAX_ARTICLE_CHARS = 20_000  # 10x what training reads (max_article_length 2000): a longer paste is not one article
MAX_SUMMARY_CHARS = 5_000  # a summary or reference (they are not cut: each character reaches the prompt)
MAX_UPLOAD = "20mb"  # a class set of a few hundred articles is well under it
LANGS = ("ko", "en")

TEXTS: Mapping[str, Mapping[str, str]] = {
    "ko": {
        "title": "요약 채점",
        "intro": "기사와 학생 요약을 넣으면 아래 채점 기준에 따라 기준별 점수와 피드백을 냅니다.",
        "model_line": "채점 모델: **{model}** · 어댑터: **{adapter}** · 방식: {mode} · 답변 언어: {answer_lang}",
        "no_adapter": "없음",
        "untrained": "⚠️ 주의: 이 점수는 채점용으로 학습되지 않은 기본 모델({model})이 매긴 것입니다. 성적으로 쓰지 "
                     "마세요. 학습한 평가기로 채점하려면 --adapter로 어댑터 폴더를 주고 다시 시작하세요.",
        "tab_one": "요약 한 편",
        "tab_set": "학급 전체 (파일)",
        "article": "기사",
        "article_ph": "기사 본문을 붙여 넣으세요",
        "summary": "학생 요약",
        "summary_ph": "학생이 쓴 요약 (비어 있으면 빈 요약으로 채점합니다)",
        "reference": "참고 요약 (선택)",
        "reference_ph": "선생님의 모범 요약; 없으면 기사와만 비교합니다",
        "grade": "채점하기",
        "file": "파일 (CSV, XLSX, JSONL)",
        "columns": "열 이름 대응 (선택)",
        "columns_info": "열 이름이 article, summary, reference, id가 아니면 적으세요. "
                        "예: article=본문 summary=학생 요약 (grade.py --columns와 같습니다)",
        "grade_file": "파일 채점하기",
        "table": "채점 결과",
        "download": "채점한 파일 (올린 파일과 같은 형식)",
        "rubric": "채점 기준",
        "rubric_note": "기사는 앞에서부터 {n:,}자까지(문장 끝에서 자름) 읽습니다. 학습 때와 같습니다.",
        "total": "총점",
        "expected": "기댓값",
        "criterion": "기준",
        "score": "점수",
        "comment": "코멘트",
        "feedback": "전체 피드백",
        "suggestions": "개선 제안",
        "by": "채점: {model}, 어댑터 {adapter}, 방식 {mode}",
        "invalid": "답에서 점수를 읽지 못했습니다. 모델의 답을 그대로 보여 드립니다.",
        "summary_col": "요약",
        "valid_col": "점수 읽힘",
        "file_columns": "이 파일의 열: {columns} ({rows}행)",
        "graded": "{graded}행을 채점했습니다.",
        "bad_rows": "건너뛴 행 {count}개 (나머지는 채점했습니다):",
        "more_bad": "… 외 {more}개",
        "err_no_article": "기사를 입력하세요.",
        "err_long": "{what}이(가) 너무 깁니다: {n:,}자 (최대 {limit:,}자). 기사 한 편과 요약 한 편만 넣으세요.",
        "note_cut": "기사가 {n:,}자라 앞의 {limit:,}자까지만 읽었습니다(학습 때와 같음).",
        "err_no_file": "파일을 올리세요.",
        "err_type": "'{suffix}' 파일은 읽을 수 없습니다. {types} 파일을 올리세요 (엑셀은 .xlsx로 저장).",
        "err_columns": "열 이름 대응을 읽을 수 없습니다: '{value}'. 필드=열 이름 형식으로 적으세요 "
                       "(예: article=본문 summary=학생 요약).",
        "err_file": "파일을 채점할 수 없습니다: {detail}",
        "err_busy": "다른 채점이 진행 중입니다 (모델 하나로 한 번에 하나씩 채점합니다). 끝난 뒤 다시 눌러 주세요.",
        "progress": "채점 중",
        "reading": "파일 읽는 중",
        "lang_switch": "화면 언어",
    },
    "en": {
        "title": "Summary grading",
        "intro": "Paste an article and a student's summary: the evaluator scores each criterion of the rubric below "
                 "and writes feedback.",
        "model_line": "Model: **{model}** · adapter: **{adapter}** · mode: {mode} · answer language: {answer_lang}",
        "no_adapter": "none",
        "untrained": "⚠️ Warning: these scores come from a base model ({model}) that was not trained as a judge. Do "
                     "not use them as grades. To grade with a trained evaluator, restart with --adapter and the "
                     "adapter folder.",
        "tab_one": "One summary",
        "tab_set": "Class set (file)",
        "article": "Article",
        "article_ph": "Paste the article",
        "summary": "Student summary",
        "summary_ph": "The student's summary (empty: graded as an empty summary)",
        "reference": "Reference summary (optional)",
        "reference_ph": "Your model summary; without one the summary is compared with the article alone",
        "grade": "Grade",
        "file": "File (CSV, XLSX, JSONL)",
        "columns": "Column mapping (optional)",
        "columns_info": "When your columns are not called article, summary, reference, id. E.g. article=text "
                        "summary=student summary (as grade.py --columns)",
        "grade_file": "Grade the file",
        "table": "Graded rows",
        "download": "Graded file (the format you uploaded)",
        "rubric": "Rubric",
        "rubric_note": "The evaluator reads the article's first {n:,} characters (cut at a sentence end), as in "
                       "training.",
        "total": "Total",
        "expected": "expected",
        "criterion": "Criterion",
        "score": "Score",
        "comment": "Comment",
        "feedback": "Overall feedback",
        "suggestions": "Suggestions",
        "by": "Graded by {model}, adapter {adapter}, mode {mode}",
        "invalid": "No scores could be read from the answer; here it is as the model wrote it.",
        "summary_col": "summary",
        "valid_col": "scores read",
        "file_columns": "Columns of this file: {columns} ({rows} rows)",
        "graded": "Graded {graded} rows.",
        "bad_rows": "{count} rows skipped (the others are graded):",
        "more_bad": "… and {more} more",
        "err_no_article": "Paste the article.",
        "err_long": "The {what} is too long: {n:,} characters (at most {limit:,}). Paste one article and one summary.",
        "note_cut": "The article has {n:,} characters; the evaluator read the first {limit:,}, as in training.",
        "err_no_file": "Upload a file.",
        "err_type": "Cannot read a '{suffix}' file. Upload a {types} file (Excel: save as .xlsx).",
        "err_columns": "Cannot read the column mapping '{value}'. Write FIELD=COLUMN pairs (e.g. article=text "
                       "summary=student summary).",
        "err_file": "Cannot grade this file: {detail}",
        "err_busy": "Another grading is running (one model grades one request at a time). Press again when it is done.",
        "progress": "grading",
        "reading": "reading the file",
        "lang_switch": "Page language",
    },
}


def say(lang: str, key: str, **values: Any) -> str:
    """The page's text ``key`` in ``lang`` (``ko`` or ``en``), formatted with ``values``."""
    return TEXTS[lang][key].format(**values)


# ----------------------------------------------------------------------------------------------------- the grader


def check_page_task(grader: Grader) -> None:
    """The page's form is an article, a summary and a reference: it grades summary tasks only."""
    request = grader.task.request
    assert request is not None, "grading_task checked it"
    if not {"article", "summary"} <= set(request.fields):
        raise UserError(f"task '{grader.data.task}' grades {', '.join(request.fields[1:])}; the page grades "
                        f"summaries of articles: grade this task with scripts/grade.py --task {grader.data.task}")


# ------------------------------------------------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _paragraphs(value: str) -> str:
    return "<br>".join(_e(line) for line in value.strip().splitlines())


def warning_html(grader: Grader, lang: str) -> str:
    """The untrained-model warning as a banner ('' for a trained evaluator)."""
    if grader.trained:
        return ""
    return ('<div class="gl-warning" style="border:2px solid #d97706;background:#fffbeb;color:#92400e;'
            f'padding:10px 14px;border-radius:8px;margin:6px 0;font-weight:600">'
            f'{_e(say(lang, "untrained", model=grader.model_name))}</div>')


def header_markdown(grader: Grader, lang: str) -> str:
    """The page's title, what it does and which model and adapter grade."""
    line = say(lang, "model_line", model=grader.model_name, adapter=grader.adapter or say(lang, "no_adapter"),
                mode=grader.mode, answer_lang=grader.lang)
    return f"# {say(lang, 'title')}\n{say(lang, 'intro')}\n\n{line}"


def rubric_markdown(grader: Grader, lang: str) -> str:
    """The rubric beside the form: each criterion's maximum, label and what it asks."""
    rubric = grader.task.rubric
    assert rubric is not None, "grading_task checked it"
    lines = [f"### {say(lang, 'rubric')} ({rubric.max_total})"]
    for key, (maximum, label_ko, label_en) in rubric.criteria.items():
        help_en, help_ko = CRITERIA_HELP.get(key, ("", ""))
        label, asks = (label_ko, help_ko) if lang == "ko" else (label_en, help_en)
        lines.append(f"- **{label}** ({maximum}): {asks}")
    lines.append("")
    lines.append(say(lang, "rubric_note", n=grader.data.max_article_length))
    return "\n".join(lines)


def _label(grader: Grader, key: str, lang: str) -> str:
    rubric = grader.task.rubric
    assert rubric is not None, "grading_task checked it"
    _, label_ko, label_en = rubric.criteria[key]
    return label_ko if lang == "ko" else label_en


def _bar(value: float | None, maximum: int) -> str:
    share = 0.0 if value is None else max(0.0, min(1.0, value / maximum))
    return ('<div style="background:#e5e7eb;border-radius:4px;height:12px;min-width:120px">'
            f'<div style="background:#2563eb;height:12px;border-radius:4px;width:{100 * share:.1f}%"></div></div>')


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def grade_html(g: Grade, grader: Grader, lang: str) -> str:
    """One grade as the page shows it: the warning when the model is not a trained judge, the total, a row per
    criterion (score, expected value and its bar, comment), the feedback, the suggestions and who graded."""
    parts = [warning_html(grader, lang)]
    rubric = grader.task.rubric
    assert rubric is not None, "grading_task checked it"
    if g.valid:
        expected = f' <span style="color:#6b7280">({say(lang, "expected")} {_number(g.expected_total)})</span>' \
            if g.expected_total is not None else ""
        parts.append(f'<div style="font-size:1.5em;margin:8px 0">{say(lang, "total")}: '
                     f'<b id="gl-total">{_e(g.total)}</b> / {rubric.max_total}{expected}</div>')
    else:
        parts.append(f'<p><b>{_e(say(lang, "invalid"))}</b></p><pre style="white-space:pre-wrap">{_e(g.answer)}'
                     "</pre>")
    rows = []
    for key, score in g.scores.items():
        maximum = rubric.criteria[key][0]
        shown = g.expected[key] if g.expected[key] is not None else score
        label = _label(grader, key, lang)
        rows.append(f'<tr data-criterion="{_e(key)}"><td style="white-space:nowrap">{_e(label)}</td>'
                    f'<td class="gl-score" style="white-space:nowrap"><b>{_e("–" if score is None else score)}</b>'
                    f" / {maximum}</td><td>{_number(g.expected[key])}</td><td>{_bar(shown, maximum)}</td>"
                    f"<td>{_e(g.comments.get(key))}</td></tr>")
    heads = "".join(f'<th align="left" style="white-space:nowrap">{say(lang, key) if key else ""}</th>'
                    for key in ("criterion", "score", "expected", "", "comment"))
    parts.append(f'<table class="gl-criteria" style="width:100%;border-collapse:collapse"><tr>{heads}</tr>'
                 f'{"".join(rows)}</table>')
    for key in ("feedback", "suggestions"):
        value = getattr(g, key)
        if value:
            parts.append(f"<h4>{say(lang, key)}</h4><p>{_paragraphs(value)}</p>")
    by = say(lang, "by", model=grader.model_name, adapter=grader.adapter or say(lang, "no_adapter"), mode=g.mode)
    parts.append(f'<p style="color:#6b7280;font-size:0.85em">{_e(by)}</p>')
    # overflow-wrap: a model may write a long unbroken string, which must not push the page sideways
    return f'<div class="gl-result" style="overflow-wrap:anywhere">{"".join(parts)}</div>'


def message_markdown(message: str, grader: Grader, lang: str) -> str:
    """A result's status line: the warning first when the model is not a judge."""
    warning = "" if grader.trained else f"**{say(lang, 'untrained', model=grader.model_name)}**\n\n"
    return warning + message


# ------------------------------------------------------------------------------------------------------ requests


class Busy(Exception):
    """Another request is grading: the model serves one at a time."""


class OneAtATime:
    """The model's turn: one grading at a time; a request that finds it taken is refused at once, not queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the model for one grading.

        Raises:
            Busy: another grading holds it.
        """
        if not self._lock.acquire(blocking=False):
            raise Busy
        try:
            yield
        finally:
            self._lock.release()


def check_texts(article: str | None, summary: str | None, reference: str | None, lang: str) -> str | None:
    """The message for a form that cannot be graded (no article, a paste over the limits), else None."""
    if not (article or "").strip():
        return say(lang, "err_no_article")
    limits = (("article", article, MAX_ARTICLE_CHARS), ("summary", summary, MAX_SUMMARY_CHARS),
              ("reference", reference, MAX_SUMMARY_CHARS))
    for key, value, limit in limits:
        if value and len(value) > limit:
            what = say(lang, key).split(" (")[0]
            return say(lang, "err_long", what=what if lang == "ko" else what.lower(), n=len(value), limit=limit)
    return None


def grade_one(grader: Grader, turn: OneAtATime, article: str | None, summary: str | None, reference: str | None,
              lang: str) -> tuple[str, str]:
    """Grade the form's summary.

    Returns:
        ``(status, result)``: the status line's Markdown (a message, or the note that the article was cut) and the
        result's HTML, headed by the warning when the model is not a judge ('' when nothing was graded).
    """
    problem = check_texts(article, summary, reference, lang)
    if problem:
        return f"⚠️ {problem}", ""
    row = {"id": "page", "article": article, "summary": (summary or "").strip(), "reference": (reference or "").strip()}
    try:
        with turn.turn():
            g = grader.grade_rows([row])[0]
    except Busy:
        return f"⏳ {say(lang, 'err_busy')}", ""
    n = len(article.strip())
    limit = grader.data.max_article_length
    note = say(lang, "note_cut", n=n, limit=limit) if n > limit else ""
    return note, grade_html(g, grader, lang)


_PAIR = re.compile(r"(?:^|[\s,;]+)([A-Za-z_]+)\s*=")


def parse_columns(value: str | None) -> dict[str, str] | None:
    """The column mapping as typed on the page, ``FIELD=COLUMN`` pairs as ``grade.py --columns`` takes them; a
    column name may hold spaces (``summary=학생 요약``), pairs are split by the next ``FIELD=``, commas or newlines.

    Returns:
        field -> column; None when the text is not such pairs (empty text: ``{}``).
    """
    value = (value or "").strip()
    if not value:
        return {}
    found = list(_PAIR.finditer(value))
    if not found or found[0].start() != 0:
        return None
    pairs: dict[str, str] = {}
    for match, after in zip(found, [*found[1:], None]):
        column = value[match.end(): after.start() if after else len(value)].strip(" \t\n,;\"'")
        name = match.group(1)
        if not column or name in pairs:
            return None
        pairs[name] = column
    return pairs


def describe_upload(path: str | None, lang: str) -> str:
    """What the uploaded file holds (its columns and row count), to write the mapping against; '' without one."""
    if not path:
        return ""
    try:
        rows = [raw for _, raw in read_rows(path)]
    except UserError as err:
        return f"⚠️ {say(lang, 'err_file', detail=_shown(str(err), path, lang))}"
    names = list(dict.fromkeys(k for raw in rows if isinstance(raw, dict) for k in raw))
    return say(lang, "file_columns", columns=", ".join(names) or "–", rows=len(rows))


def _shown(message: str, path: str | Path, lang: str) -> str:
    """A library message as the page shows it: the upload's temporary path becomes its file name, and the command
    line's ``--columns`` the page's column mapping field."""
    return message.replace(str(path), Path(path).name).replace("--columns ", f"[{say(lang, 'columns')}] ")


def _table(grader: Grader, rows: list[dict[str, Any]], grades: list[Grade], lang: str) -> Any:
    import pandas as pd

    records = []
    for row, g in zip(rows, grades):
        summary = str(row.get("summary") or "")
        records.append({"id": row["id"], say(lang, "summary_col"): summary[:60] + ("…" if len(summary) > 60 else ""),
                        say(lang, "total"): g.total, **{_label(grader, k, lang): v for k, v in g.scores.items()},
                        say(lang, "valid_col"): g.valid})
    return pd.DataFrame(records)


def grade_class_set(grader: Grader, turn: OneAtATime, workdir: Path, upload: str | None, columns_text: str | None,
                    lang: str, progress: Callable[..., Any] = lambda *a, **k: None) -> tuple[str, Any, str | None, str]:
    """Grade an uploaded class set through :func:`~gemma_lowmem.grading.read_grading_input` and
    :func:`~gemma_lowmem.grading.grade_file`, as ``scripts/grade.py --input --output --columns`` does.

    Args:
        grader: the evaluator.
        turn: the model's turn (a second request while one grades is refused with a message).
        workdir: where the graded file is written (a folder of its own per request).
        upload: the uploaded file's path.
        columns_text: the column mapping as typed (``article=text summary=학생 요약``).
        lang: the page's language.
        progress: called as ``progress((done, total), desc=..., unit=...)`` after every batch (Gradio's progress).

    Returns:
        ``(status, table, download, bad_rows)``: the status line's Markdown (a message, or the count graded headed
        by the warning when the model is not a judge), the graded rows as a table and the graded file's path (None
        when nothing was graded), and the bad rows as a Markdown list ('' when there are none).
    """
    def failed(message: str) -> tuple[str, Any, None, str]:
        return f"⚠️ {message}", None, None, ""

    if not upload:
        return failed(say(lang, "err_no_file"))
    path = Path(upload)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        return failed(say(lang, "err_type", suffix=suffix or path.name, types=", ".join(SUPPORTED_SUFFIXES)))
    columns = parse_columns(columns_text)
    if columns is None:
        return failed(say(lang, "err_columns", value=columns_text))
    out_dir = workdir / uuid.uuid4().hex
    out = out_dir / f"{path.stem}-graded{'' if grader.trained else '-UNTRAINED'}{suffix}"
    graded_rows: list[dict[str, Any]] = []
    graded: list[Grade] = []
    try:
        with turn.turn():
            progress(0, desc=say(lang, "reading"))
            data = read_grading_input(path, out, columns, grader.task)
            total = len(data.todo)

            def grade_batch(batch: list[dict[str, Any]]) -> list[Grade]:
                grades = grader.grade_rows(batch)
                graded_rows.extend(batch)
                graded.extend(grades)
                progress((len(graded), total), desc=say(lang, "progress"), unit="summaries")
                return grades

            progress((0, total), desc=say(lang, "progress"), unit="summaries")
            summary = grade_file(data, out, grade_batch, batch_size=grader.decoding.batch_size, show_progress=False)
    except Busy:
        return f"⏳ {say(lang, 'err_busy')}", None, None, ""
    except UserError as err:
        return failed(say(lang, "err_file", detail=_shown(str(err), path, lang)))
    bad = ""
    if summary.bad_rows.count:
        shown = [f"- {_shown(reason, path, lang)}" for reason in summary.bad_rows.reasons]
        more = summary.bad_rows.count - len(summary.bad_rows.reasons)
        bad = "\n".join([say(lang, "bad_rows", count=summary.bad_rows.count), *shown,
                         *([say(lang, "more_bad", more=more)] if more > 0 else [])])
    status = message_markdown(say(lang, "graded", graded=summary.graded), grader, lang)
    return status, _table(grader, graded_rows, graded, lang), str(summary.output), bad


# ----------------------------------------------------------------------------------------------------------- page


def build_page(grader: Grader, lang: str = "ko", workdir: str | Path | None = None) -> Any:
    """The grading page (a ``gradio.Blocks``) around ``grader``; :func:`serve` starts it.

    Args:
        grader: the evaluator every request grades with.
        lang: the page's language at start, ``ko`` or ``en`` (a switch on the page changes it; the model's answers
            stay in ``grader.lang``, the language it was trained in).
        workdir: where graded files are written (default: a temporary folder removed at exit).

    Raises:
        UserError: ``lang`` is not one of the page's, or ``grader`` grades no summaries (:func:`check_page_task`).

    Returns:
        The ``gradio.Blocks`` page. Its API (Gradio's client) has ``/grade_one`` (article, summary, reference,
        lang -> status, result HTML) and ``/grade_file`` (file, columns, lang -> status, table, file, bad rows).
    """
    import gradio as gr

    if lang not in LANGS:
        raise UserError(f"--lang {lang!r}: the page speaks {', '.join(LANGS)}")
    check_page_task(grader)
    if workdir is None:  # the graded files of this server's life: students' work, so removed at exit
        workdir = Path(tempfile.mkdtemp(prefix="gemma-lowmem-page-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    workdir = Path(workdir)
    turn = OneAtATime()

    with gr.Blocks(title=say(lang, "title"), analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        with gr.Row():
            header = gr.Markdown(header_markdown(grader, lang), elem_id="gl-header")
            page_lang = gr.Radio([("한국어", "ko"), ("English", "en")], value=lang, label=say(lang, "lang_switch"),
                                 elem_id="gl-lang", scale=0, min_width=200)
        banner = gr.HTML(warning_html(grader, lang), elem_id="gl-banner")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab(say(lang, "tab_one"), id="one") as tab_one:
                    # No max_length: the browser would cut a long paste silently; check_texts says why instead.
                    article = gr.Textbox(label=say(lang, "article"), placeholder=say(lang, "article_ph"), lines=10,
                                         elem_id="gl-article")
                    summary = gr.Textbox(label=say(lang, "summary"), placeholder=say(lang, "summary_ph"), lines=4,
                                         elem_id="gl-summary")
                    reference = gr.Textbox(label=say(lang, "reference"), placeholder=say(lang, "reference_ph"),
                                           lines=3, elem_id="gl-reference")
                    grade_button = gr.Button(say(lang, "grade"), variant="primary", elem_id="gl-grade")
                    status_one = gr.Markdown(elem_id="gl-status-one")
                    result = gr.HTML(elem_id="gl-result")
                with gr.Tab(say(lang, "tab_set"), id="set") as tab_set:
                    # No file_types: Gradio would refuse another type with its own English error; ours says why.
                    upload = gr.File(label=say(lang, "file"), type="filepath", elem_id="gl-file")
                    upload_info = gr.Markdown(elem_id="gl-file-info")
                    columns = gr.Textbox(label=say(lang, "columns"), info=say(lang, "columns_info"),
                                         placeholder="article=text summary=student_summary", elem_id="gl-columns")
                    file_button = gr.Button(say(lang, "grade_file"), variant="primary", elem_id="gl-grade-file")
                    status_set = gr.Markdown(elem_id="gl-status-set")
                    bad_rows = gr.Markdown(elem_id="gl-bad-rows")
                    table = gr.Dataframe(label=say(lang, "table"), interactive=False, elem_id="gl-table")
                    download = gr.File(label=say(lang, "download"), interactive=False, elem_id="gl-download")
            with gr.Column(scale=1):
                rubric = gr.Markdown(rubric_markdown(grader, lang), elem_id="gl-rubric")

        def on_grade_one(article_text, summary_text, reference_text, current_lang):
            return grade_one(grader, turn, article_text, summary_text, reference_text, current_lang)

        def on_grade_file(path, columns_text, current_lang, progress=gr.Progress()):  # noqa: B008 (Gradio's API)
            return grade_class_set(grader, turn, workdir, path, columns_text, current_lang, progress)

        def on_language(current_lang):
            return (header_markdown(grader, current_lang), warning_html(grader, current_lang),
                    rubric_markdown(grader, current_lang),
                    gr.update(label=say(current_lang, "lang_switch")),
                    gr.update(label=say(current_lang, "tab_one")), gr.update(label=say(current_lang, "tab_set")),
                    *(gr.update(label=say(current_lang, key), placeholder=say(current_lang, f"{key}_ph"))
                      for key in ("article", "summary", "reference")),
                    gr.update(value=say(current_lang, "grade")), gr.update(label=say(current_lang, "file")),
                    gr.update(label=say(current_lang, "columns"), info=say(current_lang, "columns_info")),
                    gr.update(value=say(current_lang, "grade_file")), gr.update(label=say(current_lang, "table")),
                    gr.update(label=say(current_lang, "download")))

        # concurrency_limit=None: a second request runs at once and meets OneAtATime's message instead of a queue.
        grade_button.click(on_grade_one, [article, summary, reference, page_lang], [status_one, result],
                           api_name="grade_one", concurrency_limit=None)
        file_button.click(on_grade_file, [upload, columns, page_lang], [status_set, table, download, bad_rows],
                          api_name="grade_file", concurrency_limit=None)
        upload.change(describe_upload, [upload, page_lang], upload_info, api_visibility="private")
        page_lang.change(on_language, page_lang,
                         [header, banner, rubric, page_lang, tab_one, tab_set, article, summary, reference,
                          grade_button, upload, columns, file_button, table, download], api_visibility="private")
    return page


def serve(page: Any, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, block: bool = True
          ) -> str:
    """Start the page's server.

    Args:
        page: from :func:`build_page`.
        host: the address to listen on (``127.0.0.1``: this machine only; ``0.0.0.0``: the local network too).
        port: the port (None: the first free one from 7860).
        share: also open a public ``*.gradio.live`` link (Colab, where localhost is not the user's).
        block: serve until interrupted (a script); False returns at once (a notebook, a test).

    Returns:
        The local URL.
    """
    _, url, share_url = page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                                    show_error=True, max_file_size=MAX_UPLOAD, ssr_mode=False,
                                    footer_links=["api"])
    return share_url or url
