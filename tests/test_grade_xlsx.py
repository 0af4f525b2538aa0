""".xlsx class lists: read like CSV (row 1 names the columns, empty cells are "", blank rows skipped), written as
text (a summary that starts with "=" is not a formula; control characters dropped), graded and resumed by
scripts/grade.py in the same format, with one-line errors for a file that is not a workbook."""

import pytest

from gemma_lowmem.data.records import read_records, read_rows
from gemma_lowmem.errors import UserError
from gemma_lowmem.grading import grade_file, read_grading_input, write_rows
from tests.fake_grades import ARTICLE, SLOTS, fake_grades
from tests.tiny import tiny_gemma3, tiny_tokenizer

openpyxl = pytest.importorskip("openpyxl", reason="openpyxl is not installed (the [test] and [app] extras have it)")


def _write_book(path, rows, sheets=1):
    book = openpyxl.Workbook()
    sheet = book.active
    for row in rows:
        sheet.append(row)
    for i in range(1, sheets):
        book.create_sheet(f"other{i}").append(["not", "read"])
    book.save(path)


def _read_book(path):
    sheet = openpyxl.load_workbook(path).worksheets[0]
    rows = list(sheet.iter_rows(values_only=True))
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def test_a_workbook_reads_like_a_csv_file(tmp_path):
    path = tmp_path / "class.xlsx"
    _write_book(path, [["학생", "본문", "요약", None],
                       ["kim", ARTICLE, "A library opened.", "note without a header"],
                       [None, None, None, None],  # blank: no row
                       [7, ARTICLE, None]], sheets=2)  # an empty cell is "", as in CSV; a number stays a number
    assert read_rows(path) == [
        ("row 2", {"학생": "kim", "본문": ARTICLE, "요약": "A library opened."}),
        ("row 4", {"학생": 7, "본문": ARTICLE, "요약": ""}),
    ]
    rows = read_records(path, required=("article",), columns={"article": "본문"})
    assert [r["article"] for r in rows] == [ARTICLE, ARTICLE]


def test_bad_workbooks_are_one_line_errors(tmp_path):
    fake = tmp_path / "class.xlsx"
    fake.write_text("article,summary\n", encoding="utf-8")  # a CSV renamed
    with pytest.raises(UserError, match=r"class.xlsx: not a readable .xlsx workbook .*save it from Excel as .xlsx"):
        read_rows(fake)
    twice = tmp_path / "twice.xlsx"
    _write_book(twice, [["article", "summary", "summary"], [ARTICLE, "a", "b"]])
    with pytest.raises(UserError, match="twice.xlsx: columns B and C are both named 'summary'; rename one"):
        read_rows(twice)
    with pytest.raises(UserError, match=r"unknown file type '.xls'; use one of .*\.xlsx"):
        (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0")
        read_rows(tmp_path / "old.xls")


def test_written_cells_are_text_never_formulas(tmp_path):
    path = tmp_path / "out.xlsx"
    write_rows(path, [{"id": "s1", "summary": "=HYPERLINK(\"http://x\")", "answer": "ok\x00\x07 done", "total": 50,
                       "valid": True, "feedback": None}])
    book = openpyxl.load_workbook(path)
    sheet = book.worksheets[0]
    assert sheet.title == "graded" and sheet["B2"].data_type == "s"
    assert _read_book(path) == [{"id": "s1", "summary": "=HYPERLINK(\"http://x\")", "answer": "ok done", "total": 50,
                                 "valid": True, "feedback": None}]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_class_list_is_graded_and_resumed_in_xlsx(tmp_path):
    src, out = tmp_path / "class.xlsx", tmp_path / "graded.xlsx"
    _write_book(src, [["student", "text", "summary"], ["kim", ARTICLE, "A library opened."], ["lee", "", "x"],
                      ["park", ARTICLE, None]])
    columns = {"article": "text", "id": "student"}
    data = read_grading_input(src, out, columns)
    assert data.bad_rows.count == 1 and "row 2: field 'article' is empty" in data.bad_rows.reasons[0]
    grade_file(data, out, fake_grades, batch_size=1, show_progress=False)
    graded = read_records(out)  # an empty summary comes back "" (Excel keeps no empty string: an empty cell)
    assert [(r["student"], r["summary"], r["total"]) for r in graded] == [("kim", "A library opened.", 50),
                                                                          ("park", "", 50)]
    assert read_grading_input(src, out, columns).todo == []  # resume reads the ids back from the workbook


def test_grade_script_reads_and_writes_xlsx(tmp_path, monkeypatch, one_thread):
    import gemma_lowmem.model
    from scripts.grade import main

    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", SLOTS)
    monkeypatch.setattr(gemma_lowmem.model, "resolve_model_path", lambda name: name)
    monkeypatch.setattr(gemma_lowmem.model, "load_tokenizer", lambda path: tiny_tokenizer())
    monkeypatch.setattr(gemma_lowmem.model, "load_base_model", lambda cfg, device, precision: tiny_gemma3())
    src, out = tmp_path / "class.xlsx", tmp_path / "graded.xlsx"
    _write_book(src, [["text", "summary"], [ARTICLE, "A library opened."]])
    main(["--input", str(src), "--output", str(out), "--columns", "article=text", "--mode", "scores", "--lang", "en",
          "--no-progress"])
    (row,) = _read_book(out)
    assert row["id"] == "row-1" and row["text"] == ARTICLE and isinstance(row["total"], int)
    with pytest.raises(UserError, match="write the input's format"):
        main(["--input", str(src), "--output", str(tmp_path / "graded.csv")])
