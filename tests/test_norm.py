"""Each norm against its formula; affine/bias switches; parameters registered and trained."""
import pytest
import torch

from modules.norm import NORMS, CosineNorm, LayerNorm, RMSNorm


def random_norm(cls, dim=16, affine=True, bias=True):
    norm = cls(dim, eps=1e-5, affine=affine, bias=bias)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


def formula(name, x, w, b, eps=1e-5):
    if name == "rmsnorm":
        y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    elif name == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        y = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = x / x.norm(dim=-1, keepdim=True).clamp(min=eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False), (False, True)])
def test_norm_matches_formula(name, affine, bias):
    norm = random_norm(NORMS[name], affine=affine, bias=bias)
    x = torch.randn(3, 5, 16) * 3 + 1
    assert torch.allclose(norm(x), formula(name, x, norm.weight, norm.bias), atol=1e-5)
    assert (norm.weight is not None) == affine and (norm.bias is not None) == bias
    assert len(list(norm.parameters())) == affine + bias


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm, CosineNorm])
def test_norm_parameters_are_registered_and_get_gradients(cls):
    norm = random_norm(cls).double()  # an unregistered tensor would stay float32 and fail below
    x = torch.randn(4, 16, dtype=torch.float64)
    norm(x).pow(2).sum().backward()
    for name, p in norm.named_parameters():
        assert p.dtype == torch.float64 and p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(norm.state_dict()) == {"weight", "bias"}


def test_norm_output_scale():
    """The defining property of each norm on a fresh (identity-affine) module."""
    x = torch.randn(8, 64) * 5 + 2
    assert torch.allclose(RMSNorm(64)(x).pow(2).mean(-1), torch.ones(8), atol=1e-3)
    y = LayerNorm(64, bias=True)(x)
    assert torch.allclose(y.mean(-1), torch.zeros(8), atol=1e-5) and torch.allclose(y.var(-1, unbiased=False), torch.ones(8), atol=1e-3)
    assert torch.allclose(CosineNorm(64)(x).norm(dim=-1), torch.ones(8), atol=1e-5)
