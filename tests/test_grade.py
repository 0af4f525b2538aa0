"""Grading: the Python API on a tiny random model, files in and out (resume, bad rows, atomic rewrite, --columns, a
broken JSONL line), the script's flags (--columns, --max-mem), its --help (no torch imported) and one-line errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.tokenize import render
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.guided import Decoding
from gemma_lowmem.grading import (
    Grade,
    grade,
    grade_columns,
    grade_file,
    grading_prompts,
    read_grading_input,
)
from gemma_lowmem.tasks import essay, summary_eval
from gemma_lowmem.tasks.essay_rubric import ESSAY_RUBRIC
from gemma_lowmem.tasks.summary_eval import evaluation_prompt
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from tests.tiny import tiny_gemma3, tiny_tokenizer

CRITERIA = SUMMARY_RUBRIC.criteria
ARTICLE = "The city opened a new library on Monday. It has 20,000 books. The mayor spoke at the opening."
SLOTS = {"comment": 3, "feedback": 3, "suggestions": 3}
ROOT = Path(__file__).resolve().parents[1]


def _rows(n: int, reference: bool = True) -> list[dict]:
    return [{"id": f"s{i}", "article": ARTICLE, "summary": "A library opened." * (i % 2),
             **({"reference": "A new library opened."} if reference else {})} for i in range(n)]


@pytest.mark.parametrize("mode", ["guided", "scores"])
def test_grade_gives_every_score_with_and_without_a_reference(mode, monkeypatch):
    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", SLOTS)
    rows = _rows(2) + _rows(1, reference=False)
    grades = grade(tiny_gemma3(), tiny_tokenizer(), rows, DataConfig(),
                   Decoding(mode=mode, batch_size=2, show_progress=False))
    assert [g.id for g in grades] == ["s0", "s1", "s0"]
    for g in grades:
        assert g.valid and g.mode == mode and set(g.scores) == set(CRITERIA)
        assert g.total == sum(g.scores.values())
        assert all(0 <= g.expected[k] <= CRITERIA[k][0] for k in CRITERIA)
        columns = g.columns()
        assert columns["total"] == g.total and {f"{k}_expected" for k in CRITERIA} <= set(columns)


def test_a_row_without_reference_gets_a_request_without_a_reference_section():
    with_ref = evaluation_prompt(ARTICLE, "S.", "A new library opened.", "ko")[-1]["content"]
    without = evaluation_prompt(ARTICLE, "S.", None, "ko")[-1]["content"]
    assert "참고 요약:\n" in with_ref and "참고 요약:\n" not in without
    assert evaluation_prompt(ARTICLE, "S.", "", "en")[-1]["content"] == evaluation_prompt(
        ARTICLE, "S.", None, "en")[-1]["content"]
    prompts = grading_prompts(tiny_tokenizer(), _rows(1, reference=False), DataConfig(lang="en"), system_role=False)
    assert "Reference summary" not in prompts[0] and ARTICLE in prompts[0]


def _fake_grades(rows):
    return [Grade(id=r["id"], valid=True, total=50, expected_total=50.5, scores=dict.fromkeys(CRITERIA, 1),
                  expected=dict.fromkeys(CRITERIA, 1.25), comments=dict.fromkeys(CRITERIA), feedback="ok",
                  suggestions="- more", answer="text", mode="guided") for r in rows]


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "article", "summary", "reference"])
        writer.writeheader()
        writer.writerows(rows)


def test_file_grading_skips_bad_rows_resumes_and_keeps_the_format(tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    rows = _rows(5)
    rows[2]["article"] = ""  # bad: named by row and field
    rows[3]["id"] = ""  # no id: row-4
    _write_csv(src, rows)
    calls = []

    def interrupted(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_grades(batch)

    data = read_grading_input(src, out)
    assert data.bad_rows.count == 1 and "row 3: field 'article'" in data.bad_rows.reasons[0]
    assert [r["id"] for r in data.rows] == ["s0", "s1", "row-4", "s4"]
    with pytest.raises(KeyboardInterrupt):
        grade_file(data, out, interrupted, batch_size=2, show_progress=False)
    with open(out, encoding="utf-8") as f:
        first = list(csv.DictReader(f))
    assert [r["id"] for r in first] == ["s0", "s1"] and first[0]["total"] == "50"  # the finished batch survived
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    resumed = read_grading_input(src, out)
    assert [r["id"] for r in resumed.todo] == ["row-4", "s4"]
    summary = grade_file(resumed, out, _fake_grades, batch_size=2, show_progress=False)
    assert (summary.graded, summary.resumed) == (2, 2)
    with open(out, encoding="utf-8") as f:
        final = list(csv.DictReader(f))
    assert [r["id"] for r in final] == ["s0", "s1", "row-4", "s4"]
    assert {"coverage", "coverage_expected", "coverage_comment", "feedback", "answer"} <= set(final[0])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_formats_round_trip(tmp_path, suffix):
    pytest.importorskip("pyarrow") if suffix == ".parquet" else None
    src, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in _rows(3)), encoding="utf-8")
    else:
        import pandas as pd

        pd.DataFrame(_rows(3)).to_parquet(src)
    grade_file(read_grading_input(src, out), out, _fake_grades, show_progress=False)
    assert read_grading_input(src, out).todo == []


def test_input_errors_are_one_line_user_errors(tmp_path):
    src = tmp_path / "in.csv"
    _write_csv(src, _rows(1))
    with pytest.raises(UserError, match="input's format"):
        read_grading_input(src, tmp_path / "out.jsonl")
    other = tmp_path / "other.csv"
    _write_csv(other, _rows(1))
    with pytest.raises(UserError, match="not a grading output"):
        read_grading_input(src, other)
    empty = tmp_path / "empty.csv"
    _write_csv(empty, [{"id": "x", "article": "", "summary": "s", "reference": ""}])
    with pytest.raises(UserError, match="no row to grade"):
        read_grading_input(empty, tmp_path / "o.csv")


def test_script_checks_its_arguments_before_loading_a_model(tmp_path):
    from scripts.grade import main

    with pytest.raises(UserError, match="--input needs --output"):
        main(["--input", str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="ARTICLE SUMMARY"):
        main(["--text", "only one"])
    with pytest.raises(UserError, match="no such file"):
        main(["--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o.csv")])
    with pytest.raises(UserError, match="not an adapter folder"):
        main(["--text", "a", "b", "--adapter", str(tmp_path)])


# ------------------------------------------------------------------------------------- --columns, bad lines, script


def _write_teacher_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _teacher_rows(n: int) -> list[dict]:
    return [{"text": ARTICLE, "summary": f"A library opened ({i}).", "reference": "A new library opened."}
            for i in range(n)]


def test_columns_read_a_teachers_file_and_the_output_keeps_its_names(tmp_path):
    src, out = tmp_path / "teacher.csv", tmp_path / "graded.csv"
    _write_teacher_csv(src, _teacher_rows(3))
    data = read_grading_input(src, out, {"article": "text"})
    assert [(r["id"], r["article"]) for r in data.rows] == [(f"row-{i}", ARTICLE) for i in (1, 2, 3)]
    grade_file(data, out, _fake_grades, batch_size=2, show_progress=False)
    graded = _read_csv(out)
    assert list(graded[0])[:4] == ["id", "text", "summary", "reference"] and "article" not in graded[0]
    assert graded[2]["text"] == ARTICLE and graded[2]["summary"] == "A library opened (2)."
    assert read_grading_input(src, out, {"article": "text"}).todo == []  # resume by id


def test_a_mapped_id_column_names_the_output_rows_and_a_resume_reads_it(tmp_path):
    src, out = tmp_path / "teacher.csv", tmp_path / "graded.csv"
    _write_teacher_csv(src, [{"student": f"st{i}", **r} for i, r in enumerate(_teacher_rows(3))])
    columns = {"article": "text", "id": "student"}
    data = read_grading_input(src, out, columns)
    grade_file(data, out, _fake_grades, batch_size=2, show_progress=False)
    graded = _read_csv(out)
    assert [r["student"] for r in graded] == ["st0", "st1", "st2"] and "id" not in graded[0]
    assert read_grading_input(src, out, columns).todo == []
    with pytest.raises(UserError, match="no 'id' column .* give the --columns of the run that wrote it"):
        read_grading_input(src, out, {"article": "text"})  # resumed without the id mapping: not silently regraded


def test_a_column_named_like_a_grade_column_keeps_the_fields_name(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"article": ARTICLE, "answer": "The student's summary."}) + "\n", encoding="utf-8")
    grade_file(read_grading_input(src, out, {"summary": "answer"}), out, _fake_grades, show_progress=False)
    graded = json.loads(out.read_text(encoding="utf-8"))
    assert graded["summary"] == "The student's summary." and graded["answer"] == "text"  # the model's answer
    assert list(_fake_grades([{"id": "x"}])[0].columns()) == list(grade_columns(SUMMARY_RUBRIC))


def test_a_missing_field_names_the_row_and_the_columns_flag(tmp_path):
    src = tmp_path / "teacher.csv"
    _write_teacher_csv(src, _teacher_rows(2))
    with pytest.raises(UserError, match=r"row 1: missing field 'article' \(fields present: text, summary, "
                                        r"reference\); if your data calls it otherwise, map it: --columns "
                                        r"article=YOUR_COLUMN"):
        read_grading_input(src, tmp_path / "out.csv")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [*_teacher_rows(2), {"body": ARTICLE, "summary": ""}]),
                     encoding="utf-8")
    data = read_grading_input(jsonl, tmp_path / "out.jsonl", {"article": "text"})
    assert len(data.rows) == 2 and data.bad_rows.count == 1
    assert data.bad_rows.reasons[0] == (f"{jsonl}: row 3: missing field 'article' (fields present: body, summary); "
                                        "--columns article=text names a column this row lacks")
    with pytest.raises(UserError, match="--columns artcle=text: task 'grading' reads no such field; its fields: "
                                        "id, article, summary, reference"):
        read_grading_input(jsonl, tmp_path / "out.jsonl", {"artcle": "text"})


def test_a_broken_jsonl_line_is_named_skipped_and_counted_and_the_rest_graded(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in _rows(3, reference=False)]
    lines[1] = '{"article": "' + "x" * 20  # cut short: json's "Unterminated string starting at"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = read_grading_input(src, out)
    assert data.bad_rows.count == 1
    assert data.bad_rows.reasons == [f"{src}: line 2: malformed JSON (Unterminated string starting at column 13)"]
    assert [r["id"] for r in data.todo] == ["s0", "s2"]
    summary = grade_file(data, out, _fake_grades, show_progress=False)
    assert summary.graded == 2 and summary.bad_rows.count == 1
    assert [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()] == ["s0", "s2"]


def test_rows_without_ids_keep_their_numbers_around_a_broken_line(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [json.dumps({"article": ARTICLE, "summary": f"S{i}."}) for i in range(3)]
    src.write_text("\n".join([rows[0], "{not json", *rows[1:]]) + "\n", encoding="utf-8")
    data = read_grading_input(src, tmp_path / "out.jsonl")
    assert [r["id"] for r in data.rows] == ["row-1", "row-3", "row-4"]  # fixing line 2 later moves no id


def test_help_shows_choices_examples_and_each_default_once():
    from scripts.grade import build_parser

    text = build_parser().format_help()
    for needle in ("--lang {ko,en}", "--mode {guided,scores,free}", "--precision {auto,bf16,fp32}",
                   "--columns FIELD=COLUMN", "--max-mem SIZE", "Examples:", "--columns article=text",
                   '--text "ARTICLE TEXT" "STUDENT SUMMARY"'):
        assert needle in text, needle
    assert " STR" not in text and "==SUPPRESS==" not in text
    for action in build_parser()._actions:
        assert (action.help or "").count("default") <= 1, action.help  # no "(default: x) (default: x)"
    flat = " ".join(text.split())
    assert "(default 8GB)" in flat
    for task in (summary_eval.TASK, essay.TASK):  # what --columns may map, per task
        assert f"{task.name}: {', '.join(task.request.fields)}" in flat


def test_help_and_parsing_import_no_torch():
    """--help is fast because it imports nothing heavy: checked by what is imported, not by a clock."""
    code = ("import sys\n"
            "from scripts.grade import build_parser\n"
            "build_parser().parse_args(['--input', 'a.csv', '--output', 'b.csv', '--columns', 'article=text'])\n"
            "try:\n"
            "    build_parser().parse_args(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    shown = subprocess.run([sys.executable, "-X", "importtime", "scripts/grade.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "Examples:" in shown.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "transformers" not in imported


def test_columns_and_max_mem_flags_parse_as_in_training():
    from gemma_lowmem.config import EvalConfig, TrainConfig
    from gemma_lowmem.evaluation.guided import MODES
    from scripts.grade import build_parser

    parser = build_parser()
    args = parser.parse_args(["--input", "a.csv", "--output", "b.csv", "--columns", "article=text", "id=student",
                              "--columns", "reference=ref"])
    assert args.columns == {"article": "text", "id": "student", "reference": "ref"}
    assert args.max_mem == TrainConfig().max_mem and set(parser._option_string_actions["--mode"].choices) == set(MODES)
    assert EvalConfig().mode == parser.get_default("mode")
    for bad in (["--columns", "article"], ["--columns", "article=text", "article=body"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--input", "a.csv", "--output", "b.csv", *bad])


def test_script_checks_columns_and_max_mem_before_loading_a_model(tmp_path, monkeypatch):
    from scripts.grade import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("gemma_lowmem.model.load_base_model", no_model)
    src = tmp_path / "teacher.csv"
    _write_teacher_csv(src, _teacher_rows(1))
    with pytest.raises(UserError, match="--columns names the columns of an --input file"):
        main(["--text", "a", "b", "--columns", "article=text"])
    with pytest.raises(UserError, match="--max-mem '8 apples' is not a size"):
        main(["--input", str(src), "--output", str(tmp_path / "o.csv"), "--max-mem", "8 apples"])
    with pytest.raises(UserError, match=r"no row to grade .*map it: --columns article=YOUR_COLUMN"):
        main(["--input", str(src), "--output", str(tmp_path / "o.csv")])


def test_script_grades_a_teachers_file_within_max_mem(tmp_path, monkeypatch, one_thread):
    """The whole script on a tiny random model: --columns in, the user's names out, --max-mem reaching the cache."""
    import gemma_lowmem.grading
    import gemma_lowmem.model
    from scripts.grade import main

    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", SLOTS)
    monkeypatch.setattr(gemma_lowmem.model, "resolve_model_path", lambda name: name)
    monkeypatch.setattr(gemma_lowmem.model, "load_tokenizer", lambda path: tiny_tokenizer())
    monkeypatch.setattr(gemma_lowmem.model, "load_base_model", lambda cfg, device, precision: tiny_gemma3())
    budgets = []
    real_cache = gemma_lowmem.grading.float_weight_cache

    def cache(model, *, budget=None, max_bytes=None):
        budgets.append(budget)
        return real_cache(model, budget=budget, max_bytes=max_bytes)

    monkeypatch.setattr(gemma_lowmem.grading, "float_weight_cache", cache)
    src, out = tmp_path / "teacher.csv", tmp_path / "graded.csv"
    _write_teacher_csv(src, _teacher_rows(2))
    main(["--input", str(src), "--output", str(out), "--columns", "article=text", "--mode", "scores", "--lang", "en",
          "--max-mem", "3GB", "--no-progress"])
    graded = _read_csv(out)
    assert [r["text"] for r in graded] == [ARTICLE, ARTICLE] and all(r["total"] for r in graded)
    assert budgets == [3 * 10**9]


