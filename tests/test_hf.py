"""Equivalence with Hugging Face transformers: converted models give the same logits, both ways; every
config field that changes the maths is matched or refused; exported folders carry their tokenizer."""
import json

import pytest
import torch

import inference
import model_comparison
import tools
from config import ModelConfig
from modules.mlp import ACTIVATIONS
from modules.model import Model
from toolkit.hf import HF_ACTIVATIONS, LoadError, export_hf, hf_config_for, load_hf_model
from toolkit.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


def tiny_gpt2(**overrides):
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # random non-trivial norms and biases, so that every weight is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_llama(family="Llama", **overrides):
    """A small random model of the Llama family (Llama, Mistral, Qwen2, Qwen3), norm scales away from 1."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# Every GPT2Config and LlamaConfig field that changes the maths, each with a value other than the default.
GPT2_VARIANTS = {
    "gpt2": {},
    "untied head": {"tie_word_embeddings": False},
    "unscaled attention": {"scale_attn_weights": False},
    "attention scaled by 1/layer": {"scale_attn_by_inverse_layer_idx": True},
    "reordered upcast attention": {"reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True},
    "n_inner and eps": {"n_inner": 72, "layer_norm_epsilon": 1e-3},
    **{f"activation {name}": {"activation_function": name} for name in ("gelu", "relu", "silu", "gelu_fast", "relu2")},
}
LLAMA_VARIANTS = {
    "gqa": {},
    "tied": {"tie_word_embeddings": True},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "attention bias only": {"attention_bias": True},
    "mlp bias only": {"mlp_bias": True},
    "head_dim": {"head_dim": 16},
    "pretraining_tp": {"pretraining_tp": 2},
    "gelu_pytorch_tanh, eps": {"hidden_act": "gelu_pytorch_tanh", "rms_norm_eps": 1e-3},
    "llama3.1 rope scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    # The rest of the family: what each adds to Llama (windows, Qwen2's q/k/v biases, Qwen3's QK-norm).
    "mistral": {"family": "Mistral", "sliding_window": None},
    "mistral window": {"family": "Mistral", "sliding_window": 7},
    "qwen2": {"family": "Qwen2"},
    "qwen2 windows on later layers": {"family": "Qwen2", "use_sliding_window": True, "sliding_window": 7,
                                      "max_window_layers": 1},
    "qwen3 tied, head_dim": {"family": "Qwen3", "tie_word_embeddings": True, "head_dim": 16},
    "qwen3 attention bias": {"family": "Qwen3", "attention_bias": True},
    "qwen3 layer_types": {"family": "Qwen3", "use_sliding_window": True, "sliding_window": 7,
                          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}
# Converted models that no transformers architecture holds on the way back, and what the export says.
# Here one `bias` covers attention and MLP: Qwen's biases on attention only come back as zero MLP biases, which
# Mistral and Qwen3 (the architectures with windows and QK-norm) cannot hold.
EXPORT_REFUSED = {"qwen2 windows on later layers": "bias=True has no Mistral equivalent",
                  "qwen3 attention bias": "bias=True has no Qwen3 equivalent"}
REFUSED = [
    (tiny_gpt2, {"add_cross_attention": True}, "add_cross_attention"),
    (tiny_gpt2, {"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
    (tiny_llama, {"hidden_act": "tanh"}, "hidden_act='tanh'"),
    (tiny_llama, {"family": "Qwen3", "layer_types": ["full_attention", "chunked_attention", "full_attention"]},
     "layer_types='chunked_attention'"),
    (tiny_llama, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    (tiny_llama, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    (tiny_llama, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}},
     "rope_type='yarn'"),
    (tiny_llama, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
]


def max_logit_difference(hf_model, model, ids):
    with torch.no_grad():
        return (hf_model(ids).logits - model(ids)[0]).abs().max().item()


@pytest.mark.parametrize("make", [lambda v=v: tiny_gpt2(**v) for v in GPT2_VARIANTS.values()]
                         + [lambda v=v: tiny_llama(**v) for v in LLAMA_VARIANTS.values()],
                         ids=list(GPT2_VARIANTS) + list(LLAMA_VARIANTS))
def test_converted_model_and_export_give_transformers_logits(make, tmp_path, request):
    hf_model = make()
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf_model(str(tmp_path / "hf"))
    ids = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert max_logit_difference(hf_model, model, ids) <= 1e-5
    assert max_logit_difference(eager, model, ids) <= 1e-5  # reorder_and_upcast_attn only acts in eager attention

    if request.node.callspec.id in EXPORT_REFUSED:
        with pytest.raises(ValueError, match=EXPORT_REFUSED[request.node.callspec.id]) as error:
            export_hf(model, tmp_path / "exported")
        assert "\n" not in str(error.value)
        return
    export_hf(model, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert max_logit_difference(reloaded, model, ids) <= 1e-5


@pytest.mark.parametrize("make, overrides, field", REFUSED, ids=[field for _, _, field in REFUSED])
def test_config_fields_without_equal_are_refused_by_name(make, overrides, field, tmp_path):
    make(**overrides).save_pretrained(tmp_path)
    with pytest.raises(LoadError) as error:
        load_hf_model(str(tmp_path))
    assert field in str(error.value) and "\n" not in str(error.value)


def test_activation_names_map_to_equal_functions():
    x = torch.linspace(-8, 8, 4001)
    for theirs, ours in HF_ACTIVATIONS.items():
        assert (transformers.activations.ACT2FN[theirs](x) - ACTIVATIONS[ours](x)).abs().max() <= 1e-6, theirs


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
def test_windows_and_qk_norm_export_through_mistral_and_qwen3_and_load_back(name, tmp_path):
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
    # The folder converts back: the same windows per layer, QK-norm and logits.
    loaded = load_hf_model(str(tmp_path))
    assert [loaded.cfg.layer(i).sliding_window for i in range(3)] == [cfg.layer(i).sliding_window for i in range(3)]
    assert loaded.cfg.qk_norm == cfg.qk_norm
    with torch.no_grad():
        assert (loaded(ids)[0] - model(ids)[0]).abs().max() <= 1e-5


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
    with pytest.raises(LoadError, match="empty is a folder without a model in it .no model_config.json or config"):
        tools.load_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoadError) as error:
        load_hf_model("gpt2-this-does-not-exist")
    assert "\n" not in str(error.value)


# --- tokenizers travel with exported models ---

TEXTS = ["Once upon a time, there was a little dog named Max.", "Lily said: \"Let's go!\"\nThey ran 12 km. 😀",
         " two  spaces ", "Ça va? 東京"]
PROMPT = "Once upon a time, there was a"


def byte_level_tokenizer(folder):
    """A small GPT-2-style byte-level BPE saved as a Hugging Face folder (no network needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(folder)
    return load_tokenizer(f"hf:{folder}")


@pytest.mark.parametrize("name", ["GPT2_1m_atto", "Llama3_1m_atto"])
def test_export_writes_a_tokenizer_that_transformers_encodes_the_same(name, tmp_path):
    model, tokenizer = tools.load_model(name)
    tools.export_hf(model, tmp_path, tokenizer)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer(TEXTS, add_special_tokens=False)["input_ids"] == tokenizer.encode(TEXTS)
    assert hf_tokenizer(TEXTS)["input_ids"] == tokenizer.encode(TEXTS, bos=True)
    assert hf_tokenizer.batch_decode(tokenizer.encode(TEXTS)) == TEXTS
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ids == (1, 2, 3)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == ids[:2]


def test_export_without_tokenizer_names_no_ids_outside_the_vocabulary(tmp_path):
    model, _ = tools.load_model("GPT2_1m_atto")  # transformers' GPT-2 defaults to 50256, beyond its 2048 ids
    tools.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [config.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None, None, None]
    assert not (tmp_path / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="do not fit the model's vocab_size=2048"):
        tools.export_hf(model, tmp_path, load_tokenizer("tinystories-4096"))


def test_gpt2_model_exports_with_a_hugging_face_tokenizer(tmp_path):
    tokenizer = byte_level_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("gpt2-1m", vocab_size=tokenizer.vocab_size, n_layers=1)).eval()
    tools.export_hf(model, tmp_path / "exported", tokenizer)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.eos_id < tokenizer.vocab_size
    loaded, loaded_tokenizer = tools.load_model(str(tmp_path / "exported"))
    assert loaded_tokenizer.encode(TEXTS) == tokenizer.encode(TEXTS)
    assert loaded_tokenizer.fingerprint == tokenizer.fingerprint
    ids = torch.tensor(tokenizer.encode(TEXTS[:1], bos=True))
    with torch.no_grad():
        assert (loaded(ids)[0] - model(ids)[0]).abs().max() <= 1e-5


