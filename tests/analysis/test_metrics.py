"""Agreement metrics against scipy and brute force, the logistic fit, bootstrap intervals, density separation."""

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, stats

from pipeline.analysis import metrics
from pipeline.analysis.metrics import (
    GaussianFit,
    MetricsError,
    average_ranks,
    compute_metrics,
    density_separation,
    fit_logistic,
    gaussian_overlap,
    krocc,
    logistic4,
    plcc,
    srocc,
)


def _tied_data(n=300, seed=0):
    """Predictions and MOS-like labels, both with many ties (rounded), positively related."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(0, 1, n)
    predictions = np.round(quality + rng.normal(0, 0.15, n), 1)
    labels = np.round(1 + 4 * quality + rng.normal(0, 0.4, n))
    return predictions, labels


def _brute_tau_b(x, y):
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tied_x += dx == 0
        tied_y += dy == 0
        concordant += dx * dy > 0
        discordant += dx * dy < 0
    pairs = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((pairs - tied_x) * (pairs - tied_y))


def test_average_ranks_share_tied_ranks():
    assert average_ranks([10, 20, 20, 30, 20]).tolist() == [1, 3, 3, 5, 3]
    values = np.random.default_rng(3).integers(0, 7, 200)
    np.testing.assert_allclose(average_ranks(values), stats.rankdata(values, method="average"))


def test_correlations_match_scipy_on_data_with_ties():
    x, y = _tied_data()
    assert len(np.unique(x)) < len(x) / 3 and len(np.unique(y)) <= 8  # really tied
    assert srocc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert krocc(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert srocc(x, -y) == pytest.approx(-srocc(x, y))


def test_kendall_tau_b_matches_brute_force_pair_counting():
    rng = np.random.default_rng(7)
    for _ in range(5):
        x = rng.integers(0, 5, 25).astype(float)
        y = x + rng.integers(-2, 3, 25)
        assert krocc(x, y) == pytest.approx(_brute_tau_b(x, y), abs=1e-12)


def test_constant_or_too_few_values_are_refused():
    assert math.isnan(srocc([1, 1, 1], [1, 2, 3])) and math.isnan(krocc([1, 2, 3], [5, 5, 5]))
    with pytest.raises(MetricsError, match="all 4 scores are equal"):
        compute_metrics([0.5] * 4, [1, 2, 3, 4], bootstrap=0)
    with pytest.raises(MetricsError, match="at least 3"):
        compute_metrics([0.1, 0.2], [1, 2], bootstrap=0)
    with pytest.raises(MetricsError, match="not finite"):
        compute_metrics([0.1, np.nan, 0.3], [1, 2, 3], bootstrap=0)


def test_logistic_fit_recovers_a_known_curve_and_beats_raw_plcc():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, 400)
    truth = (85.0, 15.0, 0.45, 0.08)
    y = logistic4(x, *truth) + rng.normal(0, 1.5, len(x))
    mapping = fit_logistic(x, y)
    assert mapping.converged and mapping.message == ""
    b1, b2, b3, b4 = mapping.params
    assert b1 == pytest.approx(85, abs=2) and b2 == pytest.approx(15, abs=2)
    assert b3 == pytest.approx(0.45, abs=0.01) and abs(b4) == pytest.approx(0.08, abs=0.01)
    result = compute_metrics(x, y, bootstrap=0)
    assert result.plcc_logistic.value >= result.plcc.value
    assert result.plcc_logistic.value > 0.99 > result.plcc.value
    # RMSE of the mapped scores is the noise level, in label units.
    assert result.rmse.value == pytest.approx(1.5, rel=0.15)
    assert result.rmse.value == pytest.approx(np.sqrt(np.mean((logistic4(x, *mapping.params) - y) ** 2)))


def test_a_decreasing_relationship_is_fitted_too():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, 300)
    y = logistic4(x, 10.0, 90.0, 0.6, 0.1) + rng.normal(0, 1.0, len(x))  # falls from 90 to 10
    mapping = fit_logistic(x, y)
    assert mapping.converged
    assert np.corrcoef(mapping(x), y)[0, 1] > 0.99


def test_fit_that_does_not_converge_falls_back_to_a_flagged_straight_line(monkeypatch):
    x, y = _tied_data()
    monkeypatch.setattr(metrics, "LOGISTIC_MAX_EVALS", 1)
    result = compute_metrics(x, y, bootstrap=0)
    assert not result.mapping.converged and result.mapping.kind == "linear"
    assert "did not converge" in result.mapping.message
    assert result.to_dict()["mapping"]["converged"] is False
    slope, intercept = np.polyfit(x, y, 1)
    assert result.plcc_logistic.value == pytest.approx(abs(result.plcc.value))
    assert result.rmse.value == pytest.approx(np.sqrt(np.mean((slope * x + intercept - y) ** 2)))


def test_dmos_labels_flip_the_correlation_signs_but_not_rmse():
    x, mos = _tied_data(seed=4)
    dmos = 6 - mos  # lower is better
    as_mos = compute_metrics(x, mos, bootstrap=0)
    as_dmos = compute_metrics(x, dmos, higher_is_better=False, bootstrap=0)
    wrong_direction = compute_metrics(x, dmos, higher_is_better=True, bootstrap=0)
    for name in ("srocc", "plcc", "krocc"):
        assert getattr(as_mos, name).value > 0.5
        assert getattr(as_dmos, name).value == pytest.approx(getattr(as_mos, name).value)
        assert getattr(wrong_direction, name).value == pytest.approx(-getattr(as_mos, name).value)
    assert as_dmos.plcc_logistic.value == pytest.approx(as_mos.plcc_logistic.value, rel=1e-4)
    assert as_dmos.rmse.value == pytest.approx(as_mos.rmse.value, rel=1e-4)
    assert not as_dmos.higher_is_better


def test_rmse_is_on_the_label_scale():
    x, y = _tied_data(seed=5)
    small = compute_metrics(x, y, bootstrap=0)
    large = compute_metrics(x, y * 20, bootstrap=0)
    assert large.rmse.value == pytest.approx(20 * small.rmse.value, rel=1e-3)
    assert large.srocc.value == pytest.approx(small.srocc.value)


def test_bootstrap_intervals_contain_the_estimate_narrow_with_data_and_repeat_with_a_seed():
    small_x, small_y = _tied_data(n=60, seed=6)
    big_x, big_y = _tied_data(n=1500, seed=6)
    small = compute_metrics(small_x, small_y, bootstrap=200, seed=1)
    big = compute_metrics(big_x, big_y, bootstrap=200, seed=1)
    for name in metrics.METRICS:
        for result in (small, big):
            est = getattr(result, name)
            assert est.low <= est.value <= est.high, name
        assert getattr(big, name).high - getattr(big, name).low < getattr(small, name).high - getattr(small, name).low
    again = compute_metrics(small_x, small_y, bootstrap=200, seed=1)
    assert again == small
    other = compute_metrics(small_x, small_y, bootstrap=200, seed=2)
    assert other.srocc.value == small.srocc.value and other.srocc.low != small.srocc.low
    none = compute_metrics(small_x, small_y, bootstrap=0)
    assert none.srocc.low is None and none.to_dict()["srocc"] == {"value": none.srocc.value, "low": None,
                                                                   "high": None}


def test_a_higher_confidence_level_gives_wider_intervals():
    """A wider confidence level gives wider intervals around the same point estimate."""
    x, y = _tied_data(n=200, seed=8)
    narrow = compute_metrics(x, y, bootstrap=300, confidence=0.5, seed=3)
    wide = compute_metrics(x, y, bootstrap=300, confidence=0.99, seed=3)
    assert wide.srocc.low < narrow.srocc.low < narrow.srocc.high < wide.srocc.high


def test_bootstrap_intervals_hold_the_true_correlation_in_about_the_stated_share_of_samples(monkeypatch):
    """Coverage, simulated: 200 samples of 60 bivariate-normal pairs with correlation 0.6.

    The population values are known: PLCC is rho, SROCC is ``(6 / pi) * asin(rho / 2)``. Each sample's 90 % and
    50 % intervals should hold them in about 90 % and 50 % of the samples. The bounds are the level plus or minus
    three binomial standard deviations over 200 samples, ``3 * sqrt(p (1 - p) / 200)``: 0.064 at 90 %, 0.106 at
    50 %. Quantiles taken at the wrong places (``alpha`` for ``alpha / 2``: 80 % intervals) or a level ignored
    (95 % intervals at a 50 % level) fall outside them.

    PLCC's lower bounds allow 0.05 more: the percentile bootstrap under-covers Pearson's r at n = 60, whose
    sampling distribution is skewed at rho = 0.6 (1,000 simulated samples, bootstrap 100, measured 0.857 at 90 %
    and 0.475 at 50 %; SROCC 0.889 and 0.502).

    The logistic refit of every resample (most of the run time) does not enter SROCC or PLCC, so a fixed map
    stands in for it and the test stays within seconds.
    """
    monkeypatch.setattr(metrics, "fit_logistic", lambda x, y, p0=None, tolerance=None: metrics.ScaleMapping(
        "linear", (1.0, 0.0), "coverage test"))
    rho, n, samples, resamples = 0.6, 60, 200, 100
    truth = {"srocc": 6 / math.pi * math.asin(rho / 2), "plcc": rho}
    known_under_coverage = {"srocc": 0.0, "plcc": 0.05}
    levels = (0.9, 0.5)
    held = {(level, name): 0 for level in levels for name in truth}
    rng = np.random.default_rng(12)
    for k in range(samples):
        x, y = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], n).T
        for level in levels:
            result = compute_metrics(x, y, bootstrap=resamples, confidence=level, seed=k)
            for name, value in truth.items():
                estimate = getattr(result, name)
                held[(level, name)] += estimate.low <= value <= estimate.high
    shares = {key: count / samples for key, count in held.items()}
    for (level, name), share in shares.items():
        margin = 3 * math.sqrt(level * (1 - level) / samples)
        assert level - margin - known_under_coverage[name] <= share <= level + margin, shares


def _numeric_overlap(a: GaussianFit, b: GaussianFit) -> float:
    lo = min(a.mean - 12 * a.std, b.mean - 12 * b.std)
    hi = max(a.mean + 12 * a.std, b.mean + 12 * b.std)

    def pdf(fit: GaussianFit, t: float) -> float:
        return math.exp(-0.5 * ((t - fit.mean) / fit.std) ** 2) / (fit.std * math.sqrt(2 * math.pi))

    value, _ = integrate.quad(lambda t: min(pdf(a, t), pdf(b, t)), lo, hi, points=[a.mean, b.mean], limit=500,
                              epsabs=1e-12)
    return value


def test_overlap_of_identical_far_apart_and_hand_derived_gaussians():
    unit = GaussianFit(10, 0.0, 1.0)
    assert gaussian_overlap(unit, GaussianFit(5, 0.0, 1.0)) == 1.0
    assert gaussian_overlap(unit, GaussianFit(5, 40.0, 1.0)) < 1e-12
    # Equal spreads cross once, halfway: the overlap is twice the tail beyond half the distance.
    assert gaussian_overlap(unit, GaussianFit(5, 2.0, 1.0)) == pytest.approx(2 * stats.norm.cdf(-1.0), abs=1e-12)
    # N(0, 1) and N(0, 2) cross where x^2 = 8 ln 2 / 3: the wide density is lower inside, the narrow outside.
    c = math.sqrt(8 * math.log(2) / 3)
    expected = 2 * stats.norm.sf(c) + (2 * stats.norm.cdf(c / 2) - 1)
    assert gaussian_overlap(unit, GaussianFit(5, 0.0, 2.0)) == pytest.approx(expected, abs=1e-12)


def test_overlap_matches_numerical_integration_and_is_symmetric():
    rng = np.random.default_rng(9)
    for _ in range(20):
        a = GaussianFit(10, rng.uniform(0, 1), rng.uniform(0.02, 0.3))
        b = GaussianFit(10, rng.uniform(0, 1), rng.uniform(0.02, 0.3))
        value = gaussian_overlap(a, b)
        assert value == pytest.approx(_numeric_overlap(a, b), abs=1e-7)
        assert value == pytest.approx(gaussian_overlap(b, a), abs=1e-12)
    nearly_equal = GaussianFit(10, 0.55, 0.1 * (1 + 1e-13))
    assert gaussian_overlap(GaussianFit(10, 0.5, 0.1), nearly_equal) == pytest.approx(
        2 * stats.norm.cdf(-0.25), abs=1e-9)


def test_density_separation_numbers():
    rng = np.random.default_rng(10)
    high, low = rng.normal(0.7, 0.06, 400), rng.normal(0.4, 0.09, 300)
    sep = density_separation(high, low)
    assert (sep.high.n, sep.low.n) == (400, 300)
    assert sep.high.mean == pytest.approx(high.mean()) and sep.low.std == pytest.approx(low.std(ddof=1))
    pooled = math.sqrt((high.std(ddof=1) ** 2 + low.std(ddof=1) ** 2) / 2)
    assert sep.d_prime == pytest.approx((high.mean() - low.mean()) / pooled)
    assert sep.overlap == pytest.approx(_numeric_overlap(sep.high, sep.low), abs=1e-7)
    assert 0.01 < sep.overlap < 0.2
    assert density_separation(low, high).d_prime == pytest.approx(-sep.d_prime)
    with pytest.raises(MetricsError, match="all 3 scores of the low-quality set are equal"):
        density_separation(high, [0.2, 0.2, 0.2])
    with pytest.raises(MetricsError, match="at least 2"):
        density_separation([0.5], low)


def test_three_pairs_use_a_flagged_straight_line_rather_than_failing():
    """``MIN_PAIRS`` is 3, but a four-parameter logistic needs four points: scipy would raise a TypeError."""
    from pipeline.analysis.metrics import MIN_PAIRS, compute_metrics

    result = compute_metrics([0.2, 0.5, 0.9], [30.0, 52.0, 80.0], bootstrap=0)
    assert MIN_PAIRS == 3 and result.mapping.kind == "linear" and "at least 4 pairs, got 3" in result.mapping.message
    assert result.srocc.value == pytest.approx(1.0)
