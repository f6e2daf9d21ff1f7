"""Evaluation metrics of SPEC section 5, each with a 95% confidence interval.

Cellularity (one score in [0, 1] per patch, truth ``y`` against prediction ``p``):

* MSE with a percentile bootstrap CI over cases (the paper's Table 2);
* Cohen's kappa on the four bins of Peikari et al. 2017, [0, .25], (.25, .5], (.5, .75],
  (.75, 1], unweighted as in the paper (the paper and Peikari et al. report plain "Cohen's
  kappa"), with a bootstrap CI (Table 3);
* ICC(2,1) and ICC(3,1) of Shrout & Fleiss 1979 with the F-distribution CIs of McGraw & Wong
  1996 (Table 3);
* the prediction probability P_K of Smith et al. 1996, the BreastPathQ challenge metric.

Segmentation: Jaccard index per class at a threshold, global over the whole set (Table 1), and
the authors' validation measure, per image and class, averaged with class weights 1, 1, 4, 0.

Only numpy and scipy are used here: scoring a report needs no TensorFlow.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import stats

from cellnet.classes import CLASSES
from cellnet.errors import CellnetError

#: Upper edges of the first three cellularity bins; the bins are closed on the right.
BINS4: tuple[float, ...] = (0.25, 0.5, 0.75)
N_BINS4 = len(BINS4) + 1

# Bootstrap resamples are drawn in blocks holding about this many indices, so that a
# vectorised metric never materialises an (n_boot, n) array larger than ~32 MB.
_BOOT_BLOCK_ELEMENTS = 4_000_000


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with the bounds of its confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}-{self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


# ----------------------------------------------------------------------------- input checks


def _scores(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
            min_cases: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of score vectors and return them as float64 arrays."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise CellnetError(f"cellularity scores: {y.size} true values but {p.size} predictions")
    if y.size < min_cases:
        raise CellnetError(f"cellularity scores: need at least {min_cases} cases, got {y.size}")
    if not (np.isfinite(y).all() and np.isfinite(p).all()):
        raise CellnetError("cellularity scores: NaN or infinite values")
    return y, p


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise CellnetError(f"confidence level: must be in (0, 1), got {level}")


# ------------------------------------------------------------------------------- bootstrap


def _bootstrap_blocks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield the case indices of ``n_boot`` resamples of ``n`` cases, in [rows, n] blocks.

    Every caller with the same ``(n, n_boot, seed)`` sees the same resamples, so a vectorised
    metric and a per-resample loop give identical intervals.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_BLOCK_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def _percentile_estimate(value: float, samples: np.ndarray, level: float) -> Estimate:
    """Percentile interval of the bootstrap ``samples``; undefined (NaN) resamples are dropped."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return Estimate(float(value), float("nan"), float("nan"))
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return Estimate(float(value), float(low), float(high))


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float],
                 y_true: Sequence[float] | np.ndarray, y_pred: Sequence[float] | np.ndarray,
                 n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Percentile bootstrap CI of ``metric_fn(y_true, y_pred)``, resampling cases with replacement.

    ``metric_fn`` is called once per resample; resamples where it is NaN are left out of the
    percentiles (e.g. kappa of a resample that fell into a single bin).
    """
    _check_level(level)
    if n_boot < 1:
        raise CellnetError(f"bootstrap: n_boot must be at least 1, got {n_boot}")
    y, p = _scores(y_true, y_pred)
    samples = np.array([metric_fn(y[i], p[i])
                        for block in _bootstrap_blocks(y.size, n_boot, seed) for i in block],
                       dtype=np.float64)
    return _percentile_estimate(metric_fn(y, p), samples, level)


# ------------------------------------------------------------------------------------- MSE


def mse(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Mean squared error of the cellularity scores."""
    y, p = _scores(y, p)
    return float(np.mean((y - p) ** 2))


