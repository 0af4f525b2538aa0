"""The record readers: column mapping (copy semantics, swaps, a word when a mapped column is nowhere), and a broken
JSONL line or a CSV row with more cells than the header as a bad row (named; skipped and counted on request), and
a JSON message that reads right."""

from __future__ import annotations

import json
import logging

import pytest

from gemma_lowmem.data.records import BadRows, apply_columns, check_columns, json_error, read_records, read_rows
from gemma_lowmem.errors import UserError


def test_apply_columns_copies_from_the_original_row_so_swaps_work():
    row = {"a": 1, "b": 2, "c": 3}
    assert apply_columns(row, {"a": "b", "b": "a"}) == {"a": 2, "b": 1, "c": 3}
    assert apply_columns(row, {"x": "c"}) == {"a": 1, "b": 2, "c": 3, "x": 3}
    assert apply_columns(row, {"x": "missing"}) is row and apply_columns(row, {}) is row
    assert apply_columns(["not", "a", "dict"], {"x": "a"}) == ["not", "a", "dict"]


def test_required_fields_are_checked_after_the_mapping(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "An article.", "ref": "A summary."}) + "\n", encoding="utf-8")
    rows = read_records(path, required=("article", "highlights"), text_fields=("article",),
                        columns={"article": "text", "highlights": "ref"})
    assert rows == [{"text": "An article.", "ref": "A summary.", "article": "An article.", "highlights": "A summary."}]
    with pytest.raises(UserError, match=r"rows.jsonl: line 1: missing field 'highlights' \(fields present: text, ref, "
                                        r"article\); --columns highlights=summary names a column this row lacks"):
        read_records(path, required=("article", "highlights"), columns={"article": "text", "highlights": "summary"})


def test_a_mapped_column_in_no_row_is_reported_once(tmp_path, caplog):
    path = tmp_path / "rows.csv"
    path.write_text("article,highlights\nAn article.,A summary.\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="gemma_lowmem.data.records"):
        read_records(path, columns={"id": "doc_id", "article": "article"})
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: --columns id=doc_id: no row has a column 'doc_id' (columns: article, highlights)"]


def test_check_columns_names_the_unknown_fields():
    check_columns({"article": "text"}, ("article", "highlights"), "summary_eval")
    with pytest.raises(UserError, match="--columns artcle=text: task 'summary_eval' reads no such field; its fields: "
                                        "article, highlights"):
        check_columns({"artcle": "text"}, ("article", "highlights"), "summary_eval")


BROKEN = '{"article": "An article that never ends'  # json: "Unterminated string starting at" column 13


def _jsonl_with_a_broken_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = [json.dumps({"article": f"Article {i}.", "highlights": f"Summary {i}."}) for i in range(3)]
    path.write_text("\n".join([good[0], BROKEN, "", *good[1:]]) + "\n", encoding="utf-8")
    return path


def test_a_broken_jsonl_line_stops_reading_unless_bad_rows_are_skipped(tmp_path):
    path = _jsonl_with_a_broken_line(tmp_path)
    message = f"{path}: line 2: malformed JSON (Unterminated string starting at column 13)"
    with pytest.raises(UserError) as err:
        read_records(path, required=("article",))  # training without --skip-bad-rows: stop, naming the line
    assert str(err.value) == message
    bad = BadRows()
    rows = read_records(path, required=("article",), skip_bad_rows=True, bad_rows=bad)
    assert [r["article"] for r in rows] == ["Article 0.", "Article 1.", "Article 2."]  # its neighbours are read
    assert bad.count == 1 and bad.reasons == [message]


def test_read_rows_gives_each_row_with_where_it_is_and_a_broken_line_in_place(tmp_path):
    rows = read_rows(_jsonl_with_a_broken_line(tmp_path))
    assert [where for where, _ in rows] == ["line 1", "line 2", "line 4", "line 5"]  # blank line 3 is no row
    assert isinstance(rows[1][1], UserError) and rows[2][1] == {"article": "Article 1.", "highlights": "Summary 1."}


def test_json_messages_say_at_once(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"article": "x"}, {"article": "y', encoding="utf-8")
    with pytest.raises(UserError, match=r"malformed JSON \(Unterminated string starting at line 1, column 32\)$"):
        read_records(path)
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads('{"a" 1}')
    assert json_error(err.value) == "Expecting ':' delimiter at line 1, column 6"
    assert json_error(err.value, line=False) == "Expecting ':' delimiter at column 6"


def test_a_csv_row_with_more_cells_than_the_header_is_a_bad_row_not_a_crash(tmp_path):
    path = tmp_path / "class.csv"
    path.write_text("article,summary\nAn article.,A summary.\nAn article of 20,000 words.,Its summary.\n"
                    "Another article.,Another summary.\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"class.csv: row 3: 1 more cell\(s\) than the header has columns"):
        read_records(path, required=("article", "summary"))
    bad = BadRows()
    rows = read_records(path, required=("article", "summary"), skip_bad_rows=True, bad_rows=bad)
    assert [r["article"] for r in rows] == ["An article.", "Another article."] and bad.count == 1
