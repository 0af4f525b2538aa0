"""Shape checks for the demo data sets shipped in ``gemma_lowmem/data/demo``.

The checks are functions that return a list of problems, so a failing test names every bad row at once, and
``test_checks_catch_broken_rows`` proves each check can fail.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gemma_lowmem.data.records import read_records

DEMO = Path(__file__).resolve().parents[2] / "gemma_lowmem" / "data" / "demo"
SUMMARY = DEMO / "summary_demo.jsonl"
PREFERENCE = DEMO / "preference_demo.jsonl"

SUMMARY_FIELDS = ("id", "lang", "article", "highlights")
PREFERENCE_FIELDS = ("id", "lang", "prompt", "chosen", "rejected", "topic")
HIGHLIGHT_CHARS = {"en": (150, 400), "ko": (80, 250)}
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON Lines file strictly: no blank lines, every line one object.

    Args:
        path: the file.

    Returns:
        The rows in file order.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{path.name}: must end with a newline"
    rows = []
    for n, line in enumerate(lines[:-1], start=1):
        assert line.strip(), f"{path.name}: line {n} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name}: line {n} is not an object"
        rows.append(row)
    return rows


def common_problems(rows: list[dict[str, Any]], fields: tuple[str, ...], prefix: str) -> list[str]:
    """Problems shared by both sets: fields, ids, languages and script.

    Args:
        rows: parsed rows.
        fields: required text fields (exactly these, no others).
        prefix: id prefix, e.g. ``"demo"`` for ``demo-en-001``.

    Returns:
        One message per problem found; empty when the rows are fine.
    """
    problems = []
    ids = [row.get("id") for row in rows]
    for dup in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        problems.append(f"id {dup!r} occurs {ids.count(dup)} times")
    for n, row in enumerate(rows):
        where = f"row {n} ({row.get('id')})"
        if set(row) != set(fields):
            problems.append(f"{where}: fields {sorted(row)} != {sorted(fields)}")
        for name in fields:
            value = row.get(name)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{where}: field {name!r} is missing or empty")
        lang = row.get("lang")
        if lang not in ("en", "ko"):
            problems.append(f"{where}: lang {lang!r} is not 'en' or 'ko'")
            continue
        if not re.fullmatch(rf"{prefix}-{lang}-\d{{3}}", str(row.get("id"))):
            problems.append(f"{where}: id does not match '{prefix}-{lang}-NNN'")
        texts = " ".join(str(row.get(name, "")) for name in fields if name not in ("id", "lang", "topic"))
        if (lang == "ko") != bool(HANGUL.search(texts)):
            problems.append(f"{where}: text script does not match lang {lang!r}")
    return problems


def summary_problems(rows: list[dict[str, Any]]) -> list[str]:
    """Problems specific to the summarisation set (see the demo README for the rules).

    Args:
        rows: parsed rows of ``summary_demo.jsonl``.

    Returns:
        One message per problem found.
    """
    problems = common_problems(rows, SUMMARY_FIELDS, "demo")
    articles = [" ".join(str(row.get("article", "")).split()) for row in rows]
    for n, row in enumerate(rows):
        where = f"row {n} ({row.get('id')})"
        article, highlights = str(row.get("article", "")), str(row.get("highlights", ""))
        if articles.count(articles[n]) > 1:
            problems.append(f"{where}: article is duplicated")
        if len(re.findall(r"\d+", article)) < 2:
            problems.append(f"{where}: article has fewer than 2 numbers")
        if not 700 <= len(article) <= 1800:
            problems.append(f"{where}: article has {len(article)} characters, not 700-1800")
        lines = highlights.split("\n")
        if not 3 <= len(lines) <= 4 or not all(line.strip() for line in lines):
            problems.append(f"{where}: highlights have {len(lines)} lines (or an empty one), not 3-4")
        lo, hi = HIGHLIGHT_CHARS.get(str(row.get("lang")), (0, 0))
        if not lo <= len(highlights) <= hi:
            problems.append(f"{where}: highlights have {len(highlights)} characters, not {lo}-{hi}")
    return problems


def preference_problems(rows: list[dict[str, Any]]) -> list[str]:
    """Problems specific to the preference set.

    Args:
        rows: parsed rows of ``preference_demo.jsonl``.

    Returns:
        One message per problem found.
    """
    problems = common_problems(rows, PREFERENCE_FIELDS, "pref")
    prompts = [row.get("prompt") for row in rows]
    for n, row in enumerate(rows):
        where = f"row {n} ({row.get('id')})"
        if " ".join(str(row.get("chosen")).split()) == " ".join(str(row.get("rejected")).split()):
            problems.append(f"{where}: chosen == rejected")
        if prompts.count(row.get("prompt")) > 1:
            problems.append(f"{where}: prompt is duplicated")
        if not re.fullmatch(r"[a-z_]+", str(row.get("topic"))):
            problems.append(f"{where}: topic {row.get('topic')!r} is not a short English tag")
    return problems


@pytest.fixture(scope="module")
def summary_rows() -> list[dict[str, Any]]:
    return load_jsonl(SUMMARY)


@pytest.fixture(scope="module")
def preference_rows() -> list[dict[str, Any]]:
    return load_jsonl(PREFERENCE)


def test_readme_present():
    assert (DEMO / "README.md").read_text(encoding="utf-8").strip()


def test_summary_counts(summary_rows):
    langs = [row["lang"] for row in summary_rows]
    assert (len(summary_rows), langs.count("en"), langs.count("ko")) == (50, 40, 10)


def test_preference_counts(preference_rows):
    langs = [row["lang"] for row in preference_rows]
    assert (len(preference_rows), langs.count("en"), langs.count("ko")) == (24, 12, 12)


def test_summary_rows(summary_rows):
    problems = summary_problems(summary_rows)
    assert not problems, "\n".join(problems)


def test_preference_rows(preference_rows):
    problems = preference_problems(preference_rows)
    assert not problems, "\n".join(problems)


def test_preference_topics_match_across_languages(preference_rows):
    # Each language covers the same topics once, so per-topic comparisons across languages are possible.
    by_lang = {lang: [row["topic"] for row in preference_rows if row["lang"] == lang] for lang in ("en", "ko")}
    assert sorted(by_lang["en"]) == sorted(by_lang["ko"])
    assert len(set(by_lang["en"])) == len(by_lang["en"])


@pytest.mark.parametrize(
    ("path", "fields"), [(SUMMARY, SUMMARY_FIELDS), (PREFERENCE, PREFERENCE_FIELDS)], ids=["summary", "preference"]
)
def test_project_reader_accepts_demo_files(path, fields):
    rows = read_records(path, required=fields, text_fields=fields)
    assert rows == load_jsonl(path)


def test_files_keep_hangul_unescaped():
    # Written with ensure_ascii=False: Korean stays readable in the file and in diffs.
    for path in (SUMMARY, PREFERENCE):
        text = path.read_text(encoding="utf-8")
        assert "\\u" not in text and HANGUL.search(text), path.name


def test_checks_catch_broken_rows(summary_rows, preference_rows):
    summary = copy.deepcopy(summary_rows[:3])
    summary[1]["id"] = summary[0]["id"]
    summary[1]["highlights"] = "One line only."
    summary[2]["article"] = summary[0]["article"]
    found = "\n".join(summary_problems(summary))
    for expected in ("occurs 2 times", "not 3-4", "article is duplicated", "characters, not 150-400"):
        assert expected in found

    summary = copy.deepcopy(summary_rows[:1])
    summary[0]["article"] = re.sub(r"\d", "x", summary[0]["article"])
    summary[0]["lang"] = "ko"
    found = "\n".join(summary_problems(summary))
    for expected in ("fewer than 2 numbers", "does not match 'demo-ko-NNN'", "does not match lang 'ko'"):
        assert expected in found

    preference = copy.deepcopy(preference_rows[:2])
    preference[0]["rejected"] = preference[0]["chosen"] + " "
    preference[1]["topic"] = ""
    found = "\n".join(preference_problems(preference))
    for expected in ("chosen == rejected", "field 'topic' is missing or empty"):
        assert expected in found
