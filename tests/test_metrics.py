"""Metrics against independent computations: scikit-learn, pingouin, brute force, by hand."""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pandas as pd
import pingouin
import pytest
from sklearn.metrics import cohen_kappa_score

from cellnet.evaluation import metrics
from cellnet.classes import CLASSES
from cellnet.errors import CellnetError

# Shrout & Fleiss 1979, Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8],
                          [6, 1, 3, 2],
                          [8, 4, 6, 8],
                          [7, 1, 2, 6],
                          [10, 5, 6, 9],
                          [6, 2, 4, 7]], dtype=np.float64)


def noisy_scores(n: int, seed: int, noise: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n)
    return y, np.clip(y + rng.normal(0.0, noise, n), 0.0, 1.0)


def pingouin_icc(table: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> pd.DataFrame:
    monkeypatch.setitem(pingouin.options, "round.column.CI95", None)
    n, k = table.shape
    long = pd.DataFrame([(i, j, table[i, j]) for i in range(n) for j in range(k)],
                        columns=["target", "rater", "score"])
    return pingouin.intraclass_corr(long, targets="target", raters="rater",
                                    ratings="score").set_index("Type")


def brute_force_pk(y: np.ndarray, p: np.ndarray) -> float:
    concordant = discordant = tied_pred = 0
    for i, j in itertools.combinations(range(len(y)), 2):
        if y[i] == y[j]:
            continue
        if p[i] == p[j]:
            tied_pred += 1
        elif (y[i] < y[j]) == (p[i] < p[j]):
            concordant += 1
        else:
            discordant += 1
    total = concordant + discordant + tied_pred
    return (concordant + tied_pred / 2) / total if total else math.nan


# ------------------------------------------------------------------------------- Estimate


def test_estimate_formats_like_the_paper():
    e = metrics.Estimate(0.01312, 0.01149, 0.01508)
    assert str(e) == "0.013 [0.011-0.015]"
    assert e.as_dict() == {"value": 0.01312, "low": 0.01149, "high": 0.01508}
    with pytest.raises(AttributeError):
        e.value = 1.0


# -------------------------------------------------------------------------------- bins, kappa


def test_bins_are_closed_on_the_right():
    x = [0.0, 0.25, 0.2501, 0.5, 0.5001, 0.75, 0.7501, 1.0, -0.1, 1.2]
    assert metrics.to_bins4(x).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 3]
    with pytest.raises(CellnetError):
        metrics.to_bins4([0.3, float("nan")])


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_kappa_matches_sklearn_on_binned_scores(weights):
    y, p = noisy_scores(300, seed=3)
    expected = cohen_kappa_score(metrics.to_bins4(y), metrics.to_bins4(p), weights=weights)
    assert metrics.kappa(y, p, weights=weights) == pytest.approx(expected, abs=1e-12)


def test_kappa_is_nan_when_everything_is_in_one_bin():
    assert math.isnan(metrics.kappa([0.1, 0.2, 0.05], [0.0, 0.1, 0.2]))


# -------------------------------------------------------------------------------- bootstrap


def test_vectorised_intervals_equal_the_generic_bootstrap():
    y, p = noisy_scores(120, seed=4)
    assert metrics.mse_ci(y, p, n_boot=300, seed=7) == metrics.bootstrap_ci(
        metrics.mse, y, p, n_boot=300, seed=7)
    generic = metrics.bootstrap_ci(metrics.kappa, y, p, n_boot=300, seed=7)
    vectorised = metrics.kappa_ci(y, p, n_boot=300, seed=7)
    assert vectorised.value == pytest.approx(generic.value, abs=1e-12)
    assert vectorised.low == pytest.approx(generic.low, abs=1e-12)
    assert vectorised.high == pytest.approx(generic.high, abs=1e-12)


def test_bootstrap_interval_is_a_percentile_of_seeded_resamples():
    y, p = noisy_scores(80, seed=5)
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 80, size=(500, 80))
    samples = ((y[idx] - p[idx]) ** 2).mean(axis=1)
    e = metrics.mse_ci(y, p, n_boot=500, seed=11, level=0.9)
    assert e.value == pytest.approx(np.mean((y - p) ** 2))
    assert (e.low, e.high) == pytest.approx(tuple(np.percentile(samples, [5, 95])))
    assert metrics.mse_ci(y, p, n_boot=500, seed=12) != metrics.mse_ci(y, p, n_boot=500, seed=11)