# ---------------------------------------------------------------------------------------------- any rubric task


ESSAY = ("Schools should start later in the morning.    Teenagers sleep late and learn badly at eight o'clock.    "
         "Some say buses cost more, but the gain in learning is worth it.")


def _essay_rows() -> list[dict]:
    return [{"student": "kim", "full_text": ESSAY, "prompt": "Should  schools\nstart later?"},
            {"student": "lee", "prompt": "Should schools start later?"},  # no essay: named and skipped
            {"student": "park", "full_text": ESSAY + " Sleep matters."}]


def test_grading_serves_only_tasks_with_a_rubric_and_a_request():
    from gemma_lowmem.grading import grading_task

    assert grading_task("essay") is essay.TASK and grading_task("summary_eval") is summary_eval.TASK
    with pytest.raises(UserError, match="--task topic: grading needs a task with a rubric and a request prompt; "
                                        "these have both: summary_eval, essay"):
        grading_task("topic")
    with pytest.raises(UserError, match="unknown task 'esay'"):
        grading_task("esay")


def test_essay_rows_are_read_checked_and_prompted_as_the_essay_task_trains(tmp_path):
    src = tmp_path / "essays.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _essay_rows()), encoding="utf-8")
    columns = {"essay": "full_text", "id": "student"}
    data = read_grading_input(src, tmp_path / "out.jsonl", columns, essay.TASK)
    assert [r["id"] for r in data.rows] == ["kim", "park"] and data.names == {"id": "student", "essay": "full_text",
                                                                              "prompt": "prompt"}
    assert data.bad_rows.reasons == [f"{src}: row 2: missing field 'essay' (fields present: student, prompt); "
                                     "--columns essay=full_text names a column this row lacks"]
    with pytest.raises(UserError, match="task 'grading' reads no such field; its fields: id, essay, prompt"):
        read_grading_input(src, tmp_path / "out.jsonl", {"article": "full_text"}, essay.TASK)
    prompts = grading_prompts(tiny_tokenizer(), data.rows, DataConfig(task="essay", lang="en"), system_role=False)
    expected = essay.scoring_prompt(essay.clean_essay(ESSAY), "Should schools start later?", "en")
    assert prompts[0] == render(tiny_tokenizer(), expected, add_generation_prompt=True, system_role=False)
    assert "Task:" not in prompts[1] and "Sleep matters." in prompts[1]  # no prompt: no task section


