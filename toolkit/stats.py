"""The statistics of an experiment's verdict: a mean over seeds with its t interval, the paired
t-test of a variant against the baseline (same seed = same init and data order), Holm's correction
for several variants, the call, the smallest difference the seeds could detect, and whether a
ranking holds from one model size to the next.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize, stats

ALPHA = 0.05  # two-sided significance level of every test and interval (95%)
POWER = 0.8  # for the smallest detectable difference


@dataclass
class Summary:
    """Mean over seeds, sample standard deviation and the 95% t interval of the mean (NaN for one seed)."""
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass
class Paired:
    """A variant minus the baseline, seed by seed: the mean difference, its 95% interval and the
    two-sided paired t-test's p-value."""
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t: float
    p: float


def t_quantile(n: int) -> float:
    """The two-sided (1 - ALPHA) quantile of Student's t with n - 1 degrees of freedom."""
    return float(stats.t.ppf(1 - ALPHA / 2, n - 1))


def summarize(values) -> Summary:
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = t_quantile(n) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_test(variant: dict, baseline: dict) -> Paired:
    """variant and baseline: {seed: value}; only seeds present in both are paired. Differences that
    are all exactly zero give p = 1 (no evidence of any difference) rather than 0/0; equal non-zero
    differences give p = 0 (t is infinite); fewer than two pairs give no test (p is NaN)."""
    seeds = sorted(set(variant) & set(baseline))
    d = np.array([variant[s] - baseline[s] for s in seeds], dtype=float)
    summary = summarize(d)
    if summary.n < 2:
        return Paired(summary.n, summary.mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    if summary.std == 0:
        t = 0.0 if summary.mean == 0 else math.copysign(math.inf, summary.mean)
        return Paired(summary.n, summary.mean, 0.0, summary.mean, summary.mean, t, 1.0 if t == 0 else 0.0)
    t = summary.mean / (summary.std / math.sqrt(summary.n))
    p = float(2 * stats.t.sf(abs(t), summary.n - 1))
    return Paired(summary.n, summary.mean, summary.std, summary.ci_low, summary.ci_high, t, p)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the k-th smallest of m p-values is multiplied by m - k + 1, and
    the adjusted values are made non-decreasing in that order (capped at 1). NaN (no test) stays NaN
    and does not count in m."""
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(tested)
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, i in enumerate(sorted(tested, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def call(mean_difference: float, p_adjusted: float) -> str:
    """better / worse / within noise for a difference in a lower-is-better figure (bits per byte)."""
    if p_adjusted < ALPHA:
        return "better" if mean_difference < 0 else "worse"
    return "within noise"


def power(difference: float, std: float, n: int) -> float:
    """Probability that a two-sided paired t-test at ALPHA over n seeds finds `difference` when the
    seed-to-seed differences have standard deviation `std`: P(|Z + shift| > critical * S) with Z standard
    normal, S = sqrt(chi2(n - 1) / (n - 1)) and shift = difference / (std / sqrt(n)), integrated over
    chi2 (the noncentral t distribution, written out: scipy's nct gives NaN in its far tails)."""
    df, critical = n - 1, t_quantile(n)
    shift = difference / (std / math.sqrt(n))

    def rejected(v):
        s = math.sqrt(v / df)
        return (stats.norm.cdf(shift - critical * s) + stats.norm.cdf(-shift - critical * s)) * stats.chi2.pdf(v, df)

    low, high = stats.chi2.ppf([1e-12, 1 - 1e-12], df)  # where chi2 has its mass: quad must not miss the peak
    return float(integrate.quad(rejected, low, high, points=[max(df - 2, low)], limit=200)[0])


def min_detectable_difference(std: float, n: int) -> float:
    """The smallest difference a paired t-test over n seeds finds with probability POWER, when the
    differences have standard deviation `std`. NaN when it cannot be said (fewer than 2 seeds or no spread)."""
    if n < 2 or not std > 0:
        return math.nan
    upper = std * 64 / math.sqrt(n)  # far beyond detection for any n >= 2 (power > 0.99)
    return float(optimize.brentq(lambda delta: power(delta, std, n) - POWER, 0.0, upper, xtol=std * 1e-10))


def ranking(means: dict) -> list:
    """Names ordered best (lowest) first; NaN (no result) last."""
    return sorted(means, key=lambda name: (math.isnan(means[name]), means[name]))


def kendall_tau(first: list, second: list) -> float:
    """Rank agreement of two orderings of the same names: 1 identical, -1 reversed."""
    common = [name for name in first if name in second]
    if len(common) < 2:
        return math.nan
    return float(stats.kendalltau([first.index(n) for n in common], [second.index(n) for n in common]).statistic)


def loss_spikes(losses, rise: float = 0.1) -> tuple[int, float]:
    """(spikes, largest rise) of a training-loss curve: a spike starts where the loss climbs more than
    `rise` (10%) above the lowest value logged before it, and lasts until it is back below that
    level; the largest rise is the biggest such excess as a fraction (0 when the loss never rose)."""
    spikes, largest, lowest, inside = 0, 0.0, math.inf, False
    for loss in losses:
        if not math.isfinite(loss):
            continue
        excess = loss / lowest - 1 if math.isfinite(lowest) else 0.0
        largest = max(largest, excess)
        if excess > rise and not inside:
            spikes += 1
        inside = excess > rise
        lowest = min(lowest, loss)
    return spikes, largest