def mse_ci(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
           n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """MSE with its percentile bootstrap CI (same resamples as :func:`bootstrap_ci`, vectorised)."""
    _check_level(level)
    y, p = _scores(y, p)
    squared = (y - p) ** 2
    samples = np.concatenate([squared[block].mean(axis=1)
                              for block in _bootstrap_blocks(y.size, n_boot, seed)])
    return _percentile_estimate(float(squared.mean()), samples, level)


def mse_difference_ci(y: Sequence[float] | np.ndarray, p_a: Sequence[float] | np.ndarray,
                      p_b: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """MSE(a) - MSE(b) on the same cases, with a paired percentile bootstrap CI.

    Both predictions are resampled together, so the interval is that of the difference (which
    is much narrower than comparing two independent intervals); below 0, ``a`` is better.
    """
    _check_level(level)
    y, a = _scores(y, p_a)
    _, b = _scores(y, p_b)
    d = (a - y) ** 2 - (b - y) ** 2
    samples = np.concatenate([d[block].mean(axis=1) for block in _bootstrap_blocks(y.size, n_boot, seed)])
    return _percentile_estimate(float(d.mean()), samples, level)


# ----------------------------------------------------------------------------------- kappa


def to_bins4(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Cellularity -> bin 0..3 for [0, .25], (.25, .5], (.5, .75], (.75, 1].

    The bins are closed on the right (0.25 is bin 0, 0.2501 is bin 1). Values below 0 fall in
    bin 0 and values above 1 in bin 3, so a regressor that overshoots is binned sensibly.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise CellnetError("cellularity scores: NaN cannot be binned")
    return np.searchsorted(np.asarray(BINS4), x, side="left").astype(np.int64)


def _kappa_from_bins(yb: np.ndarray, pb: np.ndarray, weights: str | None) -> np.ndarray:
    """Cohen's kappa of each row of the [rows, n] bin arrays ``yb`` and ``pb``, vectorised.

    One bincount over ``row * 16 + true * 4 + pred`` gives every row's confusion matrix.
    """
    rows, n = yb.shape
    k = N_BINS4
    codes = (np.arange(rows)[:, None] * k * k + yb * k + pb).reshape(-1)
    confusion = np.bincount(codes, minlength=rows * k * k).reshape(rows, k, k) / n
    expected = confusion.sum(axis=2)[:, :, None] * confusion.sum(axis=1)[:, None, :]
    grid = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :]).astype(np.float64)
    if weights is None:
        disagreement = (grid > 0).astype(np.float64)
    elif weights == "linear":
        disagreement = grid
    elif weights == "quadratic":
        disagreement = grid ** 2
    else:
        raise CellnetError(f"kappa weights: expected None, 'linear' or 'quadratic', got {weights!r}")
    observed_d = (confusion * disagreement).sum(axis=(1, 2))
    expected_d = (expected * disagreement).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected_d > 0, 1.0 - observed_d / expected_d, np.nan)


def kappa(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
          weights: str | None = None) -> float:
    """Cohen's kappa between the four-bin categories of ``y`` and ``p`` (see :func:`to_bins4`).

    Unweighted by default, as reported by the paper; ``weights="linear"|"quadratic"`` gives the
    weighted variants. NaN when both raters put every case in the same bin (kappa undefined).
    """
    y, p = _scores(y, p)
    return float(_kappa_from_bins(to_bins4(y)[None], to_bins4(p)[None], weights)[0])


def kappa_ci(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
             n_boot: int = 2000, seed: int = 0, level: float = 0.95,
             weights: str | None = None) -> Estimate:
    """Kappa with its percentile bootstrap CI (same resamples as :func:`bootstrap_ci`, vectorised)."""
    _check_level(level)
    y, p = _scores(y, p)
    yb, pb = to_bins4(y), to_bins4(p)
    samples = np.concatenate([_kappa_from_bins(yb[block], pb[block], weights)
                              for block in _bootstrap_blocks(y.size, n_boot, seed)])
    return _percentile_estimate(float(_kappa_from_bins(yb[None], pb[None], weights)[0]),
                                samples, level)


# ------------------------------------------------------------------------------------- ICC


