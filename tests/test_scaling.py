"""Scaling-law fits recover known laws from noisy synthetic losses; the forecast of the largest size
uses the other points only; sizes as a product with their own budgets, and every seed on the grid,
plan the runs they say; a tiny study writes the learning-rate-transfer and scaling sections."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import optimize
from test_experiment import TINY_TRAIN, plan, ran_study, write_texts

from toolkit import report, scaling
from toolkit.experiment import Experiment, ExperimentError
from toolkit.report import plan_table

LAW = dict(e=0.8, a=20.0, alpha=0.35, b=50.0, beta=0.3)  # bits per byte of the order of this study's
SIZES, TOKENS = (1e4, 2.5e4, 6e4, 1.5e5, 4e5, 1e6), (2.5e5, 5e5, 1e6, 2e6)


def synthetic(noise=0.003, seeds=3, seed=0) -> list[scaling.Point]:
    rng = np.random.default_rng(seed)
    points = []
    for n in SIZES:
        for d in TOKENS:
            loss = scaling.chinchilla_law(n, d, **LAW)
            points.append(scaling.Point(n, d, 6 * n * d, list(loss * (1 + noise * rng.standard_normal(seeds)))))
    return points


def test_chinchilla_fit_recovers_the_exponents_from_noisy_losses():
    points = synthetic()
    e, a, alpha, b, beta = scaling.fit_chinchilla([p.params for p in points], [p.tokens for p in points],
                                                  [p.loss for p in points])
    assert alpha == pytest.approx(LAW["alpha"], abs=0.04) and beta == pytest.approx(LAW["beta"], abs=0.04)
    assert e == pytest.approx(LAW["e"], abs=0.1)
    exact = [scaling.Point(p.params, p.tokens, p.compute, [scaling.chinchilla_law(p.params, p.tokens, **LAW)])
             for p in points]
    fit = scaling.fit_chinchilla([p.params for p in exact], [p.tokens for p in exact], [p.loss for p in exact])
    assert fit == pytest.approx((LAW["e"], LAW["a"], LAW["alpha"], LAW["b"], LAW["beta"]), rel=1e-3)


def test_compute_fit_recovers_its_exponent_and_uses_the_frontier():
    rng = np.random.default_rng(1)
    c = np.geomspace(1e11, 1e15, 14)
    loss = scaling.compute_law(c, 0.9, 400.0, 0.15) * (1 + 0.002 * rng.standard_normal(c.size))
    e, a, alpha = scaling.fit_compute(c, loss)
    assert alpha == pytest.approx(0.15, abs=0.02) and e == pytest.approx(0.9, abs=0.1)
    # the frontier: each point lower than every point of less compute
    points = [scaling.Point(1, 1, c, [v]) for c, v in [(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0), (5, 3.0), (6, 2.0)]]
    assert scaling.frontier(points) == [0, 1, 3, 5]


def test_compute_optimal_allocation_minimises_the_fitted_law():
    fit = (LAW["e"], LAW["a"], LAW["alpha"], LAW["b"], LAW["beta"])
    compute = 3e13
    n, d = scaling.compute_optimal(fit, compute)
    assert 6 * n * d == pytest.approx(compute)
    def loss_at(log_n):  # all of the compute spent: D = C / (6 N)
        return scaling.chinchilla_law(math.exp(log_n), compute / 6 / math.exp(log_n), *fit)

    found = optimize.minimize_scalar(loss_at, bounds=(0, 40), method="bounded")
    assert math.log(n) == pytest.approx(found.x, abs=1e-3)


def test_the_forecast_of_the_largest_size_uses_the_other_points_only():
    points = synthetic()
    forecast = scaling.forecast(points, samples=100)
    assert forecast.law == "L(N, D)" and {p.params for p in forecast.held_out} == {max(SIZES)}
    assert all(forecast.inside)  # the law holds, so its noisy measurements fall in the interval
    spoiled = [scaling.Point(p.params, p.tokens, p.compute, [10 * v for v in p.losses]) if p.params == max(SIZES)
               else p for p in points]
    again = scaling.forecast(spoiled, samples=100)
    assert again.predicted == forecast.predicted and again.low == forecast.low and again.high == forecast.high
    assert not any(again.inside)
    exact = {p.tokens: scaling.chinchilla_law(p.params, p.tokens, **LAW) for p in forecast.held_out}
    assert all(abs(pred / exact[p.tokens] - 1) < 0.02 for p, pred in zip(forecast.held_out, forecast.predicted))


def grid_plan(texts, **values) -> dict:
    """The tiny plan with its rate left to lr_grid."""
    train = {k: v for k, v in TINY_TRAIN.items() if k not in ("lr", "min_lr")} | {"data": str(texts / "stories.txt")}
    return plan(texts, train=train, **values)


def test_sizes_as_a_product_with_budgets_and_every_seed_on_the_grid(tmp_path):
    texts = write_texts(tmp_path)
    experiment = Experiment.from_dict(grid_plan(texts, sizes={"dim": [16, 32], "tokens": [1280, 2560]}, seeds=2,
                                                lr_grid=[1e-3, 2e-3], grid_seeds="all"))
    assert experiment.size_labels == ["dim16-tokens1280", "dim16-tokens2560", "dim32-tokens1280", "dim32-tokens2560"]
    runs = experiment.runs()
    assert len(runs) == 4 * 2 * 2  # every size, seed and rate: the grid is all there is to run
    tokens_per_step = 4 * 32
    assert {r.name: r.train.max_steps for r in runs}["study/dim16-tokens2560/baseline/lr0.002/seed1"] == \
        2560 // tokens_per_step
    assert {r.model.dim for r in runs} == {16, 32}
    table = plan_table(experiment).splitlines()
    assert len(table) == 2 + len(runs) and "then seeds" not in table[-1]  # every run listed, none still to choose
    first = plan_table(Experiment.from_dict(grid_plan(texts, seeds=2, lr_grid=[1e-3, 2e-3]))).splitlines()
    assert len(first) == 2 + 2 + 1 and first[-1].startswith("then seeds 1 of baseline at the rate")
    with pytest.raises(ExperimentError, match="grid_seeds is about lr_grid"):
        Experiment.from_dict(plan(texts, grid_seeds="all"))
    with pytest.raises(ExperimentError, match="grid_seeds='some' is not valid"):
        Experiment.from_dict(grid_plan(texts, grid_seeds="some", lr_grid=[1e-3]))
    with pytest.raises(ExperimentError, match="sizes=.* is not valid"):
        Experiment.from_dict(plan(texts, sizes={"dim": 16}))


@pytest.fixture(scope="module")
def sized_study(tmp_path_factory):
    """Four widths x two step counts of tiny models, two rates on seed 0, then seed 1 at the best."""
    def sized(texts):
        return grid_plan(texts, name="sized", seeds=2, lr_grid=[2e-3, 8e-3], budget={"steps": 10},
                         sizes={"dim": [8, 16, 24, 32], "steps": [5, 10]},
                         variants={"mup": {"parametrization": "mup", "base_dim": 16}})

    for experiment, files, _ in ran_study(tmp_path_factory.mktemp("sized"), sized):
        yield experiment, files


def test_a_sized_study_reports_learning_rate_transfer_and_a_scaling_fit(sized_study):
    experiment, files = sized_study
    names = {f.name for f in files}
    assert {"lr_transfer.png", "scaling.png"} <= names
    text = (experiment.folder / "report.md").read_text()
    assert "## Learning rate across sizes" in text and "## Scaling" in text
    found = report.lr_transfer(report.Study(experiment))["mup"]
    runs = {r.name: r.result() for r in experiment.runs()}
    size, lr = "dim16-steps10", 8e-3
    assert found["means"][(size, lr)] == pytest.approx(runs[f"sized/{size}/mup/lr{lr:g}/seed0"]["eval_bpb"])
    best = {s: min(experiment.lr_grid, key=lambda r: found["means"][(s, r)]) for s in found["sizes"]}
    assert found["best"] == best and len(found["sizes"]) == 8
    fits = report.scaling_fits(report.Study(experiment))["mup"]
    assert {p.label for p in fits["forecast"].held_out} == {"dim32-steps5", "dim32-steps10"}
    assert {p.tokens for p in fits["points"]} == {5 * 4 * 32, 10 * 4 * 32}
    assert "Forecast of the largest size from the others only" in text


def test_a_wider_model_is_worse_beyond_noise_only_past_twice_the_standard_error():
    """Seeds' spread pooled over the sizes at each rate: 0.01414 here, so a difference of two 2-seed means
    counts past 2 x 0.01414 = 0.028 bits per byte; one seed per cell gives no estimate at all."""
    scores = [("a", 1e-3, 0, 1.00), ("a", 1e-3, 1, 1.02), ("b", 1e-3, 0, 1.01), ("b", 1e-3, 1, 1.03),
              ("a", 2e-3, 0, 1.00), ("a", 2e-3, 1, 1.02), ("b", 2e-3, 0, 1.10), ("b", 2e-3, 1, 1.12),
              ("c", 2e-3, 0, math.inf)]
    table = pd.DataFrame(scores, columns=["size", "lr", "seed", "eval_bpb"])
    worse = [(1e-3, "a", "b"), (2e-3, "a", "b")]
    assert report.worse_beyond_noise(table, worse) == [(2e-3, "a", "b")]
    assert report.worse_beyond_noise(table[table["seed"] == 0], worse) is None
