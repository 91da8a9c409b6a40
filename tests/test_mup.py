"""muP: equal to SP at its base width, the paper's multipliers away from it (init, attention, logits,
rates), the coordinate check's numbers, and everything around a model (checkpoints, export) intact."""
import math

import pytest
import torch

from config import ConfigError, ModelConfig, TrainConfig
from modules.model import Model
from modules.parametrization import PARAMETRIZATIONS
from toolkit import coord_check
from toolkit.checkpoint import load_checkpoint, save_model
from toolkit.hf import export_hf, hf_config_for
from toolkit.optim import make_optimizer
from toolkit.stability import StabilityLog

SMALL = dict(vocab_size=97, context_length=32, n_layers=2)


def model_of(seed=0, **overrides):
    torch.manual_seed(seed)
    return Model(ModelConfig.preset("llama3-1m", **{**SMALL, **overrides}))


def ids(*shape, seed=1):
    return torch.randint(0, SMALL["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("parametrization", [p for p in PARAMETRIZATIONS if p != "sp"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True, n_kv_heads=1, norm="layernorm"),
                                       dict(attention="differential", qk_norm=True)])
def test_mup_at_its_base_width_is_sp(parametrization, optimizer, overrides):
    """Every parametrization: same weights, same logits, and after three optimizer steps still the same weights."""
    models = [model_of(dim=64, parametrization=p, base_dim=64, **overrides) for p in ("sp", parametrization)]
    sp, mup = models
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values()))
    x = ids(2, 32)
    assert torch.equal(sp(x)[0], mup(x)[0])
    cfg = TrainConfig(optimizer=optimizer, lr=3e-3)
    for model in models:
        opt = make_optimizer(model, cfg, torch.device("cpu"))
        for step in range(3):
            _, loss = model(ids(2, 32, seed=step), ids(2, 32, seed=step + 10))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(sp.state_dict().values(), mup.state_dict().values()))


def test_mup_multipliers_follow_the_width_ratio():
    """At dim = 4 x base_dim: hidden init std / 2, attention scale sqrt(base_head_dim) / head_dim, logits / 4,
    hidden AdamW rates / 4 (the head and the rest unscaled); embeddings and norms as under SP."""
    sp, mup = (model_of(dim=256, parametrization=p, base_dim=64, init_std=0.02) for p in ("sp", "mup"))
    std = lambda w: w.detach().std().item()  # noqa: E731
    assert std(mup.layers[0].attention.qkv.weight) == pytest.approx(0.01, rel=0.02)
    assert std(sp.layers[0].attention.qkv.weight) == pytest.approx(0.02, rel=0.02)
    assert std(mup.layers[0].mlp.down.weight) == pytest.approx(0.01 / math.sqrt(4), rel=0.03)  # residual: / sqrt(2L)
    assert std(mup.embed.weight) == pytest.approx(0.02, rel=0.02)
    assert std(mup.head.weight) == pytest.approx(0.02, rel=0.02)
    head_dim, base_head_dim = 256 // 4, 64 // 4
    assert mup.layers[0].attention.scale == pytest.approx(math.sqrt(base_head_dim) / head_dim)
    assert sp.layers[0].attention.scale == pytest.approx(1 / math.sqrt(head_dim))
    mup.load_state_dict(sp.state_dict())  # same weights: the logits differ by exactly the multiplier
    x = ids(2, 1)  # one token: attention is the identity over one key, so its scale plays no part
    assert torch.allclose(mup(x)[0], sp(x)[0] / 4, atol=1e-6)
    hidden = {id(p) for layer in mup.layers for p in layer.parameters() if p.dim() == 2}
    for name, adjust, expected in (("adamw", "match_rms_adamw", 0.25), ("muon", "match_rms_adamw", 0.25),
                                   ("muon", "original", 1.0)):
        opt = make_optimizer(mup, TrainConfig(optimizer=name, muon_adjust_lr=adjust), torch.device("cpu"))
        for group in opt.param_groups:
            is_hidden = {id(p) for p in group["params"]} <= hidden
            assert group["lr_scale"] == (expected if is_hidden else 1.0), (name, adjust)


@pytest.mark.parametrize(("dim", "vocab_size"), [(256, 97), (256, 1024)])
def test_spectral_is_mup_with_the_head_at_the_spectral_scale(dim, vocab_size):
    """The same multipliers as muP; only an untied head starts differently: its effective std (init x logits'
    multiplier) follows min(1, sqrt(vocab/dim)) / sqrt(dim) relative to the base width, where muP's shrinks as 1/m."""
    mup, spectral = (model_of(dim=dim, vocab_size=vocab_size, parametrization=p, base_dim=64)
                     for p in ("mup", "spectral"))
    assert spectral.scales._replace(head_init=1.0) == mup.scales
    assert all(torch.equal(a, b) for name, a, b in zip(mup.state_dict(), mup.state_dict().values(),
                                                         spectral.state_dict().values()) if name != "head.weight")
    def head_std(d):
        return min(1.0, math.sqrt(vocab_size / d)) / math.sqrt(d)
    effective = spectral.head.weight.std().item() * spectral.scales.output
    assert effective == pytest.approx(0.02 * head_std(dim) / head_std(64), rel=0.02)
    assert mup.head.weight.std().item() * mup.scales.output == pytest.approx(0.02 * 64 / dim, rel=0.02)
    tied = model_of(dim=dim, vocab_size=vocab_size, parametrization="spectral", base_dim=64, tie_embeddings=True)
    assert tied.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)  # a tied head is the embedding


