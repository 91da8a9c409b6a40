"""Scaling-law fits: held-out loss against training compute, L(C) = E + A C^-alpha (Kaplan et al. 2020),
and against size and data, L(N, D) = E + A / N^a + B / D^b (Hoffmann et al. 2022), with bootstrap
intervals over seeds and a forecast for a size the fit never saw.

Conventions, which move the exponents at small scale (Pearce and Song 2024): N counts parameters
without embeddings, C = flops_per_token x tokens (the model's own count, attention included), and
L(C) is fitted to the compute frontier of finished runs (each point is the end of a whole schedule,
never a mid-schedule checkpoint).
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize


@dataclass
class Point:
    """One (size, tokens) setting: its runs' held-out losses, one per seed."""
    params: float  # N: parameters without embeddings
    tokens: float  # D
    compute: float  # C = flops_per_token x D
    losses: list[float]
    label: str = ""

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))


def compute_law(c, e, a, alpha):
    return e + a * np.power(c, -alpha)


def chinchilla_law(n, d, e, a, alpha, b, beta):
    return e + a * np.power(n, -alpha) + b * np.power(d, -beta)


def frontier(points: list[Point], losses: list[float] | None = None) -> list[int]:
    """Indices of the points on the compute frontier: each has a lower loss than every point of less
    compute (sorted by compute)."""
    losses = [p.loss for p in points] if losses is None else losses
    order = sorted(range(len(points)), key=lambda i: points[i].compute)
    chosen, best = [], math.inf
    for i in order:
        if losses[i] < best:
            chosen.append(i)
            best = losses[i]
    return chosen


def best_fit(residuals, starts, lower, upper, **options):
    """The least-squares solution with the lowest cost over several starting points."""
    best = None
    for start in starts:
        start = np.clip(start, np.asarray(lower) + 1e-9, np.asarray(upper) - 1e-9)
        fit = optimize.least_squares(residuals, start, bounds=(lower, upper), **options)
        if best is None or fit.cost < best.cost:
            best = fit
    return best.x


def fit_compute(compute, loss, start: tuple | None = None) -> tuple[float, float, float]:
    """(E, A, alpha) of L(C) = E + A C^-alpha by least squares on log L, C taken relative to its
    smallest value (so A is of order one), from a grid of starting points (or from `start`, a fit of
    similar data: the bootstrap's shortcut); E in [0, min L]."""
    c, loss = np.asarray(compute, float), np.asarray(loss, float)
    c0 = c.min()
    x = c / c0

    def residuals(theta):
        e, log_a, alpha = theta
        return np.log(e + np.exp(log_a) * x ** -alpha) - np.log(loss)

    if start is None:
        starts = [[e0, math.log(max(loss.max() - e0, 1e-6)), alpha0]
                  for e0 in (0.0, 0.5 * loss.min(), 0.9 * loss.min()) for alpha0 in (0.1, 0.3, 0.6)]
    else:
        e, a, alpha = start
        starts = [[min(e, loss.min()), math.log(a / c0 ** alpha), alpha]]
    e, log_a, alpha = best_fit(residuals, starts, [0, -30, 0], [loss.min(), 30, 3])
    return float(e), float(math.exp(log_a) * c0 ** alpha), float(alpha)


def fit_chinchilla(params, tokens, loss, start: tuple | None = None) -> tuple[float, float, float, float, float]:
    """(E, A, alpha, B, beta) of L(N, D) = E + A/N^alpha + B/D^beta: least squares on log L from a grid of
    starts (as Hoffmann et al., with a Huber loss against outliers; or from `start`), N and D relative
    to their smallest."""
    n, d, loss = (np.asarray(v, float) for v in (params, tokens, loss))
    n0, d0 = n.min(), d.min()
    xn, xd = n / n0, d / d0

    def residuals(theta):
        e, log_a, alpha, log_b, beta = theta
        return np.log(e + np.exp(log_a) * xn ** -alpha + np.exp(log_b) * xd ** -beta) - np.log(loss)

    if start is None:
        share = lambda e0: math.log(max(loss.max() - e0, 1e-6) / 2)  # noqa: E731
        starts = [[e0, share(e0), alpha0, share(e0), beta0] for e0 in (0.0, 0.5 * loss.min(), 0.9 * loss.min())
                  for alpha0 in (0.2, 0.5, 1.0) for beta0 in (0.2, 0.5, 1.0)]
    else:
        e, a, alpha, b, beta = start
        starts = [[min(e, loss.min()), math.log(a / n0 ** alpha), alpha, math.log(b / d0 ** beta), beta]]
    e, log_a, alpha, log_b, beta = best_fit(residuals, starts, [0, -30, 0, -30, 0], [loss.min(), 30, 3, 30, 3],
                                            loss="huber", f_scale=1e-2)
    return float(e), float(math.exp(log_a) * n0 ** alpha), float(alpha), float(math.exp(log_b) * d0 ** beta), \
        float(beta)


