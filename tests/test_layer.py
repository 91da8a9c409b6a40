"""The residual block in each norm placement, against its composition formula."""
import pytest
import torch

from config import ModelConfig
from modules.layer import NORM_PLACEMENTS


def layer(placement, **overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 32, "n_heads": 4, "n_kv_heads": 2, "positions": "none", "resid_dropout": 0.0,
                         "norm_placement": placement, **overrides})
    block = NORM_PLACEMENTS[placement](cfg, 0)
    with torch.no_grad():  # non-trivial norm scales, so that a swapped norm would show
        for name, p in block.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return block


def test_pre_norm():
    block, x = layer("pre"), torch.randn(2, 6, 32)
    h = x + block.attention(block.attention_norm(x))
    assert torch.allclose(block(x), h + block.mlp(block.mlp_norm(h)), atol=1e-6)


def test_post_norm():
    block, x = layer("post"), torch.randn(2, 6, 32)
    h = block.attention_norm(x + block.attention(x))
    assert torch.allclose(block(x), block.mlp_norm(h + block.mlp(h)), atol=1e-6)


def test_sandwich_norm():
    block, x = layer("sandwich"), torch.randn(2, 6, 32)
    h = x + block.attention_post_norm(block.attention(block.attention_norm(x)))
    assert torch.allclose(block(x), h + block.mlp_post_norm(block.mlp(block.mlp_norm(h))), atol=1e-6)


@pytest.mark.parametrize("placement", ["pre", "post", "sandwich"])
def test_every_parameter_gets_a_gradient(placement):
    block = layer(placement, bias=True, norm_bias=True, qk_norm=True)
    block(torch.randn(2, 6, 32)).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_residual_dropout_site():
    block, x = layer("pre", resid_dropout=0.5), torch.randn(2, 6, 32)
    clean = layer("pre")
    assert torch.allclose(block.eval()(x), clean.eval()(x), atol=1e-6)
    torch.manual_seed(1)
    assert not torch.allclose(block.train()(x), clean(x), atol=1e-3)
