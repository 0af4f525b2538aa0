"""Summary-level correlations with human judgments, and the SummEval-style reader, against hand-computed values."""

import json
import math

import numpy as np
import pytest

from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.human import (
    correlation_matrix,
    kendall_tau,
    read_judgments,
    spearman,
    summary_level_correlations,
)


def test_summary_level_correlation_hand_computed():
    # Document A: metric 1,2,3 vs human 1,3,2: rho = 1 - 6*2/(3*8) = 0.5; tau = (2 concordant - 1 discordant)/3.
    # Document B: metric 3,1,2 vs human 1,3,2 (the 4th summary's answer was unreadable): every pair discordant,
    # rho = 1 - 6*8/24 = -1, tau = -1. Document C: constant metric, undefined: left out.
    docs = ["A", "A", "A", "B", "B", "B", "B", "C", "C"]
    metric = [1, 2, 3, 3, 1, 2, None, 2, 2]
    human = [1, 3, 2, 1, 3, 2, 5, 1, 3]
    result = summary_level_correlations(docs, metric, human)
    assert result["spearman"] == pytest.approx((0.5 - 1) / 2)
    assert result["kendall"] == pytest.approx((1 / 3 - 1) / 2)
    assert (result["documents"], result["documents_total"]) == (2, 3)


def test_rank_correlations_with_ties_hand_computed():
    # x ties its first two: ranks 1.5, 1.5, 3; centred (-.5, -.5, 1) . (-1, 0, 1) = 1.5 over sqrt(1.5 * 2).
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    # tau-b: 2 concordant pairs, 0 discordant; 2 pairs untied in x, 3 in y.
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert spearman([1, 2], [3, 3]) is None and kendall_tau([5], [1]) is None


def test_rank_correlations_match_scipy_on_tied_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.integers(0, 5, 17).astype(float), rng.integers(0, 4, 17).astype(float)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_no_defined_document_gives_none():
    result = summary_level_correlations(["a", "a", "b"], [None, 3.0, 1.0], [1, 2, 3])
    assert result == {"spearman": None, "kendall": None, "documents": 0, "documents_total": 2}
    with pytest.raises(ValueError, match="lengths differ"):
        summary_level_correlations(["a"], [1.0, 2.0], [1.0])


def test_correlation_matrix_shape():
    matrix = correlation_matrix(["a"] * 3, {"m": [1, 2, 3]}, {"h1": [1, 2, 3], "h2": [3, 2, 1]})
    assert matrix["m"]["h1"]["spearman"] == pytest.approx(1.0) and matrix["m"]["h2"]["kendall"] == pytest.approx(-1)


def _row(doc="d1", system="M1", **changes):
    row = {"doc_id": doc, "system_id": system, "article": "The article.", "summary": "A summary.",
           "references": ["First reference.", "Second."], "coherence": 4.333, "consistency": 5, "fluency": 4,
           "relevance": 3.5}
    row.update(changes)
    return row


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" if r is not None else "\n" for r in rows), encoding="utf-8")
    return path


def test_read_judgments(tmp_path):
    path = _write(tmp_path / "j.jsonl", [_row(), None, _row(system=7, references="Only one.")])
    first, second = read_judgments(path)
    assert first.reference == "First reference." and first.ratings["coherence"] == 4.333
    assert first.mean_rating == pytest.approx((4.333 + 5 + 4 + 3.5) / 4)
    assert second.system_id == "7" and second.reference == "Only one." and second.where.endswith("line 3")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({k: v for k, v in _row().items() if k != "relevance"}, "line 3: missing field 'relevance'"),
        (_row(fluency=7), "line 3: field 'fluency' = 7 is outside the rating scale 1-5"),
        (_row(coherence="good"), "line 3: field 'coherence' must be a number"),
        (_row(references=[]), "line 3: field 'references' must be a non-empty list"),
        (_row(summary=3), "line 3: field 'summary' must be text"),
        (_row(), "line 3: doc_id 'd1' with system_id 'M1' was already given at line 1"),
    ],
    ids=["missing", "range", "type", "no-reference", "summary-type", "duplicate"],
)
def test_bad_judgment_rows_name_file_line_and_field(tmp_path, row, expected):
    path = _write(tmp_path / "j.jsonl", [_row(), None, row])  # a blank line 2: line numbers must still be right
    with pytest.raises(UserError) as err:
        read_judgments(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_judgments_must_be_jsonl(tmp_path):
    path = tmp_path / "j.csv"
    path.write_text("doc_id\n1\n")
    with pytest.raises(UserError, match=r"\.jsonl"):
        read_judgments(path)