def compute_optimal(fit: tuple, compute: float, flops_per_param_token: float = 6.0) -> tuple[float, float]:
    """(N, D) minimising L(N, D) at compute C = k N D (k = 6 for the usual 6 N D): the Chinchilla
    allocation N = G (C/k)^(beta/(alpha+beta)), D = (C/k)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta))."""
    _, a, alpha, b, beta = fit
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    budget = compute / flops_per_param_token
    n = g * budget ** (beta / (alpha + beta))
    return n, budget / n


@dataclass
class Forecast:
    """The fit without the largest size, and what it says of that size's runs."""
    held_out: list[Point]
    predicted: list[float]
    low: list[float]  # 95% bootstrap interval of each prediction
    high: list[float]
    law: str  # "L(N, D)" or "L(C)"
    fit: tuple

    @property
    def inside(self) -> list[bool]:
        return [lo <= p.loss <= hi for p, lo, hi in zip(self.held_out, self.low, self.high)]


def resampled(points: list[Point], rng) -> list[float]:
    """Each point's loss, averaged over its seeds drawn with replacement."""
    return [float(np.mean(rng.choice(p.losses, size=len(p.losses)))) for p in points]


def fit_points(points: list[Point], losses: list[float], law: str, start: tuple | None = None) -> tuple:
    if law == "L(N, D)":
        return fit_chinchilla([p.params for p in points], [p.tokens for p in points], losses, start)
    on = frontier(points, losses)
    return fit_compute([points[i].compute for i in on], [losses[i] for i in on], start)


def predict(fit: tuple, law: str, point: Point) -> float:
    if law == "L(N, D)":
        return float(chinchilla_law(point.params, point.tokens, *fit))
    return float(compute_law(point.compute, *fit))


def chinchilla_possible(points: list[Point]) -> bool:
    """Enough sizes and token counts to fit five parameters: at least 3 of each and 6 points."""
    return len({p.params for p in points}) >= 3 and len({p.tokens for p in points}) >= 2 and len(points) >= 6


def seed_noise(points: list[Point]) -> float:
    """The relative standard deviation of one run's loss around its point's mean, pooled over the points
    with several seeds (0 when none has)."""
    deviations = [v / p.loss - 1 for p in points if len(p.losses) > 1 for v in p.losses]
    dof = sum(len(p.losses) - 1 for p in points if len(p.losses) > 1)
    return math.sqrt(sum(d * d for d in deviations) / dof) if dof else 0.0


def forecast(points: list[Point], samples: int = 1000, seed: int = 0) -> Forecast:
    """Fit every point but those of the largest size (L(N, D) when the rest allow it, else L(C) on its
    frontier) and predict the largest size's points. Each prediction's 95% interval covers what its
    measurement (a mean over seeds) may show: the spread of fits to seed-resampled losses plus the seed
    noise of such a mean, pooled from the fitted points. The held-out points take no part in any of it."""
    largest = max(p.params for p in points)
    fitted = [p for p in points if p.params != largest]
    held_out = [p for p in points if p.params == largest]
    law = "L(N, D)" if chinchilla_possible(fitted) else "L(C)"
    fit = fit_points(fitted, [p.loss for p in fitted], law)
    rng = np.random.default_rng(seed)
    noise = seed_noise(fitted)
    draws = np.array([[predict(fit_points(fitted, resampled(fitted, rng), law, fit), law, p)
                       * (1 + noise / math.sqrt(len(p.losses)) * rng.standard_normal()) for p in held_out]
                      for _ in range(samples)])
    low, high = np.percentile(draws, 2.5, axis=0), np.percentile(draws, 97.5, axis=0)
    return Forecast(held_out, [predict(fit, law, p) for p in held_out], low.tolist(), high.tolist(), law, fit)


def bootstrap_fits(points: list[Point], law: str, samples: int = 1000, seed: int = 0) -> np.ndarray:
    """The law's parameters fitted to `samples` seed-resampled copies of the points (one row each)."""
    rng = np.random.default_rng(seed)
    fit = fit_points(points, [p.loss for p in points], law)
    return np.array([fit_points(points, resampled(points, rng), law, fit) for _ in range(samples)])
