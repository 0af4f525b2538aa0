"""Column mapping in the record readers: copy semantics, swaps, and a word when a mapped column is nowhere."""

from __future__ import annotations

import json
import logging

import pytest

from gemma_lowmem.data.records import apply_columns, check_columns, read_records
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