def run_inference(capsys, *args):
    inference.main([*map(str, args), "--temp=0", "--max_len=24"])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["GPT2_1m_atto", "Llama3_1m_atto"])
def test_exported_folder_loads_back_with_its_tokenizer_and_generates_the_same(name, tmp_path, capsys):
    model, tokenizer = tools.load_model(name)
    tools.export_hf(model, tmp_path, tokenizer)
    loaded, loaded_tokenizer = tools.load_model(str(tmp_path))
    assert loaded_tokenizer is not None and loaded_tokenizer.encode(TEXTS) == tokenizer.encode(TEXTS)
    assert loaded_tokenizer.decode(tokenizer.encode(TEXTS)) == TEXTS
    ids = torch.tensor([tokenizer.encode(PROMPT, bos=True)])
    with torch.no_grad():
        assert (loaded(ids)[0] - model(ids)[0]).abs().max() <= 1e-5
    original = run_inference(capsys, name, PROMPT)
    assert original.startswith(PROMPT) and len(original) > len(PROMPT) + 24
    assert run_inference(capsys, tmp_path, PROMPT) == original


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_hugging_face_folder_without_tokenizer_files_has_no_tokenizer(make, tmp_path, capsys):
    make().save_pretrained(tmp_path)
    model, tokenizer = tools.load_model(str(tmp_path))
    assert tokenizer is None and model.cfg.vocab_size == 101
    expected = f"{tmp_path} has no tokenizer files"
    with pytest.raises(SystemExit) as exit_info:
        inference.main([str(tmp_path), "Once"])
    assert str(exit_info.value.code).startswith(f"error: {expected}") and "\n" not in str(exit_info.value.code)
    with pytest.raises(LoadError, match=expected):
        model_comparison.load_models([str(tmp_path)])


def test_weights_that_do_not_match_config_json_are_one_line(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_inner": 100}))
    with pytest.raises(LoadError) as error:
        load_hf_model(str(tmp_path))
    assert "do not match config.json" in str(error.value) and "\n" not in str(error.value)
