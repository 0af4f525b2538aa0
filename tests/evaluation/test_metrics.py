"""Agreement and classification metrics against scipy and hand computations."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from gemma_lowmem.evaluation import agreement, classification_metrics, quadratic_weighted_kappa


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 100, size=60)
    pred = target + rng.normal(0, 20, size=60)
    if ties:  # whole-number scores, as the rubric gives, tie a lot
        target, pred = np.round(target / 10) * 10, np.round(pred / 10) * 10
    out = agreement(pred.tolist(), target.tolist(), max_score=100)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(pred, target)[0], abs=1e-12)
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(pred, target)[0], abs=1e-12)
    assert out["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(pred, target, variant="b")[0], abs=1e-12)
    assert out["mae"] == pytest.approx(np.abs(pred - target).mean())
    assert out["rmse"] == pytest.approx(np.sqrt(((pred - target) ** 2).mean()))


def test_qwk_hand_example() -> None:
    # Observed pairs (0,0), (1,2), (2,2), (2,1); weights (i-j)^2/4; both marginals [1, 1, 2].
    # sum W*O = 0.25 + 0.25 = 0.5; sum W*E = (0.25 + 2 + 0.25 + 0.5 + 2 + 0.5) / 4 = 1.375; kappa = 1 - 0.5/1.375.
    assert quadratic_weighted_kappa([0, 1, 2, 2], [0, 2, 2, 1], 0, 2) == pytest.approx(7 / 11)


def test_qwk_limits_and_errors() -> None:
    assert quadratic_weighted_kappa([1, 2, 3], [1, 2, 3], 1, 3) == pytest.approx(1.0)
    assert quadratic_weighted_kappa([1, 3], [3, 1], 1, 3) == pytest.approx(-1.0)
    assert quadratic_weighted_kappa([2, 2], [2, 2], 1, 3) is None  # chance agreement is perfect: undefined
    assert quadratic_weighted_kappa([], [], 0, 4) is None
    with pytest.raises(ValueError):
        quadratic_weighted_kappa([0, 5], [0, 1], 0, 4)
    with pytest.raises(ValueError):
        quadratic_weighted_kappa([0.5], [1], 0, 4)
    with pytest.raises(ValueError):
        quadratic_weighted_kappa([0, 1], [1], 0, 4)


def test_agreement_qwk_uses_ten_point_bins() -> None:
    # max 40: bins of 4 points; 31.9 -> 8, 33.9 -> 8, 2 -> 1 (half up), 40 -> 10, 45 (out of range) -> 10.
    pred, target = [31.9, 2.0, 45.0, 10.0], [33.9, 2.0, 40.0, 10.0]
    expected = quadratic_weighted_kappa([8, 1, 10, 3], [8, 1, 10, 3], 0, 10)
    assert agreement(pred, target, max_score=40)["qwk"] == pytest.approx(expected) == pytest.approx(1.0)
    shifted = agreement([30.0, 2.0, 40.0, 10.0], target, max_score=40)["qwk"]
    assert shifted == pytest.approx(quadratic_weighted_kappa([8, 1, 10, 3], [8, 1, 10, 3], 0, 10))
    assert agreement([20.0, 2.0, 40.0, 10.0], target, max_score=40)["qwk"] < 1.0


def test_agreement_invalid_predictions_are_excluded() -> None:
    out = agreement([None, 10.0, float("nan"), 30.0, 50.0], [99.0, 12.0, 99.0, 30.0, 40.0], max_score=100)
    assert (out["n"], out["n_valid"], out["valid_rate"]) == (5, 3, 0.6)
    assert out["mae"] == pytest.approx((2 + 0 + 10) / 3)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr([10, 30, 50], [12, 30, 40])[0])


@pytest.mark.parametrize(
    "pred, target",
    [
        ([], []),
        ([None, None], [1.0, 2.0]),
        ([5.0], [3.0]),
        ([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]),
        ([1.0, 2.0], [4.0, 4.0]),
    ],
)
def test_agreement_degenerate_inputs_give_none(pred: list, target: list) -> None:
    out = agreement(pred, target, max_score=10)
    for key in ("pearson", "spearman", "kendall_tau"):
        assert out[key] is None
    json.dumps(out)  # never NaN: the dict serialises
    for value in out.values():
        assert value is None or math.isfinite(value)
    if not any(v is not None for v in pred):
        assert out["mae"] is None and out["qwk"] is None


def test_agreement_errors() -> None:
    with pytest.raises(ValueError):
        agreement([1.0], [1.0, 2.0], max_score=10)
    with pytest.raises(ValueError):
        agreement([1.0], [float("nan")], max_score=10)
    with pytest.raises(ValueError):
        agreement([1.0], [1.0], max_score=0)


def test_classification_hand_example() -> None:
    pred = ["a", "b", None, "z", "a"]  # None and the unknown "z" are invalid
    true = ["a", "b", "b", "a", "b"]
    out = classification_metrics(pred, true, ["a", "b"])
    assert out["columns"] == ["a", "b", "invalid"]
    assert out["confusion_matrix"] == [[1, 0, 1], [1, 1, 1]]
    assert out["accuracy"] == pytest.approx(2 / 5)
    assert out["n_invalid"] == 2
    a, b = out["per_class"]["a"], out["per_class"]["b"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    # b: precision 1/1, recall 1/3, F1 = 2 * 1 * (1/3) / (4/3) = 0.5
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((1.0, 1 / 3, 0.5, 3))
    assert out["macro_f1"] == pytest.approx(0.5)


def test_classification_class_never_predicted_scores_zero() -> None:
    out = classification_metrics([0, 0, 0], [0, 1, 2], [0, 1, 2])
    assert out["per_class"][1] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert out["per_class"][0]["precision"] == pytest.approx(1 / 3)
    assert out["macro_f1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert out["accuracy"] == pytest.approx(1 / 3)


def test_classification_errors() -> None:
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["c"], ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["a"], ["a", "a"])