@pytest.mark.parametrize("ci", [metrics.mse_ci, metrics.kappa_ci])
def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n(ci):
    small = ci(*noisy_scores(50, seed=6), n_boot=1000, seed=0)
    large = ci(*noisy_scores(1000, seed=6), n_boot=1000, seed=0)
    for e in (small, large):
        assert e.low <= e.value <= e.high
    assert large.high - large.low < small.high - small.low


def test_mismatched_scores_raise_a_user_error():
    with pytest.raises(CellnetError, match="cellularity scores"):
        metrics.mse([0.1, 0.2], [0.1])
    with pytest.raises(CellnetError, match="NaN"):
        metrics.mse_ci([0.1, float("nan")], [0.1, 0.2])


# -------------------------------------------------------------------------------------- ICC


def test_icc_reproduces_the_shrout_fleiss_example(monkeypatch):
    icc21 = metrics.icc_k_raters(SHROUT_FLEISS, "2,1")
    icc31 = metrics.icc_k_raters(SHROUT_FLEISS, "3,1")
    assert round(icc21.value, 2) == 0.29
    assert round(icc31.value, 2) == 0.71
    reference = pingouin_icc(SHROUT_FLEISS, monkeypatch)
    for estimate, row in ((icc21, "ICC(A,1)"), (icc31, "ICC(C,1)")):
        assert estimate.value == pytest.approx(reference.at[row, "ICC"], abs=1e-10)
        assert (estimate.low, estimate.high) == pytest.approx(
            tuple(reference.at[row, "CI95"]), abs=1e-8)


@pytest.mark.parametrize("shape", [(40, 2), (25, 5)])
def test_icc_matches_pingouin_on_random_tables(shape, monkeypatch):
    rng = np.random.default_rng(sum(shape))
    table = rng.random((shape[0], 1)) + rng.normal(0, 0.2, shape) + np.linspace(0, 0.3, shape[1])
    reference = pingouin_icc(table, monkeypatch)
    for kind, row in (("2,1", "ICC(A,1)"), ("3,1", "ICC(C,1)")):
        estimate = metrics.icc_k_raters(table, kind)
        assert estimate.value == pytest.approx(reference.at[row, "ICC"], abs=1e-10)
        assert (estimate.low, estimate.high) == pytest.approx(
            tuple(reference.at[row, "CI95"]), abs=1e-8)


def test_two_rater_icc_is_the_table_of_truth_and_prediction():
    y, p = noisy_scores(60, seed=8)
    p = p + 0.05  # a bias: absolute agreement drops, consistency does not
    icc21, icc31 = metrics.icc(y, p, "2,1"), metrics.icc(y, p, "3,1")
    assert icc21 == metrics.icc_k_raters(np.stack([y, p], axis=1), "2,1")
    assert icc21.value < icc31.value
    with pytest.raises(CellnetError, match="ICC kind"):
        metrics.icc(y, p, kind="1,1")


# ------------------------------------------------------------------- prediction probability


def test_prediction_probability_matches_brute_force_with_ties():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 6, 80) / 5.0           # many ties in the truth
    p = np.round(y + rng.normal(0, 0.2, 80), 1)  # and in the prediction, some in both
    assert metrics.prediction_probability(y, p) == pytest.approx(brute_force_pk(y, p), abs=1e-12)
    y, p = noisy_scores(70, seed=10)
    assert metrics.prediction_probability(y, p) == pytest.approx(brute_force_pk(y, p), abs=1e-12)


def test_prediction_probability_extremes():
    y = np.array([0.1, 0.4, 0.4, 0.9])
    assert metrics.prediction_probability(y, y) == 1.0
    assert metrics.prediction_probability(y, -y) == 0.0
    assert metrics.prediction_probability(y, np.zeros(4)) == 0.5
    tied = metrics.prediction_probability(np.full(5, 0.3), np.arange(5.0))
    assert isinstance(tied, float) and math.isnan(tied)


def test_prediction_probability_is_fast_for_ten_thousand_cases():
    y, p = noisy_scores(10_000, seed=12)
    start = time.perf_counter()
    value = metrics.prediction_probability(np.round(y, 2), np.round(p, 2))
    assert time.perf_counter() - start < 2.0
    assert 0.5 < value < 1.0


# ---------------------------------------------------------------------------------- Jaccard


