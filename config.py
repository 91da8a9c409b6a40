"""Choices: the model and training settings, named presets, and their validation.

Edit the defaults at the bottom of this file (or pass --field=value to train.py) to change what
`python train.py` trains. Every invalid value fails at construction with one line that names the
field and what is allowed.
"""
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass

from modules.attention import ATTENTIONS
from modules.layer import NORM_PLACEMENTS
from modules.mlp import ACTIVATIONS, MLPS
from modules.norm import NORMS
from modules.parametrization import PARAMETRIZATIONS
from modules.positions import POSITIONS
from toolkit.optim import OPTIMIZERS
from toolkit.schedule import SCHEDULES


class ConfigError(ValueError):
    """A setting a user got wrong; the message is one line naming the field and the allowed values."""


def closest(name, candidates):
    """' (did you mean X?)' for the nearest candidate, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def one_of(field, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{field}={value!r} is not valid; choose one of: {', '.join(sorted(map(str, allowed)))}")


def require(condition, field, value, what):
    if not condition:
        raise ConfigError(f"{field}={value!r} is not valid: {what}")


def type_matches(value, annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(annotation) or annotation)


class Settings:
    """Shared behaviour of the config dataclasses: type checks, dict/JSON round trips."""

    def check_types(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not type_matches(value, f.type):
                expected = getattr(f.type, "__name__", str(f.type))
                raise ConfigError(f"{f.name}={value!r} is not valid: expected {expected}")
            if f.type is float and isinstance(value, int):
                setattr(self, f.name, float(value))

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise ConfigError(f"unknown {cls.__name__} field {key!r}{closest(key, names)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


# Every choice that names a class: the field and the registry its value is a key of.
REGISTRIES = {"attention": ATTENTIONS, "positions": POSITIONS, "norm": NORMS, "norm_placement": NORM_PLACEMENTS,
              "mlp": MLPS, "activation": ACTIVATIONS, "parametrization": PARAMETRIZATIONS}
# Fields that hold for the whole model; every other field may differ per layer (see ModelConfig.layers).
MODEL_WIDE = ("vocab_size", "context_length", "dim", "n_layers", "tie_embeddings", "embed_dropout", "init_std",
              "zero_head", "parametrization", "base_dim", "layers")
# Derived fields recomputed for a layer that overrides what they derive from (unless it sets them too).
DERIVED = {"head_dim": ("n_heads",), "mlp_hidden": ("mlp_multiplier", "mlp_multiple_of")}
# model_config.json carries the format it was written in; older formats are migrated on load.
# Version 1 (no format_version, before per-layer choices): every field kept its meaning, nothing to change.
FORMAT_VERSION = 2
MIGRATIONS = {1: lambda values: values}


def layer_selection(selector: str, n_layers: int) -> list[int]:
    """The layers a key of ModelConfig.layers selects: layer indices and Python slices separated by
    commas, e.g. '0', '-1' (the last layer), '1,3', '::2' (every other layer from 0), '1::2', '2:'."""
    how = "use layer indices and slices separated by commas, e.g. '0', '1,3', '-1', '::2', '1::2'"
    chosen = []
    for part in selector.split(","):
        try:
            if ":" in part:  # a slice; more than three parts or a step of 0 raise too
                chosen += list(range(n_layers))[slice(*[int(b) if b.strip() else None for b in part.split(":")])]
                continue
            index = int(part)
        except (ValueError, TypeError):
            raise ConfigError(f"layers key {selector!r} is not valid: {how}") from None
        if not -n_layers <= index < n_layers:
            raise ConfigError(f"layers key {selector!r} is not valid: there is no layer {index} "
                              f"(n_layers={n_layers}, indices 0 to {n_layers - 1} or negative from the end)")
        chosen.append(index % n_layers)
    if not chosen:
        raise ConfigError(f"layers key {selector!r} selects no layer of n_layers={n_layers}: {how}")
    return chosen


def check_variant(cfg, field: str):
    """The chosen class's own requirements: an optional `check_config(cfg)` raising a one-line ValueError."""
    check = getattr(REGISTRIES[field][getattr(cfg, field)], "check_config", None)
    if check is not None:
        try:
            check(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class ModelConfig(Settings):
    """The architecture. Fields left None are derived at construction (n_kv_heads = n_heads,
    head_dim = dim / n_heads, mlp_hidden from mlp_multiplier and mlp_multiple_of). The defaults are the
    default model: Llama-style with ALiBi and residual dropout 0.1, the combination the zoo's recipe study
    chose for many epochs of a small text (trained/README.md); the presets set their families' own."""
    vocab_size: int = 2048  # token ids the model knows (train.py sets it to the tokenizer's size unless given)
    context_length: int = 256  # the most tokens the model sees at once
    dim: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads per attention layer
    n_kv_heads: int | None = 2  # None or n_heads: MHA; 1: MQA; in between: GQA
    head_dim: int | None = None  # None: dim / n_heads
    attention: str = "causal"  # a key of modules.attention.ATTENTIONS
    positions: str = "alibi"  # a key of modules.positions.POSITIONS: rope | learned | none | alibi
    rope_theta: float = 10000.0  # RoPE base: larger rotates slower, for longer contexts
    rope_scaling: dict | None = None  # Llama 3.1 style: factor, low/high_freq_factor, original_max_position_embeddings
    qk_norm: bool = False  # normalise queries and keys per head before attention
    sliding_window: int | None = None  # each token attends to at most this many tokens (itself included)
    diff_lambda_init: float | None = None  # attention="differential": lambda's start (None: the paper's depth schedule)
    norm: str = "rmsnorm"  # a key of modules.norm.NORMS
    norm_eps: float = 1e-5  # keeps each norm from dividing by zero
    norm_affine: bool = True  # norms have a learned scale
    norm_bias: bool = False  # norms have a learned bias (LayerNorm)
    dyt_alpha: float = 0.5  # norm="dyt": the initial alpha of tanh(alpha * x)
    norm_placement: str = "pre"  # a key of modules.layer.NORM_PLACEMENTS: pre | post | sandwich
    mlp: str = "gated"  # a key of modules.mlp.MLPS
    activation: str = "silu"  # a key of modules.mlp.ACTIVATIONS
    mlp_hidden: int | None = None  # None: mlp_multiplier * dim, rounded up to mlp_multiple_of
    mlp_multiplier: float = 8 / 3  # MLP width over dim, when mlp_hidden is None
    mlp_multiple_of: int = 1  # round mlp_hidden up to a multiple of this
    bias: bool = False  # biases in the attention and MLP linear layers
    tie_embeddings: bool = False  # the output head shares the token embedding matrix
    embed_dropout: float = 0.0  # dropout after the token (and position) embeddings
    attn_dropout: float = 0.0  # dropout on the attention probabilities
    resid_dropout: float = 0.1  # dropout on each block's output before it joins the residual stream
    init_std: float = 0.02  # standard deviation of the initial weights
    zero_head: bool = False  # start the output head at zero (muP's advice: the first logits are 0 at any width)
    parametrization: str = "sp"  # sp | mup | spectral (modules/parametrization.py: rates that carry across widths)
    base_dim: int | None = None  # mup, spectral: the width the hyperparameters were tuned at (None: dim, i.e. sp)
    # Per-layer overrides: {selector: {field: value}}, selectors as in layer_selection ('0', '1,3', '::2');
    # later entries win where they overlap. E.g. {"::2": {"sliding_window": 64}, "0": {"positions": "none"}}.
    layers: dict | None = None  # per-layer overrides {selector: {field: value}}, e.g. {"::2": {"sliding_window": 64}}

    def __post_init__(self):
        self.check_types()
        for name in ("vocab_size", "context_length", "dim", "n_layers", "n_heads"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be a positive integer")
        self.derive_sizes()
        for field, registry in REGISTRIES.items():
            one_of(field, getattr(self, field), registry)
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be positive")
        if self.rope_scaling is not None:
            keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            require(set(self.rope_scaling) == keys, "rope_scaling", self.rope_scaling,
                    f"give exactly the Llama 3.1 keys {', '.join(sorted(keys))}")
        if self.sliding_window is not None:
            require(self.sliding_window > 0, "sliding_window", self.sliding_window, "must be None or positive")
        require(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be positive")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout"):
            require(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        require(self.init_std > 0, "init_std", self.init_std, "must be positive")
        require(not (self.zero_head and self.tie_embeddings), "zero_head", self.zero_head,
                "would zero the token embeddings the head shares: untie them (tie_embeddings=False)")
        if self.base_dim is not None:
            require(self.base_dim > 0, "base_dim", self.base_dim, "must be None or a positive integer")
        for field in REGISTRIES:
            check_variant(self, field)
        self.check_layers()

    def derive_sizes(self):
        if self.head_dim is None:
            divisors = [n for n in range(1, self.dim + 1) if self.dim % n == 0]
            require(self.dim % self.n_heads == 0, "n_heads", self.n_heads,
                    f"must divide dim={self.dim} (choose from {', '.join(map(str, divisors))}) or set head_dim")
            self.head_dim = self.dim // self.n_heads
        require(self.head_dim > 0, "head_dim", self.head_dim, "must be a positive integer")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        divisors = [n for n in range(1, self.n_heads + 1) if self.n_heads % n == 0]
        require(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, "n_kv_heads", self.n_kv_heads,
                f"must divide n_heads={self.n_heads} (choose from {', '.join(map(str, divisors))})")
        require(self.mlp_multiple_of > 0, "mlp_multiple_of", self.mlp_multiple_of, "must be a positive integer")
        if self.mlp_hidden is None:
            require(self.mlp_multiplier > 0, "mlp_multiplier", self.mlp_multiplier, "must be positive")
            hidden = int(self.mlp_multiplier * self.dim + 1e-6)  # 8/3 * 384 must give 1024, not 1023
            self.mlp_hidden = -(-hidden // self.mlp_multiple_of) * self.mlp_multiple_of
        require(self.mlp_hidden > 0, "mlp_hidden", self.mlp_hidden, "must be a positive integer")

    def check_layers(self):
        """The per-layer overrides name real layers and per-layer fields, and give every layer a valid config."""
        if self.layers is None:
            return
        self.layers = {str(selector): values for selector, values in self.layers.items()}  # JSON keys are strings
        names = {f.name for f in dataclasses.fields(self)}
        for selector, values in self.layers.items():
            layer_selection(selector, self.n_layers)
            require(isinstance(values, dict), f"layers[{selector!r}]", values, "give a dict of field: value overrides")
            for name in values:
                if name not in names:
                    raise ConfigError(f"layers[{selector!r}]: unknown field {name!r}{closest(name, names)}")
                require(name not in MODEL_WIDE, f"layers[{selector!r}].{name}", values[name],
                        f"{name} holds for the whole model; per-layer fields are all but {', '.join(MODEL_WIDE)}")
        embedding = POSITIONS[self.positions].input_embedding
        for index in range(self.n_layers):
            try:
                layer = self.layer(index)
            except ConfigError as e:
                raise ConfigError(f"layer {index}: {e}") from None
            require(POSITIONS[layer.positions].input_embedding is embedding, f"layer {index}: positions",
                    layer.positions, f"positions with an input embedding hold for the whole model ({self.positions!r})")

    def layer(self, index: int) -> "ModelConfig":
        """The config of layer `index`: this one with the `layers` entries that select it applied in order."""
        if not self.layers:
            return self
        overrides = {}
        for selector, values in self.layers.items():
            if index in layer_selection(selector, self.n_layers):
                overrides.update(values)
        values = {**self.to_dict(), **overrides, "layers": None}
        values.pop("format_version")
        for derived, inputs in DERIVED.items():
            if derived not in overrides and any(name in overrides for name in inputs):
                values[derived] = None
        return ModelConfig(**values)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **super().to_dict()}

    @classmethod
    def from_dict(cls, values: dict):
        """A config from its dict (a saved model_config.json), migrated from older format versions; a dict
        without format_version is format 1, from before versions were written."""
        values = dict(values)
        version = values.pop("format_version", 1)
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ConfigError(f"format_version={version!r} is not one this code reads (1 to {FORMAT_VERSION}): "
                              f"update the workbench to the version that saved the model")
        for old in range(version, FORMAT_VERSION):
            values = MIGRATIONS[old](values)
        return super().from_dict(values)

    @classmethod
    def preset(cls, name: str, **overrides):
        """A named preset (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}{closest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides, "format_version": FORMAT_VERSION})  # today's format


# Presets as data: the two families, then sizes. GPT-2: learned positions, LayerNorm with bias,
# GELU 4x MLP, multi-head attention, biases, tied head. Llama 3: RoPE, RMSNorm, SwiGLU, grouped-query
# attention, no biases, untied head. Neither has the default model's dropout.
GPT2 = dict(positions="learned", norm="layernorm", norm_bias=True, mlp="plain", activation="gelu",
            mlp_multiplier=4.0, n_kv_heads=None, bias=True, tie_embeddings=True, resid_dropout=0.0)
LLAMA3 = dict(positions="rope", rope_theta=500000.0, norm="rmsnorm", norm_bias=False, mlp="gated",
              activation="silu", mlp_multiplier=8 / 3, bias=False, tie_embeddings=False, resid_dropout=0.0)
# Gemma 2's layout: sandwich norms, GeGLU 4x MLP, tied head, and sliding-window (local) layers alternating
# with global ones, local first, the window half the context. Not Gemma's logit soft-capping or its
# embedding scaling, which this workbench does not have.
GEMMA2 = dict(positions="rope", rope_theta=10000.0, norm="rmsnorm", norm_bias=False, norm_placement="sandwich",
              mlp="gated", activation="gelu_tanh", mlp_multiplier=4.0, bias=False, tie_embeddings=True,
              resid_dropout=0.0)
PRESETS = {
    "gpt2": {**GPT2, "vocab_size": 50257, "context_length": 1024, "dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {**GPT2, "vocab_size": 50257, "context_length": 1024, "dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {**GPT2, "vocab_size": 50257, "context_length": 1024, "dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {**GPT2, "vocab_size": 50257, "context_length": 1024, "dim": 1600, "n_layers": 48, "n_heads": 25},
    "gpt2-1m": {**GPT2, "vocab_size": 2048, "context_length": 256, "dim": 128, "n_layers": 4, "n_heads": 4},
    "llama3-8b": {**LLAMA3, "vocab_size": 128256, "context_length": 8192, "dim": 4096, "n_layers": 32,
                  "n_heads": 32, "n_kv_heads": 8, "mlp_hidden": 14336},
    # Small contexts need no slow rotations: theta 10000 as in the original RoPE.
    "llama3-1m": {**LLAMA3, "rope_theta": 10000.0, "vocab_size": 2048, "context_length": 256, "dim": 128,
                  "n_layers": 4, "n_heads": 4, "n_kv_heads": 2},
    "gemma2-1m": {**GEMMA2, "vocab_size": 2048, "context_length": 256, "dim": 128, "n_layers": 4, "n_heads": 4,
                  "n_kv_heads": 2, "layers": {"::2": {"sliding_window": 128}}},
}


@dataclass
class TrainConfig(Settings):
    """How to train: data, tokenizer, optimisation, evaluation and logging. `python train.py` uses
    these defaults, with any preset; override any of them with --field=value. The optimisation defaults
    (Muon at 8e-3, weight decay 0.3, cosine to lr / 10, 1,600 steps of 16 x 256, windows shifted each
    epoch) are the recipe the zoo's studies chose (trained/README.md)."""
    name: str = "Llama3_1m"  # run folder trained/NAME (may nest: study/variant/seed0); default with --preset: its name
    data: str = "tinystories-sample"  # shipped tinystories-sample|shakespeare; hub tinystories|fineweb-edu|hf:ID; globs
    text_format: str = "auto"  # .txt layout: auto | documents (<|endoftext|> lines) | lines | whole
    max_docs: int | None = None  # read at most this many documents (hub datasets are large)
    val_fraction: float = 0.1  # documents (or, for one whole text, its tail) held out for validation
    tokenizer: str = "tinystories-sample-2048"  # see toolkit/tokenizer.py: FAMILY-SIZE, bytes, gpt2, hf:ID
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False  # torch.compile the model (falls back to eager with a warning if it fails)
    seed: int = 1337  # initial weights, batch order and dropout
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1600  # optimizer steps of the whole run (1600 x 16 x 256 = 6.55M tokens by default)
    lr: float = 8e-3  # peak learning rate, reached at the end of warmup
    min_lr: float | None = None  # the rate cosine and wsd decay to (None: lr / 10)
    schedule: str = "cosine"  # a key of toolkit.schedule.SCHEDULES: cosine | wsd | constant, after linear warmup
    warmup_steps: int = 100  # steps of linear warmup from 0 to lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays to min_lr
    optimizer: str = "muon"  # adamw | muon (Muon for hidden matrices, AdamW for the rest): toolkit/optim.py
    weight_decay: float = 0.3  # on matrices only: never on norms, biases or embeddings
    muon_lr: float | None = None  # muon: the hidden matrices' peak rate (None: lr); the schedule scales it too
    muon_momentum: float = 0.95  # muon: momentum of the hidden matrices' updates
    muon_adjust_lr: str = "match_rms_adamw"  # muon: match_rms_adamw (AdamW's rate carries over) | original
    beta1: float = 0.9  # AdamW's momentum
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    doc_masking: bool = False  # attend only within each document of a packed window
    shift_windows: bool = True  # each epoch after the first cuts the text into windows at a new seeded offset
    eval_every: int = 200  # steps between validation runs (and at the end)
    eval_batches: int = 20  # size of the fixed validation set, in batches
    log_every: int = 10  # steps per row of log_data.csv (train loss is the mean over the row's steps)
    save_every: int = 500  # steps between checkpoints (and at the end)
    tensorboard: bool = False  # also write TensorBoard logs to trained/NAME/tensorboard
    fsdp: bool = False  # shard parameters, gradients and optimizer state across processes (FSDP2)
    max_minutes: float | None = None  # also stop (evaluate, save) after this many minutes of training

    def __post_init__(self):
        self.check_types()
        parts = self.name.split("/")
        require(all(part not in ("", ".", "..") for part in parts) and "\\" not in self.name, "name", self.name,
                "must be a folder name under trained/, or nested ones such as study/variant/seed0 "
                "(no empty, . or .. parts)")
        one_of("text_format", self.text_format, ("auto", "documents", "lines", "whole"))
        one_of("schedule", self.schedule, SCHEDULES)
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every", "save_every"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be a positive integer")
        for name in ("warmup_steps", "seed"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be zero or positive")
        if self.max_docs is not None:
            require(self.max_docs > 0, "max_docs", self.max_docs, "must be None or positive")
        require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction,
                "must be in (0, 1): validation needs data")
        require(self.lr > 0, "lr", self.lr, "must be positive")
        if self.min_lr is None:  # derived, so that --lr alone moves the whole schedule
            self.min_lr = self.lr / 10
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        require(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "must be in (0, 1]")
        if self.schedule == "wsd":  # warmup running into the decay would make the rate jump down when it ends
            decay_start = self.wsd_decay_start()
            require(self.warmup_steps <= decay_start, "warmup_steps", self.warmup_steps,
                    f"wsd decays from step {decay_start} of {self.max_steps} (decay_fraction={self.decay_fraction}), "
                    f"so warmup must end by then: lower warmup_steps or decay_fraction")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("muon_adjust_lr", self.muon_adjust_lr, ("match_rms_adamw", "original"))
        if self.muon_lr is not None:
            require(self.muon_lr > 0, "muon_lr", self.muon_lr, "must be None or positive")
        require(0 <= self.muon_momentum < 1, "muon_momentum", self.muon_momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be zero or positive")
        require(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        if self.max_minutes is not None:
            require(self.max_minutes > 0, "max_minutes", self.max_minutes, "must be None or positive")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be zero (off) or positive")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device", self.device,
                "choose auto, cpu, cuda, cuda:N or mps")

    def wsd_decay_start(self) -> int:
        """The step where warmup-stable-decay starts to decay: the last decay_fraction of max_steps."""
        return self.max_steps - int(self.decay_fraction * self.max_steps)
