"""Optimizers: Muon's orthogonalisation against torch's, its AdamW half against torch.optim.AdamW,
per-projection updates of stacked matrices, per-group rates, and exact resume."""
import copy

import pytest
import torch
from torch import nn

from config import ModelConfig, TrainConfig
from modules.model import Model
from toolkit.optim import (
    OPTIMIZERS,
    Muon,
    make_optimizer,
    muon_lr_ratio,
    orthogonalize,
    output_splits,
    parameter_roles,
    set_learning_rate,
)

CPU = torch.device("cpu")


def tiny(**overrides):
    torch.manual_seed(0)
    return Model(ModelConfig.preset("llama3-1m", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    context_length=16, **overrides))


def loss_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 16), generator=g)
    return model(ids[:, :-1], ids[:, 1:])[1]


@pytest.mark.parametrize("shape", [(48, 32), (32, 96), (64, 64)])
def test_orthogonalize_equals_torch_within_bfloat16(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = orthogonalize(g)
    theirs = _zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 0.03 * theirs.abs().max()  # bfloat16 keeps ~3 significant digits
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.5  # the iteration's band around 1


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_step_equals_torch_muon(adjust):
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(48, 32)), None
    theirs = nn.Parameter(ours.detach().clone())
    opt_ours = Muon([{"params": [ours], "muon": True, "weight_decay": 0.1}], lr=0.02, adjust_lr=adjust)
    opt_theirs = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for step in range(3):
        grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        assert torch.allclose(ours, theirs, atol=0.03 * 0.02 * muon_lr_ratio((48, 32), adjust))


def test_adamw_half_equals_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(10, 7))
    b = nn.Parameter(a.detach().clone())
    ours = Muon([{"params": [a], "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(10, 7, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_stacked_projections_are_orthogonalised_one_by_one():
    model = tiny()
    qkv = model.layers[0].attention.qkv.weight
    split = output_splits(model)[id(qkv)]
    assert sum(split) == qkv.shape[0] and len(split) == 3
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.0, lr=1e-3), CPU)
    before = qkv.detach().clone()
    loss_of(model).backward()
    grad = qkv.grad.clone()
    optimizer.step()
    # First step: momentum buffer = (1 - mu) G, Nesterov update = G + mu (B - G) = (1 - mu^2) G.
    update = grad * (1 - 0.95 ** 2)
    expected = torch.cat([orthogonalize(part) * muon_lr_ratio(part.shape, "match_rms_adamw")
                          for part in update.split(split)])
    assert torch.allclose(before - qkv.detach(), 1e-3 * expected, atol=1e-7)


def test_roles_cover_every_parameter_once_and_muon_takes_only_hidden_matrices():
    for tie in (False, True):
        model = tiny(tie_embeddings=tie)
        roles = parameter_roles(model)
        ids = [id(p) for ps in roles.values() for p in ps]
        assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
        optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
        muon_params = [p for g in optimizer.param_groups if g["muon"] for p in g["params"]]
        assert all(p.dim() == 2 for p in muon_params)
        assert not any(p is model.embed.weight or p is model.head.weight for p in muon_params)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss_and_resumes_exactly(name):
    model = tiny()
    cfg = TrainConfig(optimizer=name, lr=3e-3)
    optimizer = make_optimizer(model, cfg, CPU)

    def steps(model, optimizer, seeds):
        for seed in seeds:
            set_learning_rate(optimizer, cfg.lr)
            loss_of(model, seed).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    first = loss_of(model, 0).item()
    steps(model, optimizer, [0] * 20)  # one batch, learnt by heart
    assert loss_of(model, 0).item() < first - 0.5
    # Resume: a copy rebuilt from the state dicts continues exactly as the original.
    clone = copy.deepcopy(model)
    restored = make_optimizer(clone, cfg, CPU)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    steps(model, optimizer, range(20, 23))
    steps(clone, restored, range(20, 23))
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_group_rates_follow_the_schedule():
    model = tiny()
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=4e-3), CPU)
    set_learning_rate(optimizer, 5e-4)  # the schedule at half the peak
    rates = sorted(g["lr"] for g in optimizer.param_groups)
    assert rates == pytest.approx([5e-4, 2e-3])