def test_jaccard_is_global_over_the_set():
    truth = np.zeros((2, 2, 2, 4))
    pred = np.zeros((2, 2, 2, 4))
    # normal: image 0 intersection 1 union 2; image 1 intersection 0 union 1 -> 1/3 (not 1/4).
    truth[0, 0, 0, 0] = truth[0, 0, 1, 0] = 1
    pred[0, 0, 0, 0] = 0.9
    pred[1, 1, 1, 0] = 0.7
    # lymphocyte: perfect on image 1 only; a prediction of exactly 0.5 is not foreground.
    truth[1, 0, 0, 1] = 1
    pred[1, 0, 0, 1] = 0.8
    pred[0, 1, 1, 1] = 0.5
    # malignant: empty truth and prediction -> NaN. background: everything.
    truth[..., 3] = 1
    pred[..., 3] = 0.6
    pred[0, 0, 0, 3] = 0.2  # 7 of 8 pixels found
    scores = metrics.jaccard_per_class(truth, pred)
    assert set(scores) == set(CLASSES) | {"mean"}
    assert scores["normal"] == pytest.approx(1 / 3)
    assert scores["lymphocyte"] == pytest.approx(1.0)
    assert math.isnan(scores["malignant"])
    assert scores["background"] == pytest.approx(7 / 8)
    assert scores["mean"] == pytest.approx((1 / 3 + 1.0) / 2)  # cell classes, NaN left out
    assert metrics.jaccard_per_class(truth, pred, threshold=0.4)["lymphocyte"] == pytest.approx(0.5)


def test_jaccard_counts_add_up_over_batches():
    rng = np.random.default_rng(13)
    truth = (rng.random((6, 8, 8, 4)) > 0.7).astype(np.float32)
    pred = rng.random((6, 8, 8, 4)).astype(np.float32)
    first, second = metrics.jaccard_counts(truth[:2], pred[:2]), metrics.jaccard_counts(truth[2:], pred[2:])
    summed = metrics.jaccard_from_counts(first[0] + second[0], first[1] + second[1])
    assert summed == metrics.jaccard_per_class(truth, pred)
    with pytest.raises(CellnetError, match="segmentation masks"):
        metrics.jaccard_per_class(truth, pred[..., :3])


def _two_images() -> tuple[np.ndarray, np.ndarray]:
    """Two 2x2 images; pixels in reading order a b / c d. Per-image J worked out below."""
    truth = np.zeros((2, 2, 2, 4))
    pred = np.zeros((2, 2, 2, 4))
    # normal: image 0 truth {a, b}, pred {a} -> 1/2; image 1 truth {a}, pred {a, b, c} -> 1/3.
    truth[0, 0, :, 0] = 1
    pred[0, 0, 0, 0] = 0.9
    truth[1, 0, 0, 0] = 1
    pred[1, 0, :, 0] = pred[1, 1, 0, 0] = 0.8
    # lymphocyte: absent from image 0 (none predicted: skipped); image 1 truth {a, b}, pred {a}
    # -> 1/2 (b at exactly 0.5 is not foreground).
    truth[1, 0, :, 1] = 1
    pred[1, 0, 0, 1] = 0.7
    pred[1, 0, 1, 1] = 0.5
    # malignant: image 0 truth everywhere, pred {a, b, c} -> 3/4; image 1 absent but d predicted -> 0.
    truth[0, ..., 2] = 1
    pred[0, ..., 2] = 0.6
    pred[0, 1, 1, 2] = 0.1
    pred[1, 1, 1, 2] = 0.9
    # background (weight 0): image 0 missed entirely -> 0; image 1 perfect -> 1.
    truth[..., 3] = 1
    pred[1, ..., 3] = 1.0
    return truth, pred


