"""Config validation (one line naming the field and what is allowed), presets, JSON round trips."""
import pytest

from config import FORMAT_VERSION, PRESETS, REGISTRIES, ConfigError, ModelConfig, TrainConfig, layer_selection
from toolkit.cli import route_overrides


def allowed(field):
    """The message's list of choices: every key of the field's registry, whatever it holds today."""
    return ", ".join(sorted(REGISTRIES[field]))


@pytest.mark.parametrize("overrides, field, allowed", [
    ({"dim": 128, "n_heads": 5}, "n_heads", "1, 2, 4, 8, 16, 32, 64, 128"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads", "1, 2, 4"),
    ({"norm": "batchnorm"}, "norm", allowed("norm")),
    ({"activation": "swish"}, "activation", allowed("activation")),
    ({"mlp": "moe"}, "mlp", allowed("mlp")),
    ({"positions": "sinusoidal"}, "positions", allowed("positions")),
    ({"norm_placement": "middle"}, "norm_placement", allowed("norm_placement")),
    ({"attention": "linear"}, "attention", allowed("attention")),
    ({"resid_dropout": 1.5}, "resid_dropout", "[0, 1)"),
    ({"dim": 0}, "dim", "positive"),
    ({"sliding_window": 0}, "sliding_window", "positive"),
    ({"head_dim": 7, "positions": "rope"}, "head_dim", "even"),
    ({"n_layers": 2.5}, "n_layers", "expected int"),
    ({"qk_norm": "yes"}, "qk_norm", "expected bool"),
    ({"rope_scaling": {"factor": 8}}, "rope_scaling", "original_max_position_embeddings"),
])
def test_invalid_values_fail_at_construction_with_one_line(overrides, field, allowed):
    with pytest.raises(ConfigError) as error:
        ModelConfig(**overrides)
    message = str(error.value)
    assert message.startswith(f"{field}=") and allowed in message and "\n" not in message


def test_unknown_fields_and_presets_suggest_the_closest():
    with pytest.raises(ConfigError, match="unknown ModelConfig field 'n_layer' .did you mean n_layers"):
        ModelConfig.from_dict({"n_layer": 2})
    with pytest.raises(ConfigError, match="did you mean llama3-1m"):
        ModelConfig.preset("llama-1m")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_derived_fields():
    cfg = ModelConfig(dim=96, n_heads=6, n_kv_heads=None)
    assert (cfg.head_dim, cfg.n_kv_heads) == (16, 6)
    theta = ModelConfig(rope_theta=10000).rope_theta
    assert theta == 10000.0 and isinstance(theta, float)
    # the schedule's floor follows the peak unless given, and is saved as the number it became
    assert TrainConfig(lr=3e-4).min_lr == pytest.approx(3e-5) and TrainConfig(lr=3e-4, min_lr=0.0).min_lr == 0.0
    assert TrainConfig.from_dict(TrainConfig(lr=3e-4).to_dict()).to_dict()["min_lr"] == pytest.approx(3e-5)


def test_presets_are_the_two_families():
    gpt2, llama = ModelConfig.preset("gpt2"), ModelConfig.preset("llama3-8b")
    assert (gpt2.positions, gpt2.norm, gpt2.norm_bias, gpt2.mlp, gpt2.activation, gpt2.mlp_hidden) == \
        ("learned", "layernorm", True, "plain", "gelu", 4 * 768)
    assert gpt2.n_kv_heads == gpt2.n_heads and gpt2.tie_embeddings and gpt2.bias
    assert (llama.positions, llama.norm, llama.mlp, llama.activation) == ("rope", "rmsnorm", "gated", "silu")
    assert llama.n_kv_heads < llama.n_heads and not llama.tie_embeddings and not llama.bias


def test_format_version_is_written_and_older_formats_migrate():
    cfg = ModelConfig.preset("llama3-1m")
    values = cfg.to_dict()
    assert values["format_version"] == FORMAT_VERSION
    # Format 1 (before per-layer choices) had neither the version nor `layers`: it loads as the same config.
    old = {k: v for k, v in values.items() if k not in ("format_version", "layers")}
    assert ModelConfig.from_dict(old) == cfg
    for version in (FORMAT_VERSION + 1, 0, "2"):
        with pytest.raises(ConfigError) as error:
            ModelConfig.from_dict({**values, "format_version": version})
        assert str(error.value).startswith("format_version=") and "\n" not in str(error.value)
        assert "update the workbench" in str(error.value)


@pytest.mark.parametrize("selector, layers", [("0", [0]), ("-1", [5]), ("1,3", [1, 3]), ("::2", [0, 2, 4]),
                                              ("1::2", [1, 3, 5]), ("4:", [4, 5]), (":2,-1", [0, 1, 5])])
def test_layer_selectors_are_indices_and_slices(selector, layers):
    assert layer_selection(selector, 6) == layers


def test_per_layer_overrides_apply_in_order_and_rederive_sizes():
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, positions="rope",
                      layers={"::2": {"sliding_window": 8, "mlp_multiplier": 4.0},
                              0: {"positions": "none", "sliding_window": None},
                              "-1": {"n_heads": 8, "n_kv_heads": 8}})
    assert list(cfg.layers) == ["::2", "0", "-1"]  # JSON keys are strings
    layers = [cfg.layer(i) for i in range(4)]
    assert [c.sliding_window for c in layers] == [None, None, 8, None]
    assert [c.positions for c in layers] == ["none", "rope", "rope", "rope"]
    assert [c.mlp_hidden for c in layers] == [256, 170, 256, 170]  # recomputed from the layer's multiplier
    assert [(c.n_heads, c.head_dim, c.n_kv_heads) for c in layers[2:]] == [(4, 16, 2), (8, 8, 8)]
    assert all(c.layers is None for c in layers) and ModelConfig().layer(3) == ModelConfig()
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("layers, message", [
    ({"0": {"n_layer": 2}}, "layers['0']: unknown field 'n_layer' (did you mean n_layers?)"),
    ({"1": {"vocab_size": 100}}, "layers['1'].vocab_size=100 is not valid: vocab_size holds for the whole model"),
    ({"4": {"qk_norm": True}}, "layers key '4' is not valid: there is no layer 4 (n_layers=4"),
    ({"odd": {"qk_norm": True}}, "layers key 'odd' is not valid: use layer indices and slices"),
    ({"5:": {"qk_norm": True}}, "layers key '5:' selects no layer of n_layers=4"),
    ({"1": 64}, "layers['1']=64 is not valid: give a dict of field: value overrides"),
    ({"1,3": {"n_kv_heads": 3}}, "layer 1: n_kv_heads=3 is not valid: must divide n_heads=4 (choose from 1, 2, 4)"),
    ({"0": {"norm": "batchnorm"}}, "layer 0: norm='batchnorm' is not valid; choose one of"),
    ({"0": {"positions": "learned"}}, "layer 0: positions='learned' is not valid: positions with an input embedding"),
])
def test_per_layer_mistakes_fail_with_one_line(layers, message):
    with pytest.raises(ConfigError) as error:
        ModelConfig(n_layers=4, layers=layers)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_per_layer_choices_on_the_command_line():
    model, _, _ = route_overrides({"layers": '{"::2": {"sliding_window": 64}}', "n_layers": "4"})
    cfg = ModelConfig.preset("llama3-1m", **model)
    assert [cfg.layer(i).sliding_window for i in range(4)] == [64, None, 64, None]


def test_gemma2_preset_windows_every_other_layer():
    cfg = ModelConfig.preset("gemma2-1m")
    assert [cfg.layer(i).sliding_window for i in range(cfg.n_layers)] == [128, None, 128, None]
    assert (cfg.norm_placement, cfg.activation, cfg.tie_embeddings) == ("sandwich", "gelu_tanh", True)
    # The pattern follows the depth.
    deeper = ModelConfig.preset("gemma2-1m", n_layers=6)
    assert [deeper.layer(i).sliding_window for i in range(6)] == [128, None] * 3
