"""Equivalence with Hugging Face transformers: converted models give the same logits, both ways."""
import pytest
import torch

from config import ModelConfig
from modules.model import Model
from toolkit.hf import LoadError, export_hf, hf_config_for, load_hf_model

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # random non-trivial norms and biases, so that every weight is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_llama(**overrides):
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500000.0, **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


LLAMA_VARIANTS = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "llama3.1 rope scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}


def max_logit_difference(hf_model, model, ids):
    with torch.no_grad():
        return (hf_model(ids).logits - model(ids)[0]).abs().max().item()


@pytest.mark.parametrize("make", [tiny_gpt2] + [lambda v=v: tiny_llama(**v) for v in LLAMA_VARIANTS.values()],
                         ids=["gpt2"] + list(LLAMA_VARIANTS))
def test_converted_model_and_export_give_transformers_logits(make, tmp_path):
    hf_model = make()
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf_model(str(tmp_path / "hf"))
    ids = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    assert max_logit_difference(hf_model, model, ids) <= 1e-4

    export_hf(model, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert max_logit_difference(reloaded, model, ids) <= 1e-4


@pytest.mark.parametrize("preset", ["gpt2-1m", "llama3-1m"])
def test_project_presets_export_with_equal_logits(preset, tmp_path):
    """Models without some of transformers' weights (no biases, no norm scales) export exactly too."""
    cfg = ModelConfig.preset(preset, vocab_size=97, context_length=32, dim=32, n_layers=2, norm_affine=False,
                             bias=False, norm_bias=False)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    export_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 32))
    assert max_logit_difference(hf_model, model, ids) <= 1e-4


WINDOWED = {  # what Llama cannot hold, and the architecture that holds it exactly
    "global window: Mistral": ("MistralForCausalLM", dict(sliding_window=5)),
    "qk-norm: Qwen3": ("Qwen3ForCausalLM", dict(qk_norm=True)),
    "gemma-2 pattern + qk-norm: Qwen3 layer_types": ("Qwen3ForCausalLM",
                                                      dict(qk_norm=True, layers={"::2": {"sliding_window": 5}})),
    "window + qk-norm without scales + llama3.1 scaling: Qwen3": ("Qwen3ForCausalLM", dict(
        qk_norm=True, sliding_window=6, norm_affine=False, rope_scaling={
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
}


@pytest.mark.parametrize("name", WINDOWED)
def test_windows_and_qk_norm_export_through_mistral_and_qwen3(name, tmp_path):
    architecture, overrides = WINDOWED[name]
    cfg = ModelConfig.preset("llama3-1m", vocab_size=97, context_length=32, dim=32, n_layers=3, **overrides)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():  # norm scales away from 1, so that a QK-norm lost in export would show
        for param_name, p in model.named_parameters():
            if "norm" in param_name:
                p.add_(torch.randn_like(p) * 0.2)
    export_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == architecture
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    assert max_logit_difference(hf_model, model, ids) <= 1e-5
    # The windows matter on 32 tokens: the same weights without them give other logits.
    if "window" in name or "pattern" in name:
        unwindowed = Model(ModelConfig.preset("llama3-1m", vocab_size=97, context_length=32, dim=32, n_layers=3,
                                              qk_norm=cfg.qk_norm, norm_affine=cfg.norm_affine,
                                              rope_scaling=cfg.rope_scaling)).eval()
        unwindowed.load_state_dict(model.state_dict())
        assert max_logit_difference(hf_model, unwindowed, ids) > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (dict(norm_placement="post"), "norm_placement='post' has no Llama equivalent"),
    (dict(positions="none"), "positions='none' maps to neither"),
    (dict(attention="differential"), "attention='differential' has no Llama equivalent"),
    (dict(qk_norm=True, norm="dyt"), "norm='dyt' has no Qwen3 equivalent"),
    (dict(sliding_window=8, bias=True), "bias=True has no Mistral equivalent"),
    (dict(layers={"1": {"n_kv_heads": 1}}), "layer 1 has n_kv_heads=1 where the model has 2; no transformers"),
    (dict(qk_norm=True, layers={"0": {"sliding_window": 4}, "1": {"sliding_window": 8}}), "windows of several sizes"),
    (dict(layers={"::2": {"sliding_window": 4}}), "a sliding window on some layers only exports through Qwen3"),
    (dict(preset="gpt2-1m", sliding_window=8), "positions='learned' has no Mistral equivalent"),
])
def test_export_refuses_in_one_line_what_no_architecture_holds(overrides, message):
    overrides = {"preset": "llama3-1m", **overrides}
    cfg = ModelConfig.preset(overrides.pop("preset"), **overrides)
    with pytest.raises(ValueError) as error:
        hf_config_for(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_directory_and_offline_hub_give_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no config.json"):
        load_hf_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoadError) as error:
        load_hf_model("gpt2-this-does-not-exist")
    assert "\n" not in str(error.value)
