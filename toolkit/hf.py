"""Hugging Face checkpoints (GPT-2 and the Llama family: Llama, Mistral, Qwen2, Qwen3) to and from the
project's Model.

Weights are read straight from a checkpoint's safetensors (or, for old repos, `weights_only`
torch files), so a conversion never holds two copies of a big model. Exports go through
`transformers`' own classes, so whatever is written is exactly what `transformers` loads.
"""
import json
from pathlib import Path

import torch

from config import ConfigError, ModelConfig
from modules.model import Model
from modules.parametrization import PARAMETRIZATIONS, Scales


class LoadError(ValueError):
    """A model that cannot be found or read; the message is one line that says what to do."""


# --- reading ---

def hf_directory(name_or_path: str) -> Path:
    """A local checkpoint directory, or the hub snapshot of a model id (downloaded once, then cached)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except RepositoryNotFoundError:
        raise LoadError(f"no model {name_or_path!r} on the Hugging Face hub "
                        f"and no such directory or trained/ model") from None
    except LocalEntryNotFoundError:
        raise LoadError(f"cannot download {name_or_path!r} (offline?) and it is not cached: connect once, "
                        f"or pass a local checkpoint directory") from None
    except Exception as e:  # network failures come in many types; all mean the same to a user
        raise LoadError(f"cannot download {name_or_path!r} from the Hugging Face hub ({type(e).__name__}): "
                        f"check the name and connection, or pass a local checkpoint directory") from None


def read_hf_weights(directory: Path) -> dict:
    from safetensors.torch import load_file
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        files = sorted(directory.glob("pytorch_model*.bin"))
        if not files:
            raise LoadError(f"{directory} holds no *.safetensors or *.bin weights")
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    return {k: v for f in files for k, v in load_file(f).items()}


# transformers' activation names -> ours; the tanh approximations of GELU differ only in float rounding
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu", "relu2": "relu2"}

# model_type -> the transformers config class that reads its config.json
HF_CONFIGS = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
              "qwen3": "Qwen3Config"}


def read_hf_config(directory: Path):
    """config.json as transformers' own config class (HF_CONFIGS), so that a field the file leaves out
    takes the default that transformers' model uses."""
    import transformers
    from transformers.utils import logging
    hf = json.loads((directory / "config.json").read_text())
    kind = hf.get("model_type")
    if kind not in HF_CONFIGS:
        raise LoadError(f"model_type {kind!r} is not supported: the checkpoints that convert are "
                        f"{', '.join(map(repr, HF_CONFIGS))}")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # not its warnings about bos/eos ids: the conversion does not use them
    try:
        return getattr(transformers, HF_CONFIGS[kind]).from_dict(hf)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{directory}/config.json is not a valid {kind} config: "
                        f"{' '.join(str(e).split())[:200]}") from None
    finally:
        logging.set_verbosity(verbosity)


def refuse(condition, field, value, why):
    if condition:
        raise LoadError(f"cannot convert this checkpoint: {field}={value!r} {why}")


