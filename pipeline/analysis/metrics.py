"""How well predicted quality scores agree with human opinion scores, and how well they separate two image sets.

The customary no-reference IQA criteria, with percentile-bootstrap confidence intervals:

* SROCC (Spearman, average ranks for ties) and KROCC (Kendall tau-b): monotonic agreement, blind to the
  model's scale.
* PLCC (Pearson) on the raw scores, and after the VQEG four-parameter logistic mapping
  ``f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`` fitted to the labels: linear agreement once the
  model's scale is bent onto the labels' scale, which is how published IQA tables compare models.
* RMSE between the mapped scores and the labels, on the labels' own scale (MOS points).

Direction: some datasets label with MOS (higher is better), others with DMOS (lower is better). With
``higher_is_better=False`` the labels are negated for SROCC, raw PLCC and KROCC, so a good model always gets
positive correlations whatever the dataset. The logistic is fitted to the labels as they are (it may
decrease), so RMSE stays in the labels' units and PLCC after the mapping is positive whenever the mapping
explains the labels.

The density separation criterion asks a different question for paired high/low-quality sets without opinion
scores: fit a Gaussian to each set's scores and measure how much the two densities overlap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit

METRICS = ("srocc", "plcc", "plcc_logistic", "krocc", "rmse")
METRIC_LABELS = {"srocc": "SROCC", "plcc": "PLCC", "plcc_logistic": "PLCC (logistic)", "krocc": "KROCC",
                 "rmse": "RMSE"}
MIN_PAIRS = 3
LOGISTIC_MAX_EVALS = 20_000
# Bootstrap refits stop at this relative change: nearly linear data leave the logistic a flat valley (b4 -> inf)
# that the default tolerance crawls along for thousands of steps, and the resampling, not the fit's last
# digits, sets an interval's precision.
BOOTSTRAP_FIT_TOLERANCE = 1e-6
# A logistic fit this much worse (sum of squared errors) than a straight line ended in a poor local minimum.
LOGISTIC_WORSE_THAN_LINE = 1.01


class MetricsError(ValueError):
    """The scores cannot be evaluated (too few, constant, not finite); the message says which."""


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (as SROCC needs for ties)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0 or not math.isfinite(denom):
        return math.nan
    return float(np.clip(np.dot(xc, yc) / denom, -1.0, 1.0))


def plcc(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    return _pearson(np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float))


def srocc(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is constant."""
    return _pearson(average_ranks(predictions), average_ranks(labels))


def krocc(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Kendall tau-b, which corrects for ties on either side; NaN when either side is constant."""
    x, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.kendalltau(x, y, variant="b").statistic)


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The VQEG mapping ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``, written with ``expit`` (no overflow)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b1 - b2) * expit((np.asarray(x, dtype=float) - b3) / np.abs(b4)) + b2


@dataclass(frozen=True)
class ScaleMapping:
    """A fitted map from the model's scores onto the labels' scale.

    Attributes:
        kind: ``logistic`` (the VQEG fit converged) or ``linear`` (it did not; the least-squares line is used
            instead, so RMSE stays on the labels' scale and PLCC after mapping equals ``|raw PLCC|``).
        params: ``(b1, b2, b3, b4)`` for ``logistic``, ``(slope, intercept)`` for ``linear``.
        message: Why the logistic fit was not used; empty when it was.
    """

    kind: str
    params: tuple[float, ...]
    message: str = ""

    @property
    def converged(self) -> bool:
        """Whether the logistic fit converged and is the mapping used."""
        return self.kind == "logistic"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The mapped scores."""
        if self.kind == "logistic":
            return logistic4(x, *self.params)
        return self.params[0] * np.asarray(x, dtype=float) + self.params[1]


def _linear(x: np.ndarray, y: np.ndarray, message: str) -> ScaleMapping:
    slope, intercept = np.polyfit(x, y, 1)
    return ScaleMapping("linear", (float(slope), float(intercept)), message)


def _try_logistic(x: np.ndarray, y: np.ndarray, p0: Sequence[float],
                  tolerance: float | None) -> tuple[np.ndarray | None, str]:
    tolerances = {} if tolerance is None else {"ftol": tolerance, "xtol": tolerance}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            params, _ = curve_fit(logistic4, x, y, p0=list(p0), maxfev=LOGISTIC_MAX_EVALS, **tolerances)
    except (RuntimeError, ValueError) as exc:
        return None, str(exc).splitlines()[0]
    mapped = logistic4(x, *params)
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(mapped))) or params[3] == 0:
        return None, "the fit gave non-finite parameters"
    return params, ""