def icc_k_raters(ratings: np.ndarray, kind: str = "2,1", level: float = 0.95) -> Estimate:
    """Shrout & Fleiss single-rater ICC of an [n targets, k raters] table, with its F-based CI.

    ``"2,1"``: two-way random effects, absolute agreement (McGraw & Wong's ICC(A,1)).
    ``"3,1"``: two-way mixed effects, consistency (McGraw & Wong's ICC(C,1)).
    The CIs follow McGraw & Wong 1996 (Table 7, cases 2A and 3); for ICC(2,1) the F degrees of
    freedom come from Satterthwaite's approximation.
    """
    _check_level(level)
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise CellnetError(f"ICC ratings: need an [n >= 2 targets, k >= 2 raters] table, "
                           f"got shape {x.shape}")
    if not np.isfinite(x).all():
        raise CellnetError("ICC ratings: NaN or infinite values")
    if kind not in ("2,1", "3,1"):
        raise CellnetError(f"ICC kind: expected '2,1' or '3,1', got {kind!r}")
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    df_rows, df_cols, df_error = n - 1, k - 1, (n - 1) * (k - 1)
    ms_rows, ms_cols, ms_error = ss_rows / df_rows, ss_cols / df_cols, ss_error / df_error
    q = 1.0 - (1.0 - level) / 2.0

    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "3,1":
            value = (ms_rows - ms_error) / (ms_rows + (k - 1) * ms_error)
            f_obs = ms_rows / ms_error
            f_low = f_obs / stats.f.ppf(q, df_rows, df_error)
            f_high = f_obs * stats.f.ppf(q, df_error, df_rows)
            low = (f_low - 1.0) / (f_low + k - 1.0)
            high = (f_high - 1.0) / (f_high + k - 1.0)
        else:
            value = (ms_rows - ms_error) / (
                ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n)
            a = k * value / (n * (1.0 - value))
            b = 1.0 + k * value * (n - 1) / (n * (1.0 - value))
            v = (a * ms_cols + b * ms_error) ** 2 / (
                (a * ms_cols) ** 2 / df_cols + (b * ms_error) ** 2 / df_error)
            f_star = stats.f.ppf(q, df_rows, v)
            low = n * (ms_rows - f_star * ms_error) / (
                f_star * (k * ms_cols + (k * n - k - n) * ms_error) + n * ms_rows)
            f_star = stats.f.ppf(q, v, df_rows)
            high = n * (f_star * ms_rows - ms_error) / (
                k * ms_cols + (k * n - k - n) * ms_error + n * f_star * ms_rows)
    return Estimate(float(value), float(low), float(high))


def icc(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
        kind: str = "2,1", level: float = 0.95) -> Estimate:
    """ICC between truth and prediction as two raters of the same patches (see :func:`icc_k_raters`)."""
    y, p = _scores(y, p, min_cases=2)
    return icc_k_raters(np.stack([y, p], axis=1), kind=kind, level=level)


# ------------------------------------------------------------------ prediction probability


def _tied_pairs(*columns: np.ndarray) -> int:
    """Number of pairs equal in every one of ``columns``."""
    _, counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _strict_inversions(values: np.ndarray) -> int:
    """Pairs i < j with values[i] > values[j], with a Fenwick tree over the dense ranks: O(n log n)."""
    _, ranks = np.unique(values, return_inverse=True)
    ranks = ranks.reshape(-1) + 1  # Fenwick trees index from 1
    size = int(ranks.max())
    tree = [0] * (size + 1)
    inversions = 0
    for seen, r in enumerate(ranks.tolist()):
        at_most_r, i = 0, r  # how many earlier values are <= this one
        while i > 0:
            at_most_r += tree[i]
            i -= i & -i
        inversions += seen - at_most_r
        i = r
        while i <= size:
            tree[i] += 1
            i += i & -i
    return inversions


