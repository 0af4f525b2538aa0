"""Evaluation reports: JSON, Markdown tables with systems side by side, examples, and PNG plots."""

import json
import math

import numpy as np
import pytest

from gemma_lowmem.evaluation.report import format_value, plot, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _system(mae: float, valid_rate: float, generated: str) -> dict:
    return {
        "n": 2,
        "metrics": {"n": 2, "valid_rate": valid_rate,
                    "agreement": {"total": {"mae": mae, "qwk": None}, "coverage": {"mae": mae / 2, "qwk": 0.5}},
                    "confusion_matrix": [[1, 0], [0, 1]]},
        "plots": {"scatter_total": {"kind": "scatter", "x": [10, 80], "y": [20.0, 70.0], "xlabel": "target total",
                                    "ylabel": "predicted total", "limits": [0, 100]}},
        "examples": [{"index": 0, "prompt_excerpt": "Evaluate this summary.", "generated": generated,
                      "target_text": "**Total score: 80/100**", "row": {"id": "a", "ok": valid_rate > 0}}],
    }


def _table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


def test_two_systems_side_by_side(tmp_path):
    report = {"settings": {"task": "summary_eval", "model": {"quant": "int8"}},
              "systems": {"base": _system(31.25, 0.5, "garbage"), "adapter": _system(4.5, 1.0, "Total: 80/100")}}
    json_path, md_path = write_report(report, tmp_path, "Evaluation: summary_eval")
    assert json.loads(json_path.read_text(encoding="utf-8")) == report
    md = md_path.read_text(encoding="utf-8")
    rows = _table_rows(md)
    assert ["metric", "base", "adapter"] in rows
    assert ["valid_rate", "0.5", "1"] in rows
    assert ["total.mae", "31.25", "4.5"] in rows and ["total.qwk", "n/a", "n/a"] in rows
    assert ["model.quant", "int8"] in rows
    assert "confusion_matrix" not in md  # lists stay in report.json
    for name in ("base", "adapter"):
        png = tmp_path / f"{name}_scatter_total.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and f"]({png.name})" in md
    assert "Generated (base): id: a · ok: yes" in md and "Generated (adapter)" in md
    assert md.index("garbage") < md.index("Total: 80/100")  # one example block, both systems' answers


def test_single_system_report_as_matrix(tmp_path):
    _, md_path = write_report(_system(12.0, 1.0, "x"), tmp_path, "One")
    rows = _table_rows(md_path.read_text(encoding="utf-8"))
    assert ["", "mae", "qwk"] in rows and ["total", "12", "n/a"] in rows and ["coverage", "6", "0.5"] in rows
    assert (tmp_path / "scatter_total.png").is_file()


def test_json_is_strict_and_numpy_values_are_plain(tmp_path):
    report = {"metrics": {"a": float("nan"), "b": np.float32(0.25), "c": np.arange(3), "d": math.inf}}
    json_path, md_path = write_report(report, tmp_path, "T")
    data = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["metrics"] == {"a": None, "b": 0.25, "c": [0, 1, 2], "d": None}
    assert ["a", "n/a"] in _table_rows(md_path.read_text())


def test_generated_text_cannot_break_out_of_its_fence(tmp_path):
    report = _system(1.0, 1.0, "```\n# not a heading\n```")
    _, md_path = write_report(report, tmp_path, "T")
    md = md_path.read_text()
    assert "````\n```\n# not a heading\n```\n````" in md


def test_extra_tables(tmp_path):
    report = {"systems": {"a": {"metrics": {"n": 1}}},
              "tables": [{"title": "Correlations", "columns": ["metric", "relevance"], "rows": [["total", "**0.5**"],
                                                                                                ["rouge1", 0.125]],
                          "note": "per document"}]}
    _, md_path = write_report(report, tmp_path, "T")
    md = md_path.read_text()
    assert "### Correlations" in md and "| total | **0.5** |" in md and "| rouge1 | 0.125 |" in md
    assert "per document" in md


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "scatter", "x": [], "y": [], "limits": [0, 100]},
        {"kind": "confusion", "matrix": [[3, 1, 0], [0, 2, 1]], "labels": ["a", "b"], "columns": ["a", "b", "invalid"]},
        {"kind": "bar", "labels": ["x", "y"], "series": {"target": [1, 2], "predicted": [None, 1.5]}},
        {"kind": "bar", "labels": ["x"], "values": [3]},
        {"kind": "line", "x": [1, 2, 3], "series": {"loss": [3, 2, 1]}, "title": "curve"},
    ],
    ids=["scatter-empty", "confusion", "bar", "bar-values", "line"],
)
def test_plot_kinds_write_png(tmp_path, spec):
    path = plot(spec, tmp_path / "p.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_bad_plot_specs(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        plot({"kind": "pie"}, tmp_path / "p.png")
    with pytest.raises(ValueError, match="lacks y"):
        plot({"kind": "scatter", "x": [1]}, tmp_path / "p.png")
    with pytest.raises(ValueError, match="2 x values but 1 y"):
        plot({"kind": "scatter", "x": [1, 2], "y": [1]}, tmp_path / "p.png")


def test_format_value():
    assert [format_value(v) for v in (None, True, 12345, 0.123456, 100.0, 12345.678, "a|b")] == [
        "n/a", "yes", "12,345", "0.1235", "100", "12,345.7", "a\\|b"]
