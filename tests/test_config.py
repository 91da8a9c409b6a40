"""Config validation (one line naming the field and what is allowed), presets, JSON round trips."""
import pytest

from config import FORMAT_VERSION, PRESETS, REGISTRIES, ConfigError, ModelConfig


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
