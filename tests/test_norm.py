"""Each built-in norm against its formula; affine/bias switches; parameters registered and trained.
(Every registered norm, built-in or new, also runs through tests/test_contracts.py.)"""
import pytest
import torch

from config import ConfigError, ModelConfig
from modules.norm import CosineNorm, LayerNorm, RMSNorm, make_norm


def random_norm(name, dim=16, affine=True, bias=True):
    cfg = ModelConfig(dim=dim, n_heads=1, n_kv_heads=None, norm=name, norm_eps=1e-5, norm_affine=affine, norm_bias=bias)
    norm = make_norm(cfg)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


def rms(x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def layer_norm(x, eps):
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


FORMULAS = {  # the normalisation itself, before scale and shift
    "rmsnorm": lambda norm, x, eps: rms(x, eps),
    "layernorm": lambda norm, x, eps: layer_norm(x, eps),
    "cosinenorm": lambda norm, x, eps: x / x.norm(dim=-1, keepdim=True).clamp(min=eps),
    "dyt": lambda norm, x, eps: torch.tanh(norm.alpha * x),
}


def formula(name, norm, x, w, b, eps=1e-5):
    y = FORMULAS[name](norm, x, eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False), (False, True)])
def test_norm_matches_formula(name, affine, bias):
    norm = random_norm(name, affine=affine, bias=bias)
    x = torch.randn(3, 5, 16) * 3 + 1
    assert torch.allclose(norm(x), formula(name, norm, x, norm.weight, norm.bias), atol=1e-5)
    assert (norm.weight is not None) == affine and (norm.bias is not None) == bias


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_norm_parameters_are_registered_and_get_gradients(name):
    norm = random_norm(name).double()  # an unregistered tensor would stay float32 and fail below
    x = torch.randn(4, 16, dtype=torch.float64)
    norm(x).pow(2).sum().backward()
    for param_name, p in norm.named_parameters():
        assert p.dtype == torch.float64 and p.grad is not None and p.grad.abs().sum() > 0, param_name
    assert {"weight", "bias"} <= set(norm.state_dict())


def test_norm_output_scale():
    """The defining property of each norm on a fresh (identity-affine) module."""
    x = torch.randn(8, 64) * 5 + 2
    cfg = ModelConfig(dim=64, n_heads=1, n_kv_heads=None, norm_bias=True)
    assert torch.allclose(RMSNorm(cfg)(x).pow(2).mean(-1), torch.ones(8), atol=1e-3)
    y = LayerNorm(cfg)(x)
    assert torch.allclose(y.mean(-1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(8), atol=1e-3)
    assert torch.allclose(CosineNorm(cfg)(x).norm(dim=-1), torch.ones(8), atol=1e-5)


def test_dyt_starts_at_its_alpha_and_squashes():
    cfg = ModelConfig(dim=64, n_heads=1, n_kv_heads=None, norm="dyt", dyt_alpha=0.8)
    norm = make_norm(cfg)
    assert norm.alpha.item() == pytest.approx(0.8)
    x = torch.randn(8, 64)
    assert norm(x * 100).abs().max() <= 1 and torch.allclose(norm(x * 1e-3), 0.8 * x * 1e-3, atol=1e-8)  # ~ linear at 0
    with pytest.raises(ConfigError, match=r"^dyt_alpha=0.0 is not valid: must be positive$"):
        ModelConfig(norm="dyt", dyt_alpha=0.0)