def fit_logistic(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray,
                 p0: Sequence[float] | None = None, tolerance: float | None = None) -> ScaleMapping:
    """Fit the VQEG four-parameter logistic from predictions to labels with ``scipy.optimize.curve_fit``.

    Without ``p0`` two starts are tried and the better fit kept: one spanning the labels' range
    (``b1``/``b2`` the label extremes in the direction of the correlation, ``b3`` the mean score, ``b4`` the
    scores' standard deviation), and one that starts out as the least-squares line (a wide, gentle logistic)
    for data whose relationship is nearly linear. A fit that fails, or ends worse than a straight line, falls
    back to the straight line, flagged in the result.

    Args:
        predictions: The model's scores.
        labels: The opinion scores, on their own scale and direction.
        p0: Start from these parameters only (the bootstrap starts every resample from the full-data fit);
            if that fails the two default starts are tried.
        tolerance: Relative tolerance of the fit (``ftol`` and ``xtol``); default scipy's.
    """
    x, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    if len(x) < 4:  # four parameters need four points (curve_fit refuses fewer)
        return _linear(x, y, f"a four-parameter logistic needs at least 4 pairs, got {len(x)}: straight line used")
    line = _linear(x, y, "")
    line_sse = float(np.sum((line(x) - y) ** 2))
    if p0 is not None:
        params, _ = _try_logistic(x, y, p0, tolerance)
        if params is not None and np.sum((logistic4(x, *params) - y) ** 2) <= line_sse * LOGISTIC_WORSE_THAN_LINE:
            return ScaleMapping("logistic", tuple(float(p) for p in params))
    slope = line.params[0]
    spread = float(np.std(x)) or 1.0
    high, low = (float(np.max(y)), float(np.min(y))) if slope >= 0 else (float(np.min(y)), float(np.max(y)))
    # A logistic with |b4| = w is nearly straight over +-w/2 around b3, with slope (b1 - b2) / (4 w) there.
    width = 4.0 * max(float(np.ptp(x)), spread)
    centre = line(np.array([x.mean()]))[0]
    gentle = (centre + 2 * slope * width, centre - 2 * slope * width, float(x.mean()), width)
    best, best_sse, failures = None, math.inf, []
    for start in ((high, low, float(x.mean()), spread), gentle):
        params, message = _try_logistic(x, y, start, tolerance)
        if params is None:
            failures.append(message)
            continue
        sse = float(np.sum((logistic4(x, *params) - y) ** 2))
        if sse < best_sse:
            best, best_sse = params, sse
    if best is None:
        return _linear(x, y, f"logistic fit did not converge ({failures[0]})")
    if best_sse > line_sse * LOGISTIC_WORSE_THAN_LINE:
        return _linear(x, y, "logistic fit ended worse than a straight line (a poor local minimum)")
    return ScaleMapping("logistic", tuple(float(p) for p in best))


@dataclass(frozen=True)
class Estimate:
    """A metric's value on all pairs and its bootstrap confidence interval (None when not bootstrapped).

    Attributes:
        value: The metric on all pairs.
        low: Lower end of the percentile-bootstrap interval.
        high: Upper end.
    """

    value: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class MetricsResult:
    """Agreement of predictions with labels.

    Attributes:
        n: Number of (prediction, label) pairs.
        higher_is_better: The labels' direction (False for DMOS: labels negated for the correlations).
        srocc: Spearman rank correlation.
        plcc: Pearson correlation of the raw scores.
        plcc_logistic: Pearson correlation of the mapped scores with the labels.
        krocc: Kendall tau-b.
        rmse: Root mean squared error of the mapped scores, in label units.
        mapping: The fitted logistic (or the straight line it fell back to).
        confidence: Coverage of the intervals, e.g. 0.95.
        bootstrap: Number of resamples (0: no intervals).
        seed: Seed of the resampling.
        degenerate_resamples: Resamples where a metric was undefined (all scores or labels equal), left out
            of that metric's interval.
    """

    n: int
    higher_is_better: bool
    srocc: Estimate
    plcc: Estimate
    plcc_logistic: Estimate
    krocc: Estimate
    rmse: Estimate
    mapping: ScaleMapping
    confidence: float
    bootstrap: int
    seed: int | None
    degenerate_resamples: int = 0

    def to_dict(self) -> dict:
        """Plain JSON-ready values (non-finite numbers become None)."""
        out = asdict(self)
        out["mapping"]["converged"] = self.mapping.converged
        return finite_or_none(out)