def test_per_image_jaccard_by_hand_skips_absent_classes():
    truth, pred = _two_images()
    scores = metrics.jaccard_per_image(truth, pred)
    assert set(scores) == set(CLASSES) | {"weighted"}
    assert scores["normal"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert metrics.jaccard_per_class(truth, pred)["normal"] == pytest.approx(2 / 5)  # global differs
    assert scores["lymphocyte"] == pytest.approx(1 / 2)  # not (1 + 1/2) / 2: image 0 is skipped
    assert scores["malignant"] == pytest.approx((3 / 4 + 0) / 2)  # predicted where absent counts
    assert scores["background"] == pytest.approx(1 / 2)
    assert scores["weighted"] == pytest.approx((1 * 5 / 12 + 1 * 1 / 2 + 4 * 3 / 8 + 0 * 1 / 2) / 6)
    assert scores["weighted"] == pytest.approx(29 / 72)


def test_per_image_jaccard_from_per_region_counts():
    """The report scores regions of different sizes one at a time and stacks their counts."""
    truth, pred = _two_images()
    rows = [metrics.jaccard_counts(truth[n:n + 1], pred[n:n + 1]) for n in range(2)]
    from_counts = metrics.jaccard_per_image_from_counts(np.stack([r[0] for r in rows]),
                                                        np.stack([r[1] for r in rows]))
    assert from_counts == metrics.jaccard_per_image(truth, pred)


def test_per_image_jaccard_equals_the_authors_mean_when_no_class_is_empty():
    rng = np.random.default_rng(15)
    truth = (rng.random((5, 16, 16, 4)) > 0.6).astype(np.float32)
    pred = rng.random((5, 16, 16, 4)).astype(np.float32)
    weights = np.array([1.0, 1.0, 4.0, 0.0])
    t, m = truth > 0.5, pred > 0.5
    i, u = (t & m).sum(axis=(1, 2)), (t | m).sum(axis=(1, 2))
    assert (u > 0).all()
    eps = 1e-15
    authors = np.mean(((i + eps) / (u + eps)) @ weights / weights.sum())  # per image, then over images
    assert metrics.jaccard_per_image(truth, pred)["weighted"] == pytest.approx(authors, abs=1e-12)


def test_per_image_jaccard_renormalises_over_scored_classes_and_checks_weights():
    truth, pred = _two_images()
    truth[..., 2] = pred[..., 2] = 0  # malignant nowhere: NaN, and out of the weighted mean
    scores = metrics.jaccard_per_image(truth, pred, class_weights=(1, 1, 4, 0))
    assert math.isnan(scores["malignant"])
    assert scores["weighted"] == pytest.approx((5 / 12 + 1 / 2) / 2)
    only_malignant = metrics.jaccard_per_image(truth, pred, class_weights=(0, 0, 1, 0))
    assert math.isnan(only_malignant["weighted"])
    with pytest.raises(CellnetError, match="class_weights"):
        metrics.jaccard_per_image(truth, pred, class_weights=(1, 1, 4))
    with pytest.raises(CellnetError, match="class_weights"):
        metrics.jaccard_per_image(truth, pred, class_weights=(0, 0, 0, 0))
    with pytest.raises(CellnetError, match="segmentation masks"):
        metrics.jaccard_per_image(truth[0, 0], pred[0, 0])


# ---------------------------------------------------------------------------------- summary


def test_cellularity_summary_collects_every_metric():
    y, p = noisy_scores(200, seed=14)
    summary = metrics.cellularity_summary(y, p, n_boot=200, seed=3)
    assert summary["n"] == 200
    assert summary["mse"] == metrics.mse_ci(y, p, n_boot=200, seed=3)
    assert summary["kappa"] == metrics.kappa_ci(y, p, n_boot=200, seed=3)
    assert summary["icc21"] == metrics.icc(y, p, "2,1")
    assert summary["icc31"] == metrics.icc(y, p, "3,1")
    assert summary["pk"] == metrics.prediction_probability(y, p)
    assert isinstance(summary["pk"], float)


# ----------------------------------------------------------------------------- uncertainty

def test_interval_coverage_counts_truths_inside_with_a_bootstrap_interval():
    from cellnet.evaluation.metrics import interval_coverage

    y = np.array([0.1, 0.5, 0.9, 0.3])
    low, high = np.array([0.0, 0.6, 0.8, 0.3]), np.array([0.2, 0.7, 1.0, 0.3])  # 3 of 4 inside (ends count)
    estimate = interval_coverage(y, low, high, n_boot=500, seed=0)
    assert estimate.value == 0.75
    assert 0.0 <= estimate.low <= 0.75 <= estimate.high <= 1.0 and estimate.high - estimate.low > 0.2


def test_spread_error_correlation_ranks_uncertainty_against_absolute_error():
    from cellnet.evaluation.metrics import spread_error_correlation

    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, 200)
    spread = rng.uniform(0.01, 0.2, 200)
    p = y + rng.normal(0, 1, 200) * spread  # errors grow with the spread
    informative = spread_error_correlation(y, p, spread, n_boot=300, seed=0)
    assert informative.value > 0.3 and informative.low > 0
    useless = spread_error_correlation(y, p, rng.uniform(0, 1, 200), n_boot=300, seed=0)
    assert abs(useless.value) < 0.2 and useless.low < 0 < useless.high
    assert np.isnan(spread_error_correlation(y, p, np.full(200, 0.1), n_boot=50).value)  # no ranking
