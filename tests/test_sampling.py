"""Samplers on fixed distributions: what each keeps, temperature's scaling, the order they run in."""
import pytest
import torch

from toolkit.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    draw,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
LOGITS = PROBS.log()


def kept(logits):
    """Indices each row keeps (finite logits)."""
    return [set(torch.nonzero(row.isfinite()).flatten().tolist()) for row in logits]


def test_top_k_keeps_exactly_k_largest():
    assert kept(top_k_filter(LOGITS, 1)) == [{1}]
    assert kept(top_k_filter(LOGITS, 2)) == [{1, 3}]
    assert kept(top_k_filter(LOGITS, 3)) == [{1, 2, 3}]
    assert kept(top_k_filter(LOGITS, 10)) == [{0, 1, 2, 3}]
    ties = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0]])
    assert [len(row) for row in kept(top_k_filter(ties, 3))] == [3]  # exactly k even with ties
    logits = torch.randn(5, 100)
    filtered = top_k_filter(logits, 7)
    assert (filtered.isfinite().sum(1) == 7).all()
    assert torch.equal(filtered[filtered.isfinite()], logits[filtered.isfinite()])  # kept logits unchanged


@pytest.mark.parametrize("p, expected", [(0.3, {1}), (0.5, {1}), (0.51, {1, 3}), (0.79, {1, 3}), (0.81, {1, 2, 3}),
                                         (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_with_mass_at_least_p(p, expected):
    assert kept(top_p_filter(LOGITS, p)) == [expected]


def test_top_p_against_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(50, 30) * 2
    for p in (0.1, 0.5, 0.9):
        probs = logits.double().softmax(-1)
        for row, kept_row in zip(probs, kept(top_p_filter(logits, p))):
            order = row.argsort(descending=True).tolist()
            n = next(n for n in range(1, 31) if row[order[:n]].sum() >= p)  # smallest top-n set reaching p
            assert kept_row == set(order[:n])


def test_min_p_threshold_is_relative_to_top_probability():
    # threshold = min_p * 0.5: min_p 0.2 -> 0.1 keeps 0.5, 0.3, 0.15; min_p 0.5 -> 0.25 keeps 0.5, 0.3
    assert kept(min_p_filter(LOGITS, 0.2)) == [{1, 2, 3}]
    assert kept(min_p_filter(LOGITS, 0.5)) == [{1, 3}]
    assert kept(min_p_filter(LOGITS, 0.0)) == [{0, 1, 2, 3}]
    # A peaked row: the top token has 0.9, so min_p 0.1 cuts at 0.09 and drops the 0.05s, which an
    # absolute cut at 0.1 would also do, but min_p 0.05 (cut 0.045) keeps them.
    peaked = torch.tensor([[0.9, 0.05, 0.05]]).log()
    assert kept(min_p_filter(peaked, 0.1)) == [{0}]
    assert kept(min_p_filter(peaked, 0.05)) == [{0, 1, 2}]
    # Scaling all probabilities (other rows) does not change what is kept: only ratios to the top matter.
    flat = torch.tensor([[0.2, 0.2, 0.1, 0.05]]).log()
    assert kept(min_p_filter(flat, 0.3)) == [{0, 1, 2}]


def test_temperature_scales_logits():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    # T = 0.5 squares the probabilities (then renormalises): 0.25, 0.0625, 0.0625 -> 2/3, 1/6, 1/6
    sharp = apply_temperature(probs.log(), 0.5).softmax(-1)
    assert torch.allclose(sharp, torch.tensor([[2 / 3, 1 / 6, 1 / 6]]), atol=1e-6)
    # T = 2 takes square roots: sqrt(.5), sqrt(.25), sqrt(.25) normalised
    flat = apply_temperature(probs.log(), 2.0).softmax(-1)
    roots = probs.sqrt()
    assert torch.allclose(flat, roots / roots.sum(), atol=1e-6)
    assert torch.allclose(apply_temperature(LOGITS, 1.0), LOGITS)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_greedy_is_temperature_zero_after_the_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 4.0]])
    assert sample(logits, temp=0).tolist() == [0, 1]
    seen = torch.tensor([[True, False, False], [False, True, False]])
    assert sample(logits, temp=0, repetition_penalty=2.0, seen=seen).tolist() == [1, 2]


def test_draw_follows_the_distribution():
    generator = torch.Generator().manual_seed(0)
    ids = draw(LOGITS.expand(40000, 4), generator)
    frequencies = torch.bincount(ids, minlength=4) / 40000
    assert torch.allclose(frequencies, PROBS[0], atol=0.01)


def test_order_temperature_before_top_p_and_filters_combine():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(2000, 3)
    # At T=1, top_p=0.7 keeps tokens 0 and 1; at T=0.1 token 0 has ~all the mass, so only it is kept.
    assert set(sample(logits, temp=1.0, top_p=0.7, generator=generator).tolist()) == {0, 1}
    assert set(sample(logits, temp=0.1, top_p=0.7, generator=generator).tolist()) == {0}
    # top_k=2 then min_p=0.6 (cut at 0.6 * 0.6 = 0.36 of the top): only token 0 survives both.
    assert set(sample(logits, top_k=2, min_p=0.6, generator=generator).tolist()) == {0}
    assert set(sample(logits, top_k=2, generator=generator).tolist()) == {0, 1}


def test_samplers_are_pure_and_seeded():
    logits = torch.randn(4, 50)
    before = logits.clone()
    settings = dict(temp=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seen=torch.rand(4, 50) > 0.5)
    runs = [sample(logits, **settings, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1)]
    assert torch.equal(logits, before)
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (4,)