def finite_or_none(value):
    """``value`` with every non-finite float, at any depth, replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _point_metrics(x: np.ndarray, y: np.ndarray, oriented: np.ndarray,
                   mapping: ScaleMapping) -> dict[str, float]:
    mapped = mapping(x)
    return {
        "srocc": srocc(x, oriented),
        "plcc": _pearson(x, oriented),
        "plcc_logistic": _pearson(mapped, y),
        "krocc": krocc(x, oriented),
        "rmse": float(np.sqrt(np.mean((mapped - y) ** 2))),
    }


def _check_inputs(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 1 or x.shape != y.shape:
        raise MetricsError(f"predictions and labels must be two equal-length lists, got shapes {x.shape} and "
                           f"{y.shape}")
    if len(x) < MIN_PAIRS:
        raise MetricsError(f"need at least {MIN_PAIRS} (score, label) pairs, got {len(x)}")
    for name, values in (("score", x), ("label", y)):
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise MetricsError(f"{len(bad)} {name}s are not finite numbers (first at position {bad[0]})")
        if np.ptp(values) == 0:
            raise MetricsError(f"all {len(values)} {name}s are equal ({values[0]:g}): correlations are undefined")


def compute_metrics(predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, *,
                    higher_is_better: bool = True, bootstrap: int = 1000, confidence: float = 0.95,
                    seed: int | None = 0) -> MetricsResult:
    """SROCC, PLCC (raw and after the logistic mapping), KROCC and RMSE, each with a bootstrap interval.

    Intervals use the percentile method: ``bootstrap`` resamples of the pairs with replacement, every metric
    (the logistic refitted too) computed on each, and the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles taken. The default seed makes a rerun print the same intervals.

    Args:
        predictions: The model's scores, one per image.
        labels: The opinion scores of the same images, in the same order.
        higher_is_better: False for DMOS-style labels: correlations are computed against the negated labels.
        bootstrap: Number of resamples; 0 skips the intervals.
        confidence: Interval coverage, in (0, 1).
        seed: Seed of the resampling; None draws a fresh one.

    Raises:
        MetricsError: Fewer than three pairs, non-finite values, or constant scores or labels.
    """
    x, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
    _check_inputs(x, y)
    if bootstrap < 0:
        raise MetricsError(f"the number of bootstrap resamples must be 0 or more, got {bootstrap}")
    if not 0 < confidence < 1:
        raise MetricsError(f"confidence must be in (0, 1), got {confidence}")
    oriented = y if higher_is_better else -y
    mapping = fit_logistic(x, y)
    point = _point_metrics(x, y, oriented, mapping)

    samples = {name: [] for name in METRICS}
    degenerate = 0
    if bootstrap:
        rng = np.random.default_rng(seed)
        n = len(x)
        start = mapping.params if mapping.converged else None
        for _ in range(bootstrap):
            idx = rng.integers(0, n, n)
            xs, ys = x[idx], y[idx]
            if np.ptp(xs) == 0 or np.ptp(ys) == 0:
                degenerate += 1
                continue
            refit = fit_logistic(xs, ys, p0=start, tolerance=BOOTSTRAP_FIT_TOLERANCE)
            values = _point_metrics(xs, ys, oriented[idx], refit)
            for name, value in values.items():
                samples[name].append(value)
    alpha = 1 - confidence
    estimates = {}
    for name in METRICS:
        values = np.asarray(samples[name], dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            estimates[name] = Estimate(point[name], float(low), float(high))
        else:
            estimates[name] = Estimate(point[name])
    return MetricsResult(n=len(x), higher_is_better=higher_is_better, mapping=mapping, confidence=confidence,
                         bootstrap=bootstrap, seed=seed, degenerate_resamples=degenerate, **estimates)


@dataclass(frozen=True)
class GaussianFit:
    """A normal density fitted to one set's scores.

    Attributes:
        n: Number of scores.
        mean: Their mean.
        std: Their sample standard deviation (``n - 1`` in the denominator).
    """

    n: int
    mean: float
    std: float

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """The fitted density at ``x``."""
        return stats.norm.pdf(x, self.mean, self.std)


def fit_gaussian(scores: Sequence[float] | np.ndarray, name: str = "scores") -> GaussianFit:
    """Mean and sample standard deviation of ``scores``.

    Raises:
        MetricsError: Fewer than two scores, non-finite ones, or all equal (no density to fit).
    """
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or len(values) < 2:
        raise MetricsError(f"the {name} set needs at least 2 scores to fit a Gaussian, got {values.size}")
    if not np.all(np.isfinite(values)):
        raise MetricsError(f"the {name} set has scores that are not finite numbers")
    if np.ptp(values) == 0:
        raise MetricsError(f"all {len(values)} scores of the {name} set are equal ({values[0]:g}): "
                           "no Gaussian can be fitted")
    return GaussianFit(n=len(values), mean=float(np.mean(values)), std=float(np.std(values, ddof=1)))


def _crossings(a: GaussianFit, b: GaussianFit) -> list[float]:
    """Where the two densities are equal, from ``log f_a = log f_b``: a quadratic in ``x`` (linear if std equal).

    Solved around ``a.mean`` to avoid cancellation, with the numerically stable form of the quadratic formula.
    """
    d = b.mean - a.mean
    qa = 1 / b.std**2 - 1 / a.std**2
    qb = -2 * d / b.std**2
    qc = d**2 / b.std**2 + 2 * math.log(b.std / a.std)
    if qa == 0:
        return [] if qb == 0 else [a.mean - qc / qb]
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return []
    q = -0.5 * (qb + math.copysign(math.sqrt(disc), qb))
    roots = {0.0} if q == 0 else {q / qa, qc / q}
    return sorted(a.mean + r for r in roots)


def gaussian_overlap(a: GaussianFit, b: GaussianFit) -> float:
    """Overlap coefficient ``integral of min(f_a, f_b)`` of two normal densities, in closed form.

    The densities cross at most twice; between crossings one density is the lower everywhere, so the
    integral is a sum of that density's probability mass over each interval (normal CDF differences).
    1 for identical densities, near 0 for far-apart ones.
    """
    if a.mean == b.mean and a.std == b.std:
        return 1.0
    edges = [-math.inf, *_crossings(a, b), math.inf]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if math.isinf(lo) and math.isinf(hi):
            probe = (a.mean + b.mean) / 2
        elif math.isinf(lo):
            probe = hi - 1.0
        elif math.isinf(hi):
            probe = lo + 1.0
        else:
            probe = (lo + hi) / 2
        lower = a if stats.norm.logpdf(probe, a.mean, a.std) <= stats.norm.logpdf(probe, b.mean, b.std) else b
        total += stats.norm.cdf(hi, lower.mean, lower.std) - stats.norm.cdf(lo, lower.mean, lower.std)
    return float(min(max(total, 0.0), 1.0))


@dataclass(frozen=True)
class Separation:
    """How well scores separate a high-quality set from a low-quality one.

    Attributes:
        high: Gaussian fitted to the high-quality set's scores.
        low: Gaussian fitted to the low-quality set's scores.
        overlap: Overlap coefficient of the two densities (0 fully separated, 1 indistinguishable).
        d_prime: ``(mean_high - mean_low) / sqrt((std_high^2 + std_low^2) / 2)``; negative when the model ranks
            the low set higher.
    """

    high: GaussianFit
    low: GaussianFit
    overlap: float
    d_prime: float

    def to_dict(self) -> dict:
        """Plain JSON-ready values."""
        return finite_or_none(asdict(self))


def density_separation(high_scores: Sequence[float] | np.ndarray,
                       low_scores: Sequence[float] | np.ndarray) -> Separation:
    """Gaussian fits of both sets, their overlap coefficient and d'.

    Raises:
        MetricsError: A set has fewer than two scores or all its scores are equal.
    """
    high, low = fit_gaussian(high_scores, "high-quality"), fit_gaussian(low_scores, "low-quality")
    d_prime = (high.mean - low.mean) / math.sqrt((high.std**2 + low.std**2) / 2)
    return Separation(high=high, low=low, overlap=gaussian_overlap(high, low), d_prime=d_prime)
