"""The built-in MLPs and activations against their formulas (every registered one, built-in or new,
also runs through tests/test_contracts.py)."""
import math

import pytest
import torch

from config import ModelConfig
from modules.mlp import ACTIVATIONS, MLP, MLPS, GatedMLP

ACTIVATION_FORMULAS = {
    "relu": lambda x: torch.where(x > 0, x, 0.0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "relu2": lambda x: torch.where(x > 0, x, 0.0) ** 2,
}


@pytest.mark.parametrize("name", sorted(ACTIVATION_FORMULAS))
def test_activation_matches_formula(name):
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    assert torch.allclose(ACTIVATIONS[name](x), ACTIVATION_FORMULAS[name](x), atol=1e-12)


def config(**overrides):
    return ModelConfig(dim=16, n_heads=2, n_kv_heads=None, mlp_hidden=24, **overrides)


@pytest.mark.parametrize("activation", sorted(ACTIVATION_FORMULAS))
@pytest.mark.parametrize("bias", [False, True])
def test_plain_mlp_matches_formula(activation, bias):
    mlp = MLP(config(activation=activation, bias=bias))
    x = torch.randn(2, 3, 16)
    up = x @ mlp.up.weight.T + (mlp.up.bias if bias else 0)
    expected = ACTIVATION_FORMULAS[activation](up) @ mlp.down.weight.T + (mlp.down.bias if bias else 0)
    assert torch.allclose(mlp(x), expected, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_gated_mlp_matches_formula(activation):
    mlp = GatedMLP(config(activation=activation))
    gate_weight, up_weight = mlp.up.weight[:24], mlp.up.weight[24:]
    x = torch.randn(2, 3, 16)
    expected = (ACTIVATION_FORMULAS[activation](x @ gate_weight.T) * (x @ up_weight.T)) @ mlp.down.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert mlp.up.weight.shape == (48, 16) and mlp.down.weight.shape == (16, 24)


@pytest.mark.parametrize("name", sorted(MLPS))
def test_every_mlp_parameter_gets_a_gradient(name):
    mlp = MLPS[name](config(bias=True), 0)
    mlp(torch.randn(4, 16)).square().sum().backward()
    for param_name, p in mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


def test_hidden_size_by_multiplier_explicit_and_rounded():
    assert ModelConfig(dim=128, mlp_multiplier=4.0).mlp_hidden == 512
    assert ModelConfig(dim=128, mlp_multiplier=8 / 3).mlp_hidden == 341
    assert ModelConfig(dim=384, n_heads=4, mlp_multiplier=8 / 3).mlp_hidden == 1024  # no float round-down
    assert ModelConfig(dim=128, mlp_multiplier=8 / 3, mlp_multiple_of=64).mlp_hidden == 384
    assert ModelConfig(dim=128, mlp_hidden=100, mlp_multiple_of=64).mlp_hidden == 100  # explicit wins