def test_script_grades_essays_with_the_same_command_resume_and_bad_rows(tmp_path, monkeypatch, one_thread,
                                                                        capsys):
    """``grade.py --task essay`` on a tiny random model: the essay rubric's columns, a bad row skipped, a resume."""
    import gemma_lowmem.model
    from scripts.grade import main

    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", SLOTS)
    monkeypatch.setattr(gemma_lowmem.model, "resolve_model_path", lambda name: name)
    monkeypatch.setattr(gemma_lowmem.model, "load_tokenizer", lambda path: tiny_tokenizer())
    monkeypatch.setattr(gemma_lowmem.model, "load_base_model", lambda cfg, device, precision: tiny_gemma3())
    src, out = tmp_path / "essays.csv", tmp_path / "graded.csv"
    rows = _essay_rows()
    _write_teacher_csv(src, [{"student": r["student"], "full_text": r.get("full_text", ""),
                              "prompt": r["prompt"] if "prompt" in r else ""} for r in rows[:2]])
    command = ["--task", "essay", "--input", str(src), "--output", str(out), "--columns", "essay=full_text",
               "id=student", "--lang", "en", "--no-progress"]
    main(command)
    assert "graded 1 rows (0 were graded already), 1 bad rows skipped, e.g. " in capsys.readouterr().out
    first = _read_csv(out)
    assert [r["student"] for r in first] == ["kim"] and list(first[0])[:3] == ["student", "full_text", "prompt"]
    assert list(first[0])[3:] == list(grade_columns(ESSAY_RUBRIC))
    assert first[0]["valid"] == "True"
    assert int(first[0]["total"]) == sum(int(first[0][k]) for k in ESSAY_RUBRIC.criteria)
    _write_teacher_csv(src, [{"student": r["student"], "full_text": r.get("full_text", ""),
                              "prompt": r.get("prompt", "")} for r in rows])
    main(command)  # resume: kim is kept as graded, lee is still bad, park is new
    assert "graded 1 rows (1 were graded already), 1 bad rows skipped" in capsys.readouterr().out
    second = _read_csv(out)
    assert [r["student"] for r in second] == ["kim", "park"] and second[0] == first[0]
    with pytest.raises(UserError, match=r"--text takes ESSAY \[PROMPT\] for --task essay; got 3 value\(s\)"):
        main(["--task", "essay", "--text", "a", "b", "c"])
    main(["--task", "essay", "--text", ESSAY, "Should schools start later?", "--lang", "en", "--mode", "scores"])
    answer = capsys.readouterr().out
    assert answer.startswith("Essay evaluation:") and '"valid": true' in answer