def prediction_probability(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """P_K = (C + T_pred / 2) / (C + D + T_pred) over the pairs not tied in the truth.

    C: concordant pairs, D: discordant pairs, T_pred: pairs tied in the prediction only.
    Counted in O(n log n): sorted by (truth, prediction), the discordant pairs are exactly the
    strict inversions of the prediction sequence (pairs tied in the truth sit in ascending
    prediction order, so they add none); the tie counts come from group sizes.
    NaN when every pair is tied in the truth.
    """
    y, p = _scores(y, p)
    n = y.size
    untied_truth = n * (n - 1) // 2 - _tied_pairs(y)
    if untied_truth == 0:
        return float("nan")
    tied_pred_only = _tied_pairs(p) - _tied_pairs(y, p)
    discordant = _strict_inversions(p[np.lexsort((p, y))])
    concordant = untied_truth - tied_pred_only - discordant
    return (concordant + tied_pred_only / 2.0) / untied_truth


# ----------------------------------------------------------------------------- uncertainty

def interval_coverage(y: Sequence[float] | np.ndarray, low: Sequence[float] | np.ndarray,
                      high: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """Share of true scores inside their predicted [low, high], with a percentile bootstrap CI.

    A calibrated 80% interval covers about 0.8 of the cases; less is overconfident.
    """
    _check_level(level)
    y, low = _scores(y, low)
    _, high = _scores(y, high)
    inside = ((low <= y) & (y <= high)).astype(np.float64)
    samples = np.concatenate([inside[block].mean(axis=1) for block in _bootstrap_blocks(y.size, n_boot, seed)])
    return _percentile_estimate(float(inside.mean()), samples, level)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b)[0])


def spread_error_correlation(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
                             spread: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                             level: float = 0.95) -> Estimate:
    """Spearman rank correlation of a per-case uncertainty with the absolute error, bootstrap CI.

    Above 0, the cases the model is unsure of are the ones it gets wrong: the spread can rank
    patches for review.
    """
    y, p = _scores(y, p)
    _, spread = _scores(y, spread)
    return bootstrap_ci(_spearman, np.abs(p - y), spread, n_boot=n_boot, seed=seed, level=level)


# --------------------------------------------------------------------------------- Jaccard