def activation_of(hf, field) -> str:
    name = getattr(hf, field)
    refuse(name not in HF_ACTIVATIONS, field, name, f"has no equal here (supported: {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def rope_settings(hf):
    """(theta, llama3 scaling or None) from transformers 4's rope_theta and rope_scaling or 5's rope_parameters."""
    field = "rope_parameters" if getattr(hf, "rope_parameters", None) else "rope_scaling"
    params = dict(getattr(hf, field, None) or {})
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    refuse(partial != 1.0, "partial_rotary_factor", partial,
           "is not supported: rotary embeddings here turn every channel")
    if kind == "default":
        return theta, None
    refuse(kind != "llama3", f"{field}.rope_type", kind, "is not supported (only the default and Llama 3.1's 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: params[k] for k in keys}


def biased_projections(hf) -> set:
    """The projections of a Llama-family checkpoint that have biases: Llama's attention_bias and mlp_bias,
    Qwen2's query, key and value (always, and nothing else), none in Mistral."""
    if hf.model_type == "qwen2":
        return {"q", "k", "v"}
    attention = {"q", "k", "v", "o"} if getattr(hf, "attention_bias", False) else set()
    return attention | ({"gate", "up", "down"} if getattr(hf, "mlp_bias", False) else set())


def hf_layer_windows(hf) -> list:
    """Each layer's sliding window (None: full attention): Mistral's one window on every layer, Qwen's on the
    layers its layer_types mark sliding (transformers derives those from use_sliding_window and
    max_window_layers when config.json does not list them); Llama has none."""
    window = getattr(hf, "sliding_window", None)
    if hf.model_type == "mistral":
        return [window] * hf.num_hidden_layers
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    for kind in set(types) - {"full_attention", "sliding_attention"}:
        refuse(True, "layer_types", kind, "is not supported (only 'full_attention' and 'sliding_attention')")
    return [window if kind == "sliding_attention" else None for kind in types]


def window_settings(windows: list) -> dict:
    """ModelConfig fields for per-layer windows: one sliding_window when every layer has the same, else
    per-layer overrides of the layers that have one."""
    if len(set(windows)) == 1:
        return {"sliding_window": windows[0]}
    by_size = {}
    for index, window in enumerate(windows):
        if window is not None:
            by_size.setdefault(window, []).append(str(index))
    return {"layers": {",".join(indices): {"sliding_window": window} for window, indices in by_size.items()}}


def config_from_hf(hf) -> ModelConfig:
    """The ModelConfig equal to a transformers config of HF_CONFIGS. Every field that changes the maths
    is either matched (some in the weights: see gpt2_to_project and llama_to_project) or refused by name."""
    if hf.model_type == "gpt2":
        # scale_attn_weights and scale_attn_by_inverse_layer_idx are folded into the query weights;
        # reorder_and_upcast_attn computes the same scores in float32, which is what this model does
        refuse(hf.add_cross_attention, "add_cross_attention", True,
               "is not supported: cross-attention needs an encoder and the models here are decoder-only")
        return ModelConfig.preset(
            "gpt2", vocab_size=hf.vocab_size, context_length=hf.n_positions, dim=hf.n_embd, n_layers=hf.n_layer,
            n_heads=hf.n_head, mlp_hidden=hf.n_inner or 4 * hf.n_embd,
            activation=activation_of(hf, "activation_function"),
            norm_eps=hf.layer_norm_epsilon, embed_dropout=hf.embd_pdrop, attn_dropout=hf.attn_pdrop,
            resid_dropout=hf.resid_pdrop, tie_embeddings=hf.tie_word_embeddings)
    # pretraining_tp (transformers 4) only slices the same matmuls; biases on some projections only are one
    # `bias` here with the missing biases zero (llama_to_project)
    theta, scaling = rope_settings(hf)
    n_heads = hf.num_attention_heads
    return ModelConfig.preset(
        "llama3-8b", vocab_size=hf.vocab_size, context_length=hf.max_position_embeddings, dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers, n_heads=n_heads, n_kv_heads=hf.num_key_value_heads or n_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // n_heads, mlp_hidden=hf.intermediate_size,
        activation=activation_of(hf, "hidden_act"), norm_eps=hf.rms_norm_eps, rope_theta=float(theta),
        rope_scaling=scaling, bias=bool(biased_projections(hf)), qk_norm=hf.model_type == "qwen3",
        tie_embeddings=hf.tie_word_embeddings, attn_dropout=hf.attention_dropout,
        **window_settings(hf_layer_windows(hf)))


def gpt2_query_scale(hf, layer: int) -> float:
    """What GPT-2 multiplies layer `layer`'s q.k by, relative to the 1/sqrt(head_dim) used here."""
    head_dim = hf.n_embd // hf.n_head
    scale = head_dim ** -0.5 if hf.scale_attn_weights else 1.0
    if hf.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    return scale * head_dim ** 0.5


def gpt2_to_project(sd: dict, cfg: ModelConfig, hf) -> dict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"embed.weight": sd["wte.weight"], "pos_embed.weight": sd["wpe.weight"],
           "norm.weight": sd["ln_f.weight"], "norm.bias": sd["ln_f.bias"]}
    if not cfg.tie_embeddings:
        out["head.weight"] = sd["lm_head.weight"]
    renames = {"ln_1": "attention_norm", "ln_2": "mlp_norm", "attn.c_attn": "attention.qkv",
               "attn.c_proj": "attention.out", "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
    for i in range(cfg.n_layers):
        for theirs, ours in renames.items():
            weight = sd[f"h.{i}.{theirs}.weight"]
            # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in).
            out[f"layers.{i}.{ours}.weight"] = weight if theirs.startswith("ln") else weight.t()
            out[f"layers.{i}.{ours}.bias"] = sd[f"h.{i}.{theirs}.bias"]
        scale = gpt2_query_scale(hf, i)
        if scale != 1.0:  # q = W x + b scaled by s scales q.k by s: the attention GPT-2 computes
            for suffix in ("weight", "bias"):
                qkv = out[f"layers.{i}.attention.qkv.{suffix}"].clone()
                qkv[:cfg.dim] *= scale
                out[f"layers.{i}.attention.qkv.{suffix}"] = qkv
    return out


def llama_to_project(sd: dict, cfg: ModelConfig, hf) -> dict:
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["head.weight"] = sd["lm_head.weight"]

    biased = biased_projections(hf)

    def get(module, projection, suffix):  # a bias the checkpoint does not have is zero
        name = f"{module}.{projection}_proj.{suffix}"
        if suffix == "bias" and projection not in biased:
            return torch.zeros(sd[name.removesuffix(".bias") + ".weight"].shape[0])
        return sd[name]

    for i in range(cfg.n_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        out[ours + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[ours + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if cfg.qk_norm:  # Qwen3's per-head norms of queries and keys, before the rotation as here
            out[ours + "attention.q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[ours + "attention.k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        attention, mlp = p + "self_attn", p + "mlp"
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            # Our fused matrices: qkv = [q; k; v] and the gated MLP's up = [gate; up].
            out[f"{ours}attention.qkv.{suffix}"] = torch.cat([get(attention, n, suffix) for n in ("q", "k", "v")])
            out[f"{ours}mlp.up.{suffix}"] = torch.cat([get(mlp, n, suffix) for n in ("gate", "up")])
            out[f"{ours}attention.out.{suffix}"] = get(attention, "o", suffix)
            out[f"{ours}mlp.down.{suffix}"] = get(mlp, "down", suffix)
    return out


def load_hf_model(name_or_path: str, device="cpu", dtype=torch.float32) -> Model:
    """A Hugging Face checkpoint of HF_CONFIGS (hub id or local directory) as the project's Model."""
    directory = hf_directory(name_or_path)
    hf = read_hf_config(directory)
    try:
        cfg = config_from_hf(hf)
    except ConfigError as e:
        raise LoadError(f"{directory}/config.json cannot be converted: {e}") from None
    convert = gpt2_to_project if hf.model_type == "gpt2" else llama_to_project
    try:
        state = convert(read_hf_weights(directory), cfg, hf)
    except KeyError as e:
        raise LoadError(f"{directory}: weight {e} is missing: "
                        f"the checkpoint is incomplete or not {hf.model_type}") from None
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    model = Model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # weights of other shapes than config.json says
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise LoadError(f"{directory}: the weights do not match config.json: {first}") from None
    return model.to(device=device, dtype=dtype).eval()


# --- writing ---

def hf_config_for(cfg: ModelConfig, tokenizer=None):
    """The transformers config equal to `cfg`, or a ValueError naming the first field that has no equal.
    Its bos, eos and pad ids are the tokenizer's (none without one: never ids outside the vocabulary)."""
    from transformers import GPT2Config, LlamaConfig
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"cannot export with tokenizer {tokenizer.name}: its {tokenizer.vocab_size} ids do not "
                             f"fit the model's vocab_size={cfg.vocab_size}")
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}

    if PARAMETRIZATIONS[cfg.parametrization](cfg) != Scales():  # muP away from its base width: folded in
        for field, value in (("tie_embeddings", True), ("qk_norm", True)):  # ... except where it cannot be
            if getattr(cfg, field) == value:
                raise ValueError(f"cannot export: parametrization={cfg.parametrization!r} with {field}={value!r}: "
                                 f"its {'logit' if field == 'tie_embeddings' else 'attention'} multiplier has no "
                                 f"weight of its own to fold into")
    windowed = windowed_hf_config(cfg, special)  # Mistral or Qwen3, for the windows and QK-norm that Llama lacks
    if windowed is not None:
        return windowed

    def need(condition, field, value, target):
        if not condition:
            raise ValueError(f"cannot export to {target}: {field}={value!r} has no {target} equivalent")

    common = [("norm_placement", "pre"), ("qk_norm", False), ("sliding_window", None), ("attention", "causal")]
    if cfg.positions == "learned":
        for field, value in common + [("norm", "layernorm"), ("mlp", "plain")]:
            need(getattr(cfg, field) == value, field, getattr(cfg, field), "GPT-2")
        need(cfg.n_kv_heads == cfg.n_heads, "n_kv_heads", cfg.n_kv_heads, "GPT-2")
        need(cfg.head_dim * cfg.n_heads == cfg.dim, "head_dim", cfg.head_dim, "GPT-2")
        activation = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu", "relu2": "relu2"}
        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.dim, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.mlp_hidden, activation_function=activation[cfg.activation],
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.resid_dropout, embd_pdrop=cfg.embed_dropout,
            attn_pdrop=cfg.attn_dropout, tie_word_embeddings=cfg.tie_embeddings, **special)
    if cfg.positions == "rope":
        for field, value in common + [("norm", "rmsnorm"), ("norm_bias", False), ("mlp", "gated"),
                                      ("embed_dropout", 0.0), ("resid_dropout", 0.0)]:
            need(getattr(cfg, field) == value, field, getattr(cfg, field), "Llama")
        return LlamaConfig(**llama_family_settings(cfg), attention_bias=cfg.bias, mlp_bias=cfg.bias, **special)
    raise ValueError(f"cannot export: positions={cfg.positions!r} maps to neither GPT-2 ('learned') nor Llama ('rope')")


def project_to_hf(model: Model) -> dict:
    """The model's weights under transformers' names (absent norm scales and biases written as ones
    and zeros, which is exact)."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    fold_scales(sd, model)

    def get(name, fill, size):
        return sd[name] if name in sd else torch.full((size,), fill)

    if cfg.positions == "learned":
        out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"],
               "transformer.ln_f.weight": get("norm.weight", 1.0, cfg.dim),
               "transformer.ln_f.bias": get("norm.bias", 0.0, cfg.dim), "lm_head.weight": sd["head.weight"]}
        renames = {"attention_norm": "ln_1", "mlp_norm": "ln_2", "attention.qkv": "attn.c_attn",
                   "attention.out": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
        for i in range(cfg.n_layers):
            for ours, theirs in renames.items():
                weight_name = f"layers.{i}.{ours}.weight"
                is_norm = ours.endswith("norm")
                size = cfg.dim if is_norm else model.get_submodule(f"layers.{i}.{ours}").out_features
                weight = get(weight_name, 1.0, size) if is_norm else sd[weight_name].t()
                out[f"transformer.h.{i}.{theirs}.weight"] = weight
                out[f"transformer.h.{i}.{theirs}.bias"] = get(f"layers.{i}.{ours}.bias", 0.0, size)
        return out
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": get("norm.weight", 1.0, cfg.dim),
           "lm_head.weight": sd["head.weight"]}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        p, ours = f"model.layers.{i}.", f"layers.{i}."
        out[p + "input_layernorm.weight"] = get(ours + "attention_norm.weight", 1.0, cfg.dim)
        out[p + "post_attention_layernorm.weight"] = get(ours + "mlp_norm.weight", 1.0, cfg.dim)
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            qw, kw, vw = sd[f"{ours}attention.qkv.{suffix}"].split([q, kv, kv])
            gate, up = sd[f"{ours}mlp.up.{suffix}"].chunk(2)
            out.update({f"{p}self_attn.q_proj.{suffix}": qw, f"{p}self_attn.k_proj.{suffix}": kw,
                        f"{p}self_attn.v_proj.{suffix}": vw,
                        f"{p}self_attn.o_proj.{suffix}": sd[f"{ours}attention.out.{suffix}"],
                        f"{p}mlp.gate_proj.{suffix}": gate, f"{p}mlp.up_proj.{suffix}": up,
                        f"{p}mlp.down_proj.{suffix}": sd[f"{ours}mlp.down.{suffix}"]})
    return out


def fold_scales(sd: dict, model: Model):
    """muP's multipliers folded into weights, exactly up to rounding: the logit multiplier into the
    (untied) head, the attention scale into the query projection (RoPE rotates q linearly, so scaling
    before it is the same); hf_config_for refuses the cases where there is no such weight."""
    scales = model.scales
    if scales.output != 1:
        sd["head.weight"] = sd["head.weight"] * scales.output
    if scales.attention != 1:
        q = model.cfg.n_heads * model.cfg.head_dim
        for i in range(model.cfg.n_layers):
            for suffix in ("weight", "bias"):
                name = f"layers.{i}.attention.qkv.{suffix}"
                if name in sd:
                    sd[name] = sd[name].clone()
                    sd[name][:q] *= scales.attention


def export_hf(model: Model, directory, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json + model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained(directory)` loads with the same logits, and with
    a tokenizer, its files, which `transformers.AutoTokenizer` loads to encode the same ids."""
    from transformers import AutoModelForCausalLM
    hf_config = hf_config_for(model.cfg, tokenizer)
    hf_model = AutoModelForCausalLM.from_config(hf_config)
    state = project_to_hf(model)
    state.update(qk_norm_weights(model))
    if hf_config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (hf_config.tie_word_embeddings and k == "lm_head.weight")]
    assert not missing and not unexpected, f"conversion bug: missing {missing}, unexpected {unexpected}"
    directory = Path(directory)
    hf_model.save_pretrained(directory)
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, model.cfg.context_length)
    return directory


def save_hf_tokenizer(tokenizer, directory: Path, context_length: int):
    tokenizer.to_hf(context_length).save_pretrained(directory)
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4 knows the class by this one
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")


# --- per-layer choices: Mistral (one sliding window on every layer) and Qwen3 (QK-norm; per-layer windows) ---

LLAMA_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}