def test_zero_head_starts_every_logit_at_zero_and_still_learns():
    """The head starts at zero (the rest as without it, from the same seed); one AdamW step moves it."""
    plain, zero = model_of(dim=128, parametrization="mup", base_dim=32), model_of(dim=128, parametrization="mup",
                                                                               base_dim=32, zero_head=True)
    assert all(torch.equal(a, b) for name, a, b in zip(plain.state_dict(), plain.state_dict().values(),
                                                         zero.state_dict().values()) if name != "head.weight")
    x, y = ids(2, 32), ids(2, 32, seed=5)
    logits, loss = zero(x, y)
    assert torch.equal(logits, torch.zeros_like(logits)) and loss.item() == pytest.approx(math.log(97), rel=1e-6)
    opt = make_optimizer(zero, TrainConfig(lr=1e-2), torch.device("cpu"))
    for _ in range(5):
        opt.zero_grad()
        zero(x, y)[1].backward()
        opt.step()
    assert zero(x, y)[1].item() < math.log(97) - 0.1
    with pytest.raises(ConfigError, match="zero_head=True is not valid: would zero the token embeddings"):
        ModelConfig(zero_head=True, tie_embeddings=True)


def test_base_dim_is_checked_and_model_wide():
    with pytest.raises(ConfigError, match="base_dim=0 is not valid"):
        ModelConfig(base_dim=0, parametrization="mup")
    with pytest.raises(ConfigError, match="parametrization"):
        ModelConfig(layers={"0": {"parametrization": "mup"}})
    with pytest.raises(ConfigError, match="parametrization='mupp' is not valid; choose one of"):
        ModelConfig(parametrization="mupp")


@pytest.mark.parametrize("parametrization", [p for p in PARAMETRIZATIONS if p != "sp"])
def test_mup_models_save_load_and_export_exactly(tmp_path, parametrization):
    transformers = pytest.importorskip("transformers")
    model = model_of(dim=128, parametrization=parametrization, base_dim=32).eval()
    save_model(model, tmp_path / "saved")
    loaded, _ = load_checkpoint(tmp_path / "saved", "cpu")
    x = ids(2, 32)
    assert torch.equal(loaded.eval()(x)[0], model(x)[0])
    export_hf(model, tmp_path / "hf")  # the multipliers folded into the head and the query projections
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max().item() <= 1e-5
    for field in ("tie_embeddings", "qk_norm"):
        with pytest.raises(ValueError, match=f"parametrization='{parametrization}' with {field}=True"):
            hf_config_for(ModelConfig.preset("llama3-1m", dim=128, parametrization=parametrization, base_dim=32,
                                             **{field: True}))
    hf_config_for(ModelConfig.preset("llama3-1m", dim=128, parametrization=parametrization, base_dim=128,
                                     tie_embeddings=True))


def test_stability_log_measures_the_logits_the_loss_sees(tmp_path):
    """Under muP the head's output is multiplied by 1/m: the logged logits RMS is that of the model's logits."""
    model = model_of(dim=128, parametrization="mup", base_dim=32)
    log = StabilityLog(tmp_path, model, make_optimizer(model, TrainConfig(), torch.device("cpu")), None, False)
    raw = []
    model.head.register_forward_hook(lambda module, inputs, output: raw.append(output))
    with torch.no_grad(), log.measuring_logits():
        logits = model(ids(3, 32))[0]
    rms = logits.square().mean().sqrt().item()
    assert log.logits_rms == pytest.approx(rms, rel=1e-5)
    assert raw[0].square().mean().sqrt().item() == pytest.approx(4 * rms, rel=1e-5)  # m = 4: not the head's output


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp():
    """Three AdamW steps at widths 64 and 512 (8x): every shown module's output RMS changes by less than
    2.5x under muP and spectral, while under SP attention scores, MLP and layer outputs grow more than 10x and
    the logits more than 2x. At initialisation muP's logits shrink as 1/sqrt(m) (its head starts m times
    smaller), spectral's keep their size (the vocabulary, 2048, is wider than both models)."""
    pytest.importorskip("pandas")
    table = coord_check.coord_check(widths=(64, 512), steps=3, lr=5e-3, batch_size=4, seq_len=32,
                                    parametrizations=("sp", "mup", "spectral"), model_overrides=dict(n_layers=2))
    for label, *_ in coord_check.SHOWN:
        ratios = coord_check.growth(table, label, step=3)
        for name in ("mup", "spectral"):
            assert max(ratios[name], 1 / ratios[name]) < 2.5, (label, name, ratios)
        assert ratios["sp"] > (2 if label in ("logits", "attention output") else 10), (label, ratios)
    at_init = coord_check.growth(table, "MLP output", step=0)  # muP's init keeps hidden outputs width-free
    assert at_init["mup"] == pytest.approx(1, abs=0.1) and at_init["sp"] > 8
    logits = coord_check.growth(table, "logits", step=0)
    assert logits["spectral"] == pytest.approx(1, abs=0.1) and logits["mup"] == pytest.approx(8 ** -0.5, rel=0.1)