def _foreground(y_true_masks: np.ndarray, y_pred_maps: np.ndarray, threshold: float,
                min_ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Boolean truth (> 0.5) and prediction (> ``threshold``) of same-shape ``[..., C]`` arrays."""
    t = np.asarray(y_true_masks)
    m = np.asarray(y_pred_maps)
    if t.shape != m.shape or t.ndim < min_ndim:
        raise CellnetError(f"segmentation masks: truth shape {t.shape} and prediction shape "
                           f"{m.shape} differ or have fewer than {min_ndim} axes")
    return t > 0.5, m > threshold


def jaccard_counts(y_true_masks: np.ndarray, y_pred_maps: np.ndarray,
                   threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel intersection and union pixel counts of ``[..., C]`` masks and maps.

    The truth is foreground where it is > 0.5, the prediction where it is > ``threshold``.
    Counts of several batches add up, so a large set can be scored batch by batch and passed to
    :func:`jaccard_from_counts`.
    """
    t, m = _foreground(y_true_masks, y_pred_maps, threshold)
    t = t.reshape(-1, t.shape[-1])
    m = m.reshape(-1, m.shape[-1])
    intersection = np.count_nonzero(t & m, axis=0).astype(np.int64)
    union = np.count_nonzero(t | m, axis=0).astype(np.int64)
    return intersection, union


def jaccard_from_counts(intersection: np.ndarray, union: np.ndarray,
                        classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Jaccard per class from summed counts, plus ``"mean"`` over every class but background.

    Table 1 of the paper scores the cells, so background (which would dominate the score by
    its area) is left out of the mean. A class with an empty union is NaN and is left out of
    the mean; the mean is NaN when every cell class is.
    """
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    if intersection.shape != (len(classes),) or union.shape != (len(classes),):
        raise CellnetError(f"segmentation masks: {intersection.size} channels but "
                           f"{len(classes)} classes {tuple(classes)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class = np.where(union > 0, intersection / union, np.nan)
    result = {name: float(v) for name, v in zip(classes, per_class)}
    cells = [result[name] for name in classes if name != "background"]
    finite = [v for v in cells if not np.isnan(v)]
    result["mean"] = float(np.mean(finite)) if finite else float("nan")
    return result


def jaccard_per_class(y_true_masks: np.ndarray, y_pred_maps: np.ndarray, threshold: float = 0.5,
                      classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Jaccard index per channel, global over the whole set, plus the cell-class ``"mean"``.

    Global means sum of intersections over sum of unions across every image (not a mean of
    per-image scores). ``"mean"`` averages the cell classes only, without background; see
    :func:`jaccard_from_counts`.
    """
    return jaccard_from_counts(*jaccard_counts(y_true_masks, y_pred_maps, threshold), classes)


#: Class weights of the authors' validation Jaccard (normal, lymphocyte, malignant, background).
AUTHORS_CLASS_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 4.0, 0.0)


def jaccard_per_image_from_counts(intersection: np.ndarray, union: np.ndarray,
                                  class_weights: Sequence[float] = AUTHORS_CLASS_WEIGHTS,
                                  classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Mean over images of the per-image Jaccard, per class, and their class-weighted mean.

    ``intersection`` and ``union`` are [images, C] pixel counts (one :func:`jaccard_counts` row
    per image). An image whose union is empty for a class (no such cells, none predicted) is
    left out of that class's mean: it says nothing about how well the class is segmented, and
    counting it as 1 (the authors' ``(0 + eps) / (0 + eps)``) would reward classes for being
    rare. A class that no image scores is NaN. ``"weighted"`` is ``sum_c w_c J_c / sum_c w_c``
    over the classes that are not NaN; with no empty pair it equals the authors' mean over
    images of ``sum_c w_c J_c(image) / sum_c w_c``. It is NaN when every weighted class is.
    """
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    weights = np.asarray(class_weights, dtype=np.float64)
    if intersection.ndim != 2 or intersection.shape[1] != len(classes) or union.shape != intersection.shape:
        raise CellnetError(f"segmentation masks: per-image counts of shape {intersection.shape} "
                           f"for {len(classes)} classes {tuple(classes)}")
    if weights.shape != (len(classes),) or (weights < 0).any() or weights.sum() <= 0:
        raise CellnetError(f"Jaccard class_weights {tuple(class_weights)}: need {len(classes)} "
                           "non-negative weights, not all 0")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_image = np.where(union > 0, intersection / union, np.nan)
    scored = ~np.isnan(per_image)
    with np.errstate(invalid="ignore"):
        per_class = np.where(scored.any(axis=0), np.nansum(per_image, axis=0) / scored.sum(axis=0), np.nan)
    result = {name: float(v) for name, v in zip(classes, per_class)}
    counted = ~np.isnan(per_class) & (weights > 0)
    result["weighted"] = (float(np.sum(weights[counted] * per_class[counted]) / weights[counted].sum())
                          if counted.any() else float("nan"))
    return result


def jaccard_per_image(y_true_masks: np.ndarray, y_pred_maps: np.ndarray, threshold: float = 0.5,
                      class_weights: Sequence[float] = AUTHORS_CLASS_WEIGHTS,
                      classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """The authors' validation measure: Jaccard per image and class of ``[N, H, W, C]`` arrays.

    Thresholds as :func:`jaccard_counts` (the authors count a prediction of exactly
    ``threshold`` as foreground; the same rule as the global Jaccard keeps the two comparable);
    averaging and empty classes as :func:`jaccard_per_image_from_counts`.
    """
    t, m = _foreground(y_true_masks, y_pred_maps, threshold, min_ndim=3)
    t = t.reshape(t.shape[0], -1, t.shape[-1])
    m = m.reshape(m.shape[0], -1, m.shape[-1])
    return jaccard_per_image_from_counts(np.count_nonzero(t & m, axis=1),
                                         np.count_nonzero(t | m, axis=1), class_weights, classes)


# --------------------------------------------------------------------------------- summary


def cellularity_summary(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
                        n_boot: int = 2000, seed: int = 0) -> dict:
    """Every cellularity metric of SPEC 5: the paper's Tables 2 and 3 plus P_K.

    Returns ``{"mse", "kappa", "icc21", "icc31"}`` as :class:`Estimate` (95% CIs), ``"pk"`` as a
    float and ``"n"``, the number of cases.
    """
    y, p = _scores(y, p, min_cases=2)
    return {
        "mse": mse_ci(y, p, n_boot=n_boot, seed=seed),
        "kappa": kappa_ci(y, p, n_boot=n_boot, seed=seed),
        "icc21": icc(y, p, kind="2,1"),
        "icc31": icc(y, p, kind="3,1"),
        "pk": prediction_probability(y, p),
        "n": int(y.size),
    }