def llama_family_settings(cfg: ModelConfig) -> dict:
    """The settings Llama, Mistral and Qwen3 configs share, with the same names."""
    scaling = {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length, hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, intermediate_size=cfg.mlp_hidden, hidden_act=LLAMA_ACTIVATIONS[cfg.activation],
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling,
                tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.attn_dropout)


def layer_windows(cfg: ModelConfig) -> list:
    """Each layer's sliding window; a ValueError for any other per-layer difference, which no transformers
    architecture holds."""
    layers = [cfg.layer(i) for i in range(cfg.n_layers)]
    for name in cfg.to_dict():
        if name in ("format_version", "layers", "sliding_window"):
            continue
        for index, layer in enumerate(layers):
            ours, model_wide = getattr(layer, name), getattr(cfg, name)
            if ours != model_wide:
                raise ValueError(f"cannot export: layer {index} has {name}={ours!r} where the model has "
                                 f"{model_wide!r}; no transformers architecture holds a per-layer {name}")
    return [layer.sliding_window for layer in layers]


def windowed_hf_config(cfg: ModelConfig, special: dict):
    """For a rotary model with sliding windows or QK-norm: MistralConfig (one window on every layer, no
    QK-norm) or Qwen3Config (QK-norm; windows of one size on any layers, through layer_types). None for a
    model with neither (GPT-2 or Llama then); a ValueError naming what none of them holds."""
    from transformers import MistralConfig, Qwen3Config

    windows = layer_windows(cfg)
    sizes = sorted(set(windows) - {None})
    if not sizes and not cfg.qk_norm:
        return None
    if len(sizes) > 1:
        raise ValueError(f"cannot export: sliding windows of several sizes ({', '.join(map(str, sizes))}); "
                         f"Qwen3's layer_types hold one size")
    target = "Qwen3" if cfg.qk_norm else "Mistral"
    for field, value in [("positions", "rope"), ("norm", "rmsnorm"), ("norm_bias", False), ("mlp", "gated"),
                         ("norm_placement", "pre"), ("attention", "causal"), ("bias", False), ("embed_dropout", 0.0),
                         ("resid_dropout", 0.0)]:
        if getattr(cfg, field) != value:
            raise ValueError(f"cannot export to {target} (the architecture for sliding windows and QK-norm): "
                             f"{field}={getattr(cfg, field)!r} has no {target} equivalent")
    window = sizes[0] if sizes else None
    if not cfg.qk_norm:
        if windows != [window] * cfg.n_layers:
            raise ValueError("cannot export: a sliding window on some layers only exports through Qwen3's layer_types, "
                             "which come with QK-norm (qk_norm=True); Mistral holds one window on every layer")
        return MistralConfig(**llama_family_settings(cfg), sliding_window=window, **special)
    layer_types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    return Qwen3Config(**llama_family_settings(cfg), attention_bias=False, use_sliding_window=window is not None,
                       sliding_window=window, max_window_layers=cfg.n_layers, layer_types=layer_types, **special)


def qk_norm_weights(model: Model) -> dict:
    """The QK-norm scales under Qwen3's names (ones where the norm has none); {} without QK-norm."""
    cfg = model.cfg
    if not cfg.qk_norm:
        return {}
    out = {}
    for i, layer in enumerate(model.layers):
        for ours, theirs in ((layer.attention.q_norm, "q_norm"), (layer.attention.k_norm, "k_norm")):
            weight = ours.weight if ours.weight is not None else torch.ones(cfg.head_dim)
            out[f"model.layers.{i}.self_attn.{theirs}.weight"] = weight.detach().float().cpu()
    return out
