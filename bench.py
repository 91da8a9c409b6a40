"""The project's benchmarks. Each prints figures measured against a reference in the same run.

    python bench.py model       # training step of the project's Model against PlainGPT, this file's plain reference
    python bench.py loop        # the real training loop (data, logging) against the bare training step
    python bench.py tokenizer   # encoding MB/s and family training time, on the embedded TinyStories sample
    python bench.py generate    # new tokens/s: KV cache, no cache, transformers' generate
    python bench.py optim       # a training step with each optimizer (Muon, ...) against one with AdamW
    python bench.py gpu         # on a CUDA machine: the GPU issue's figures in one table (--smoke: any machine)

`python bench.py SECTION --help` lists a section's options.
"""
import argparse
import dataclasses
import functools
import gc
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError, ModelConfig, TrainConfig
from modules.model import Model
from toolkit.data import DataError, read_documents
from toolkit.optim import OPTIMIZERS, make_optimizer
from toolkit.tokenizer import TokenizerError
from toolkit.trainer import Interrupted, TrainError, model_flops_utilization, peak_flops

ROOT = Path(__file__).resolve().parent


# --- helpers of every section ---
def interleaved_seconds(runs: dict, rounds: int, sync=lambda: None) -> dict:
    """Wall seconds of every run (name -> function) in each round. The runs take turns, in reversed
    order every other round, so that the machine's noise and drift hit all of them alike.
    sync waits for queued device work (CUDA) before a clock is read."""
    seconds = {name: [] for name in runs}
    for round_index in range(rounds):
        for name in (list(runs) if round_index % 2 == 0 else list(reversed(runs))):
            sync()
            start = time.perf_counter()
            runs[name]()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def device_sync(device) -> callable:
    """What waits for a device's queued work before a clock is read: CUDA's synchronize; nothing on a CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def speed_ratio(seconds: dict, name: str, other: str) -> float:
    """How many times faster `name` ran than `other`: the median over rounds of the per-round ratio,
    robust to the machine slowing down or speeding up between rounds."""
    return statistics.median(theirs / ours for ours, theirs in zip(seconds[name], seconds[other]))


def sample_stories() -> list[str]:
    """The stories of the embedded TinyStories sample (toolkit.data's "tinystories-sample")."""
    return list(read_documents("tinystories-sample"))


# --- the plain reference model ---
def rotate(x, cos, sin):
    """Rotary positions: channel i turns with channel i + head_dim/2 by its position's angle."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class PlainAttention(nn.Module):
    """Causal self-attention; q, k and v come from one matmul. With fewer K/V heads than query heads,
    each K/V head is copied to serve its group of query heads (grouped-query attention)."""

    def __init__(self, dim, n_heads, n_kv_heads, bias):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.widths = [n_heads * self.head_dim] + [n_kv_heads * self.head_dim] * 2
        self.qkv = nn.Linear(dim, sum(self.widths), bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, rope=None):
        B, T, C = x.shape
        q, k, v = (part.view(B, T, -1, self.head_dim).transpose(1, 2)
                   for part in self.qkv(x).split(self.widths, dim=-1))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class PlainMLP(nn.Module):
    """gpt2: down(gelu(up(x))), exact GELU. llama: SwiGLU, down(silu(gate(x)) * up(x)), with the gate and
    up projections in one matrix, gate first."""

    def __init__(self, dim, hidden, gated, bias):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            gate, h = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * h)
        return self.down(F.gelu(h))


def plain_norm(kind, dim):
    return nn.RMSNorm(dim, eps=1e-5) if kind == "llama" else nn.LayerNorm(dim, eps=1e-5)


class PlainBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x)). Biases for gpt2 only."""

    def __init__(self, kind, dim, n_heads, n_kv_heads, mlp_hidden):
        super().__init__()
        llama = kind == "llama"
        self.attention_norm = plain_norm(kind, dim)
        self.attention = PlainAttention(dim, n_heads, n_kv_heads, bias=not llama)
        self.mlp_norm = plain_norm(kind, dim)
        self.mlp = PlainMLP(dim, mlp_hidden, gated=llama, bias=not llama)

    def forward(self, x, rope=None):
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    """The bench's yardstick: a GPT written out plainly, nanoGPT style, in two flavours.
    gpt2: token + learned position embeddings, LayerNorm, GELU 4x MLP, multi-head attention, biases, tied head.
    llama: rotary positions (theta 10000), RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.
    Parameter names are the project Model's, so the same weights load into either."""

    def __init__(self, kind, vocab_size, context_length, dim, n_layers, n_heads, n_kv_heads, mlp_hidden):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(context_length, dim) if kind == "gpt2" else None
        self.layers = nn.ModuleList(PlainBlock(kind, dim, n_heads, n_kv_heads, mlp_hidden) for _ in range(n_layers))
        self.norm = plain_norm(kind, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if kind == "llama":
            head_dim = dim // n_heads
            speeds = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            angles = torch.outer(torch.arange(context_length, dtype=torch.float32), speeds)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        else:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():  # GPT-2 init; residual projections shrunk by depth
            if p.dim() == 2:
                deep = name.endswith(("out.weight", "down.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers) if deep else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids, targets=None):
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        rope = None
        if self.kind == "gpt2":
            x = x + self.pos_embed(torch.arange(T, device=input_ids.device))
        else:
            rope = self.cos[:T], self.sin[:T]
        for layer in self.layers:
            x = layer(x, rope)
        logits = self.head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
# --- end the plain reference model ---


# --- training benchmarks ---
PRESET_OF_KIND = {"gpt2": "gpt2-1m", "llama": "llama3-1m"}  # the project preset each PlainGPT flavour matches


def matching_models(kind: str, **dims) -> tuple[Model, PlainGPT]:
    """The project's Model (the kind's preset with these ModelConfig fields) and a PlainGPT of the same
    architecture, with the same weights (the project's init, seed 0). Equal parameter counts are checked:
    unequal ones would make a speed ratio meaningless."""
    cfg = ModelConfig.preset(PRESET_OF_KIND[kind], **dims)
    torch.manual_seed(0)
    ours = Model(cfg)
    reference = PlainGPT(kind, cfg.vocab_size, cfg.context_length, cfg.dim, cfg.n_layers, cfg.n_heads,
                         cfg.n_kv_heads, cfg.mlp_hidden)
    counts = [sum(p.numel() for p in model.parameters()) for model in (ours, reference)]
    if counts[0] != counts[1]:
        raise RuntimeError(f"{kind}: the project's Model has {counts[0]} parameters, PlainGPT {counts[1]}")
    # The same weights in both: the same arithmetic, down to the values (a GPU's power draw, and so its clock,
    # depends on them), so that the ratio measures the code alone.
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def make_step(model, input_ids, targets, amp: bool):
    """One training step on a fixed batch: forward (under bf16 autocast if amp), backward, AdamW
    (fused on CUDA), gradients released."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=input_ids.is_cuda)

    def step():
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=amp):
            _, loss = model(input_ids, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def matching_steps(kind: str, dims: dict, batch_size: int, device: torch.device, amp: bool, compile: bool):
    """The project's Model and PlainGPT (matching_models) on `device` in training mode, and a training step of
    each (compiled if asked) on one fixed random batch."""
    generator = torch.Generator().manual_seed(0)
    input_ids, targets = torch.randint(0, dims["vocab_size"], (2, batch_size, dims["context_length"]),
                                       generator=generator).to(device)
    models = [model.to(device).train() for model in matching_models(kind, **dims)]
    return models, [make_step(torch.compile(model) if compile else model, input_ids, targets, amp)
                    for model in models]


def compare_steps(kind: str, dims: dict, batch_size: int, device: torch.device, amp: bool, compile: bool,
                  steps: int, rounds: int, sync=lambda: None, warmup_rounds: int = 2) -> dict:
    """Training tokens/s of the project's Model and PlainGPT (matching_models(kind, **dims)) on the same fixed
    random batch: warm-up rounds (compilation included), then alternating timed rounds of `steps` steps.
    Returns tokens_per_s {"ours", "reference"} (medians), ratio (ours / reference, the median of per-round
    ratios), the project's model and batch_size."""
    models, steps_of = matching_steps(kind, dims, batch_size, device, amp, compile)

    def run(step):
        return lambda: [step() for _ in range(steps)]
    runs = {"ours": run(steps_of[0]), "reference": run(steps_of[1])}
    interleaved_seconds(runs, warmup_rounds, sync)
    seconds = interleaved_seconds(runs, rounds, sync)
    tokens = steps * batch_size * dims["context_length"]
    return {"tokens_per_s": {name: tokens / statistics.median(s) for name, s in seconds.items()},
            "ratio": speed_ratio(seconds, "ours", "reference"), "model": models[0], "batch_size": batch_size}


def bench_model(args):
    """Training tokens/s of the project's Model against PlainGPT for each kind: same dims, seed 0 weights,
    the same fixed batch, warm-up steps, then alternating rounds; ratio = ours / reference."""
    parser = argparse.ArgumentParser(prog="bench.py model", description=bench_model.__doc__)
    parser.add_argument("--kinds", nargs="+", choices=sorted(PRESET_OF_KIND), default=["gpt2", "llama"])
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--context_length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--n_kv_heads", type=int, default=2, help="K/V heads of the llama kind (gpt2: n_heads)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then fused AdamW)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast around the forward pass")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    o = parser.parse_args(args)
    if o.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device={o.device} is not available here: use --device=cpu")
    device = torch.device(o.device)
    dims = {kind: {"vocab_size": o.vocab_size, "context_length": o.context_length, "dim": o.dim, "n_layers": o.n_layers,
                   "n_heads": o.n_heads, "n_kv_heads": o.n_kv_heads if kind == "llama" else o.n_heads}
            for kind in o.kinds}
    for kind in o.kinds:  # bad dims fail now, not after minutes of timing
        ModelConfig.preset(PRESET_OF_KIND[kind], **dims[kind])
    print(f"{device.type} {'bf16 autocast' if o.amp else 'float32'}{', compiled' if o.compile else ''}: batch "
          f"{o.batch_size} x {o.context_length}, {o.n_layers} layers, {o.dim} dims, {o.n_heads} heads, vocab "
          f"{o.vocab_size}; median of {o.rounds} rounds of {o.steps} steps, {torch.get_num_threads()} threads")
    for kind in o.kinds:
        result = compare_steps(kind, dims[kind], o.batch_size, device, o.amp, o.compile, o.steps, o.rounds,
                               device_sync(device))
        speed, n_params = result["tokens_per_s"], result["model"].n_params()
        kv = f"{dims[kind]['n_kv_heads']} KV heads" if kind == "llama" else "MHA"
        print(f"{kind:5s} ({n_params / 1e6:.2f}M params, {kv:10s}) ours {speed['ours']:>9.1f} tok/s  reference "
              f"{speed['reference']:>9.1f} tok/s  ratio {result['ratio']:.3f} (target >= 0.97)")


@contextmanager
def scratch_space():
    """Runs and token shards go to a temporary folder, not into the repository's trained/ and data_cache/;
    both are restored (and the folder removed) after."""
    from toolkit import checkpoint, data
    scratch, saved = Path(tempfile.mkdtemp(prefix="bench-")), (checkpoint.TRAINED, data.CACHE)
    checkpoint.TRAINED, data.CACHE = scratch / "trained", scratch / "data_cache"
    try:
        yield scratch
    finally:
        checkpoint.TRAINED, data.CACHE = saved
        shutil.rmtree(scratch, ignore_errors=True)


def bare_step_tokens_per_s(model: Model, wrapped, train_cfg: TrainConfig, device: torch.device, steps: int,
                           warmup: int, sync=lambda: None) -> float:
    """Tokens/s of toolkit.trainer.train_step (the loop's step: autocast, clipping, the schedule's rate) on one
    fixed random batch handed over from the host as the loop's are, with a new optimizer of train_cfg's:
    `warmup` steps (compilation), then `steps` timed ones. wrapped: the model as called (compiled or not)."""
    from toolkit.trainer import Distributed, train_step
    optimizer = make_optimizer(model, train_cfg, device)
    ids = torch.randint(0, model.cfg.vocab_size, (train_cfg.batch_size, model.cfg.context_length + 1))
    batch = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]

    def step():
        train_step(wrapped, optimizer, batch, train_cfg, Distributed(), device, train_cfg.lr)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return train_cfg.batch_size * model.cfg.context_length * steps / (time.perf_counter() - start)


def loop_tokens_per_s(model_cfg: ModelConfig, train_cfg: TrainConfig, stop_at: int | None = None) -> float:
    """Tokens/s of the real training loop (toolkit.trainer.train, as train.py runs it) over its log rows but the
    first (the warm-up: compilation), from log_data.csv; evaluation and saving are not counted. Rows must
    span equal numbers of steps."""
    import pandas as pd

    from toolkit.trainer import train
    out = train(model_cfg, train_cfg, overwrite=True, stop_at=stop_at, progress_bar=False)
    intervals = pd.read_csv(out / "log_data.csv").iloc[1:]  # each row: tokens/s over its interval
    return float(len(intervals) / (1 / intervals["tokens_per_s"]).sum())


def bench_loop(args):
    """Tokens/s of the real training loop (batches from the token shards, schedule, logging) against the
    bare step (toolkit.trainer.train_step on one fixed batch), same model and shapes, alternating. Both
    count the wall time of all steps after the first log interval (warm-up), evaluation and saving excluded.
    The data is the embedded TinyStories sample."""
    parser = argparse.ArgumentParser(prog="bench.py loop", description=bench_loop.__doc__)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--context_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimizer", default="adamw", help="adamw | muon (both sides use it)")
    a = parser.parse_args(args)
    if a.steps < 4:
        parser.error("--steps must be at least 4 (the first quarter is the warm-up)")
    model_cfg = ModelConfig.preset("llama3-1m", context_length=a.context_length)
    log_every = a.steps // 4
    train_cfg = TrainConfig(name="bench", data="tinystories-sample", tokenizer="tinystories-sample-2048", device="cpu",
                            optimizer=a.optimizer, batch_size=a.batch_size, max_steps=a.steps, log_every=log_every,
                            eval_every=10 ** 9, eval_batches=1, save_every=10 ** 9)

    def bare_tokens_per_s():
        torch.manual_seed(train_cfg.seed)
        model = Model(model_cfg)
        return bare_step_tokens_per_s(model, model, train_cfg, torch.device("cpu"), a.steps - log_every, log_every)

    with scratch_space():
        loop_tokens_per_s(model_cfg, train_cfg)  # builds the token cache once, outside the timing
        ratios = []
        for _ in range(a.rounds):
            bare, loop = bare_tokens_per_s(), loop_tokens_per_s(model_cfg, train_cfg)
            ratios.append(loop / bare)
            print(f"bare step {bare:9.1f} tok/s   real loop {loop:9.1f} tok/s   ratio {loop / bare:.3f}")
    print(f"median ratio {statistics.median(ratios):.3f} (target >= 0.97); batch {a.batch_size} x "
          f"{a.context_length}, llama3-1m, {torch.get_num_threads()} threads")
# --- end training benchmarks ---


# --- tokenizer benchmark ---
def bench_tokenizer(args):
    """Encoding MB/s of the batch API on the first --mb megabytes of the embedded TinyStories sample for every
    size of the shipped tinystories-sample family, and the time to train a family of those sizes on the whole sample."""
    from toolkit.tokenizer import N_THREADS, load_tokenizer
    from toolkit.tokenizer_training import DEFAULT_SIZES, train_family

    parser = argparse.ArgumentParser(prog="bench.py tokenizer", description=bench_tokenizer.__doc__)
    parser.add_argument("--mb", type=float, default=2.0, help="megabytes of text to encode")
    parser.add_argument("--repeats", type=int, default=3, help="encoding runs per size; the fastest counts")
    options = parser.parse_args(args)
    start = time.perf_counter()
    stories = sample_stories()
    reading = time.perf_counter() - start

    texts, n_bytes = [], 0
    for story in stories:
        if n_bytes >= options.mb * 1e6:
            break
        texts.append(story)
        n_bytes += len(story.encode())
    print(f"encoding {n_bytes / 1e6:.2f} MB ({len(texts)} stories) with the batch API, {N_THREADS} threads, "
          f"best of {options.repeats}")
    tokenizers = {size: load_tokenizer(f"tinystories-sample-{size}") for size in DEFAULT_SIZES}
    seconds = interleaved_seconds({size: lambda t=t: t.encode(texts) for size, t in tokenizers.items()},
                                  options.repeats)
    for size in DEFAULT_SIZES:
        print(f"  tinystories-sample-{size:<5} {n_bytes / 1e6 / min(seconds[size]):6.1f} MB/s")

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        family = train_family(stories, DEFAULT_SIZES, out_dir, verbose=False)
        total = reading + time.perf_counter() - start
    print(f"training the {DEFAULT_SIZES[-1]} family on the TinyStories sample "
          f"({family['training_bytes'] / 1e6:.1f} MB, "
          f"{family['training_documents']} stories): sentencepiece {family['training_seconds']:.1f} s, {total:.1f} s "
          f"in all (reading, training, checking every size, writing)")
# --- end tokenizer benchmark ---


# --- generation benchmark ---
def batch_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive batch sizes, e.g. 1,8")
    return sizes


def hf_twin(model: Model, device: torch.device, dtype: torch.dtype = torch.float32):
    """transformers' model with `model`'s weights (written by tools.export_hf, loaded by transformers), in eval mode."""
    import transformers

    import tools
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as directory:
        tools.export_hf(model, directory)
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()


def generation_runs(model: Model, hf_model, prompts: torch.Tensor, new_tokens: int, uncached: bool = True) -> dict:
    """name -> a function that generates exactly `new_tokens` greedy tokens after each of `prompts` (B, P) and
    returns them as lists: "cached" (toolkit.generate with the KV cache), "uncached" (without, if asked) and
    "transformers" (its generate on the same weights)."""
    from toolkit.generate import GenerationSettings, generate
    settings = GenerationSettings(temp=0, max_len=new_tokens)

    def ours(use_cache):
        return generate(model, prompts.tolist(), settings, eos_id=None, use_cache=use_cache)

    def theirs():
        with torch.inference_mode():
            out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()
    runs = {"cached": functools.partial(ours, True), "uncached": functools.partial(ours, False), "transformers": theirs}
    return runs if uncached else {name: run for name, run in runs.items() if name != "uncached"}


def time_generation(runs: dict, new_tokens: int, rounds: int, sync=lambda: None) -> tuple[dict, dict, dict]:
    """One untimed run of each (warm-up, and the tokens to compare), then `rounds` alternating timed ones.
    Returns (outputs, seconds per round, new tokens/s: medians)."""
    outputs = {name: run() for name, run in runs.items()}
    seconds = interleaved_seconds(runs, rounds, sync)
    batch = len(next(iter(outputs.values())))
    return outputs, seconds, {name: batch * new_tokens / statistics.median(s) for name, s in seconds.items()}


def same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """Positions where two batches of generated ids agree."""
    return sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))


def bench_generate(args):
    """New tokens per second of toolkit.generate with and without the KV cache, and of transformers'
    generate on the same weights (exported with tools.export_hf): greedy, every run exactly
    --new_tokens tokens after a --prompt_len token prompt, at each batch size, alternating runs, medians."""
    import transformers

    parser = argparse.ArgumentParser(prog="bench.py generate", description=bench_generate.__doc__)
    parser.add_argument("--preset", default="llama3-1m")
    parser.add_argument("--prompt_len", type=int, default=56)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--batches", type=batch_sizes, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each; the median counts")
    options = parser.parse_args(args)
    torch.manual_seed(0)
    model = Model(ModelConfig.preset(options.preset)).eval()  # random weights run as fast as trained ones
    hf_model = hf_twin(model, torch.device("cpu"))
    print(f"{options.preset} ({model.n_params() / 1e6:.2f}M parameters), {options.prompt_len}-token prompts, "
          f"{options.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, median of {options.rounds} "
          f"runs; transformers {transformers.__version__} ({hf_model.config._attn_implementation} attention)")
    print(f"{'batch':>5} {'cached':>9} {'uncached':>9} {'transformers':>12}   {'cache/no cache':>18}   "
          f"{'ours/transformers':>17}   same tokens as transformers")
    for batch in options.batches:
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, options.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        runs = generation_runs(model, hf_model, prompts, options.new_tokens)
        outputs, seconds, speed = time_generation(runs, options.new_tokens, options.rounds)
        assert outputs["cached"] == outputs["uncached"]
        same = same_tokens(outputs["cached"], outputs["transformers"])
        cache_target = 3 if batch == 1 else 6
        print(f"{batch:>5} {speed['cached']:>9.0f} {speed['uncached']:>9.0f} {speed['transformers']:>12.0f}   "
              f"{speed_ratio(seconds, 'cached', 'uncached'):>8.1f}x (>= {cache_target}x)   "
              f"{speed_ratio(seconds, 'cached', 'transformers'):>7.2f}x (>= 1x)   {same}/{batch * options.new_tokens}")
    print("(new tokens/s, medians; ratios: medians of per-round ratios; greedy argmax may differ from "
          "transformers' only on float near-ties)")
# --- end generation benchmark ---


def bench_optim(args):
    """Training tokens/s of a step with each optimizer of toolkit.optim against a step with AdamW: the same
    llama3-1m model (seed 0), the same fixed batch, alternating rounds; ratio = optimizer / AdamW."""
    parser = argparse.ArgumentParser(prog="bench.py optim", description=bench_optim.__doc__)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--context_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=6)
    o = parser.parse_args(args)
    model_cfg = ModelConfig.preset("llama3-1m", context_length=o.context_length)
    generator = torch.Generator().manual_seed(0)
    input_ids, targets = torch.randint(0, model_cfg.vocab_size, (2, o.batch_size, o.context_length),
                                       generator=generator)

    def run(name):
        torch.manual_seed(0)
        model = Model(model_cfg)
        optimizer = make_optimizer(model, TrainConfig(optimizer=name), torch.device("cpu"))

        def steps():
            for _ in range(o.steps):
                _, loss = model(input_ids, targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return steps
    runs = {name: run(name) for name in OPTIMIZERS}
    interleaved_seconds(runs, rounds=2)  # warm-up
    seconds = interleaved_seconds(runs, o.rounds)
    print(f"cpu float32, llama3-1m, batch {o.batch_size} x {o.context_length}; median of {o.rounds} rounds of "
          f"{o.steps} steps, {torch.get_num_threads()} threads")
    for name, times in seconds.items():
        speed = o.steps * o.batch_size * o.context_length / statistics.median(times)
        print(f"{name:6s} {speed:>9.1f} tok/s  ratio to adamw {speed_ratio(seconds, name, 'adamw'):.3f}")


# --- GPU benchmark ---
@dataclass(frozen=True)
class GpuPlan:
    """The sizes of `bench.py gpu`: the issue's on a GPU (GPU_PLAN); tiny ones with --smoke (SMOKE_PLAN), which run
    every measurement's logic on a CPU in seconds."""
    models: dict  # kind -> ModelConfig fields of the two models: gpt2 (also the loop's and generation's) and llama
    batch_size: int  # sequences per training step, halved while a step runs out of memory
    steps: int  # training steps per timed round of the model section
    rounds: int  # its timed rounds (after one warm-up round, which compiles)
    loop_steps: int  # steps of each real-loop run: the first quarter is its warm-up (compilation)
    max_docs: int | None  # stories of the TinyStories sample the loop reads
    generate_batches: tuple  # batch sizes of the generation section
    prompt_len: int
    new_tokens: int
    generate_rounds: int
    matmul_size: int  # n of the n x n x n bf16 matmul that measures the peak


GPT2_124M = {"vocab_size": 50304, "context_length": 1024, "dim": 768, "n_layers": 12, "n_heads": 12}
GPU_PLAN = GpuPlan(models={"gpt2": GPT2_124M, "llama": {**GPT2_124M, "n_kv_heads": 4}}, batch_size=64, steps=10,
                   rounds=3, loop_steps=40, max_docs=None, generate_batches=(1, 32), prompt_len=56, new_tokens=200,
                   generate_rounds=3, matmul_size=8192)
TINY = {"vocab_size": 2048, "context_length": 64, "dim": 64, "n_layers": 2, "n_heads": 4}  # 2048: the loop's tokenizer
SMOKE_PLAN = GpuPlan(models={"gpt2": TINY, "llama": {**TINY, "n_kv_heads": 2}}, batch_size=4, steps=2, rounds=1,
                     loop_steps=8, max_docs=300, generate_batches=(1, 2), prompt_len=8, new_tokens=8,
                     generate_rounds=1, matmul_size=256)
GPU_SECTIONS = ("peak", "model", "generate", "loop")
EXTRA_GPU_SECTIONS = ("profile",)  # run only when named in --only: a diagnosis, not a figure to quote
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
                ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "::mm", "addmm", "bmm")),
                ("fused (Triton)", ("triton",)))
TARGETS = {"step": 1.0, "mfu": 0.40, "loop": 0.97, "doc_masking": 0.9, "generate": 1.0}
TABLE_COLUMNS = ("section", "measurement", "figure", "reference", "ratio / MFU", "target", "pass")


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_fitting(measure, batch_size: int):
    """measure(batch_size), the batch halved after each out-of-memory error (down to 1, which must fit)."""
    while True:
        try:
            return measure(batch_size)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
        # Outside the except block: the failed attempt's traceback, and the memory its frames hold, is gone.
        batch_size //= 2
        free_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def matmul_flops_per_s(device: torch.device, n: int, sync, repeats: int = 50) -> float:
    """FLOP/s of an n x n by n x n bf16 matmul on random data (2 n^3 FLOPs each), after three warm-up ones."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def causal_flops_per_token(model: Model) -> float:
    """llm.c's count: Model.flops_per_token with attention counted causally (a query attends on average to half
    of the context, so half of the full T x T). For GPT-2 this is llm.c's 6N + 6·L·T·d but for the position
    embedding, which llm.c's N counts (0.6% of 124M)."""
    T = model.cfg.context_length
    return model.flops_per_token(T) - sum(layer.attention.flops_per_token(T) for layer in model.layers) / 2


def row(measurement: str, figure: str, reference: str, result: str, target: str, passed, note: str = "", /,
        **values) -> dict:
    """One row of the table; `values` are the measured numbers behind it (written to results.jsonl)."""
    return {"measurement": measurement, "figure": figure, "reference": reference, "result": result,
            "target": target, "passed": None if passed is None else bool(passed), "note": note,
            "values": {name: float(v) if isinstance(v, float) else v for name, v in values.items()}}


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


class Results:
    """The rows of `bench.py gpu`, kept as they come: each is appended to OUT/results.jsonl when measured and
    OUT/table.md is rewritten with the table so far, so that a run cut off by a timeout leaves what it
    measured. A measurement that raises becomes a row with its one-line error, and the next one runs."""

    def __init__(self, out: Path, header: dict, deadline: float, device: torch.device):
        self.out, self.header, self.deadline, self.device, self.rows = out, header, deadline, device, []
        (out / "results.jsonl").write_text(json.dumps({"environment": header}) + "\n")
        self.write_table()

    def run(self, section: str, measurement: str, measure):
        """Record the rows measure() returns (a list), or its error, or that the time ran out before it."""
        start = time.perf_counter()
        if start > self.deadline:
            rows = [{"measurement": measurement, "error": "not run: the time limit (--max_minutes) was reached"}]
        else:
            try:
                rows = measure()
            except Interrupted:  # Ctrl+C or a signal during a training run stops the bench, not one measurement
                raise
            except Exception as e:  # one measurement's failure (out of memory, a compile error) ends only it
                rows = [{"measurement": measurement, "error": one_line(e)}]
            free_memory(self.device)
        for r in rows:
            self.add({"section": section, **r, "seconds": round(time.perf_counter() - start, 1)})

    def add(self, r: dict):
        self.rows.append(r)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(r, default=str) + "\n")  # numbers of numpy's types too
        self.write_table()
        print(" | ".join(cell for cell in self.cells(r) if cell), flush=True)

    @staticmethod
    def cells(r: dict) -> list[str]:
        if "error" in r:
            return [r["section"], r["measurement"], f"error: {r['error']}", "", "", "", "error"]
        passed = {True: "pass", False: "FAIL", None: ""}[r["passed"]]
        figure = f"{r['figure']} ({r['note']})" if r.get("note") else r["figure"]
        return [r["section"], r["measurement"], figure, r["reference"], r["result"], r["target"], passed]

    def table(self) -> str:
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(self.cells(r)) + " |" for r in self.rows])

    def write_table(self):
        about = ", ".join(f"{key} {value}" for key, value in self.header.items())
        (self.out / "table.md").write_text(f"# bench.py gpu\n\n{about}\n\n{self.table()}\n")

    def errors(self) -> int:
        return sum("error" in r for r in self.rows)


def rate(value: float, unit: str = "FLOP/s") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


class GpuBench:
    """The measurements of `bench.py gpu`, in order. What several of them use is kept between them: the
    peaks, the batch that fitted each kind, the loop's bare-step model, the unmasked loop's tokens/s."""

    def __init__(self, plan: GpuPlan, device: torch.device, compile: bool, results: Results):
        self.plan, self.device, self.compile, self.results = plan, device, compile, results
        self.sync = device_sync(device)
        self.amp = device.type == "cuda"  # bf16 autocast where the trainer uses it (toolkit.metrics.autocast)
        self.peaks = {"spec": peak_flops(device), "measured": None}
        self.fitted = {}  # kind -> the batch size its training step ran at
        self.kept = {}

    def run_all(self, sections=GPU_SECTIONS):
        """The measurements of `sections`, cheapest and most asked for first: if time runs out, the Muon loop goes."""
        run, plan = self.results.run, self.plan
        if "peak" in sections:
            run("peak", "bf16 matmul", self.matmul_peak)
        for kind in plan.models if "model" in sections else ():
            run("model", f"{kind} step", functools.partial(self.model_step, kind))
        for batch in plan.generate_batches if "generate" in sections else ():
            run("generate", f"batch {batch}", functools.partial(self.generation, batch))
        self.kept.clear()
        for kind in plan.models if "profile" in sections else ():
            run("profile", f"{kind} kernels", functools.partial(self.profile, kind))
        if "loop" in sections:
            with scratch_space():  # the runs and the token shards of the loop
                run("loop", "adamw loop", functools.partial(self.loop, "adamw"))
                run("loop", "doc-masked loop", self.doc_masked_loop)
                run("loop", "muon loop", functools.partial(self.loop, "muon"))
            self.kept.clear()

    def matmul_peak(self):
        n, spec = self.plan.matmul_size, self.peaks["spec"]
        measured = self.peaks["measured"] = matmul_flops_per_s(self.device, n, self.sync)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "this CPU"
        return [row("bf16 matmul peak", f"{rate(measured)} measured ({n}^3, random data)",
                    f"spec sheet {rate(spec)} ({name})" if spec else f"no spec sheet peak for {name}",
                    f"{measured / spec:.0%} of spec" if spec else "", "", None, measured=measured, spec=spec)]

    def mfu_row(self, measurement: str, model: Model, tokens_per_s: float) -> dict:
        """MFU at `tokens_per_s` training tokens/s of `model`: FLOPs counted by Model.flops_per_token (the progress
        bar's count) over the spec sheet's dense bf16 peak (the measured one for a GPU not in the table); beside
        it llm.c's causal count and the measured peak."""
        spec, measured = self.peaks["spec"], self.peaks["measured"]
        peak = spec or measured
        if peak is None:
            raise RuntimeError("no bf16 peak to divide by: the GPU has no spec sheet entry and the matmul failed")
        mfu = model_flops_utilization(model, tokens_per_s, peak)
        causal = causal_flops_per_token(model) * tokens_per_s / peak
        of_measured = model_flops_utilization(model, tokens_per_s, measured) if measured else None
        beside = f"llm.c's causal count {causal:.1%}"
        if measured:
            beside += f"; {of_measured:.1%} of the measured peak"
        return row(measurement, f"{tokens_per_s:,.0f} tok/s x {model.flops_per_token() / 1e9:.3f} GFLOP/token",
                   f"{'spec sheet' if spec else 'measured'} peak {rate(peak)}", f"MFU {mfu:.1%} ({beside})",
                   f">= {TARGETS['mfu']:.0%}", mfu >= TARGETS["mfu"], mfu=mfu, causal_mfu=causal,
                   mfu_of_measured_peak=of_measured, tokens_per_s=tokens_per_s, peak=peak,
                   flops_per_token=model.flops_per_token(), causal_flops_per_token=causal_flops_per_token(model))

    def model_step(self, kind: str):
        """The project's Model against PlainGPT, compiled alike, bf16 autocast, fused AdamW, on identical shapes."""
        dims, plan = self.plan.models[kind], self.plan

        def measure(batch_size):
            return compare_steps(kind, dims, batch_size, self.device, self.amp, self.compile, plan.steps, plan.rounds,
                                 self.sync, warmup_rounds=1)
        result = largest_fitting(measure, plan.batch_size)
        batch = self.fitted[kind] = result["batch_size"]
        ratio, model = result["ratio"], result["model"]
        ours, reference = result["tokens_per_s"]["ours"], result["tokens_per_s"]["reference"]
        shape = f"batch {batch} x {dims['context_length']}, {model.n_params() / 1e6:.1f}M params"
        return [row(f"{kind} step vs PlainGPT", f"{ours:,.0f} tok/s", f"PlainGPT {reference:,.0f} tok/s",
                    f"ratio {ratio:.3f}", f">= {TARGETS['step']}", ratio >= TARGETS["step"], shape, ours=ours,
                    reference=reference, ratio=ratio, batch_size=batch),
                self.mfu_row(f"{kind} step MFU", model, ours)]

    def profile(self, kind: str):
        """Where the step's time goes, ours against PlainGPT's: per step, the wall time, the time the device spent
        in kernels (the rest is waiting on the host) and that time by kernel kind; every kernel's time goes to
        profile_KIND.md. A gap in wall time with equal kernel time points at the host (Python, guards, syncs);
        one in a kernel kind points at what the compiler made of the graph."""
        plan = self.plan
        batch = self.fitted.get(kind, plan.batch_size)
        _, steps = matching_steps(kind, plan.models[kind], batch, self.device, self.amp, self.compile)
        splits = [kernel_split(step, plan.steps, self.device, self.sync) for step in steps]
        write_kernel_table(self.results.out / f"profile_{kind}.md", kind, *splits)
        (ours, ours_kernels), (theirs, their_kernels) = splits
        kinds = sorted({kernel_kind(name) for name in {**ours_kernels, **their_kernels}})
        by_kind = {k: (sum(t for n, t in ours_kernels.items() if kernel_kind(n) == k),
                       sum(t for n, t in their_kernels.items() if kernel_kind(n) == k)) for k in kinds}
        parts = "; ".join(f"{k} {a * 1e3:.2f} vs {b * 1e3:.2f}" for k, (a, b) in by_kind.items())
        return [row(f"{kind} step, where the time goes", f"wall {ours['wall'] * 1e3:.2f} ms/step, kernels "
                    f"{ours['kernels'] * 1e3:.2f}", f"PlainGPT wall {theirs['wall'] * 1e3:.2f}, kernels "
                    f"{theirs['kernels'] * 1e3:.2f}", f"ratio {theirs['wall'] / ours['wall']:.3f}", "", None,
                    f"ms per step, ours vs PlainGPT: {parts}; batch {batch}", ours=ours, reference=theirs,
                    by_kind={k: list(v) for k, v in by_kind.items()})]

    def generation_models(self) -> tuple[Model, object]:
        """The plan's gpt2 (seed 0; in bf16 on a GPU) and transformers' model with its weights, in eval mode."""
        if "generation" not in self.kept:
            torch.manual_seed(0)
            model = Model(ModelConfig.preset(PRESET_OF_KIND["gpt2"], **self.plan.models["gpt2"])).eval()
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            hf_model = hf_twin(model, self.device, dtype)
            self.kept["generation"] = model.to(self.device, dtype), hf_model
        return self.kept["generation"]

    def generation(self, batch: int):
        """New tokens/s with the KV cache against transformers' generate on the same weights, greedy."""
        model, hf_model = self.generation_models()
        plan = self.plan
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, plan.prompt_len),
                                generator=torch.Generator().manual_seed(batch)).to(self.device)
        runs = generation_runs(model, hf_model, prompts, plan.new_tokens, uncached=False)
        outputs, seconds, speed = time_generation(runs, plan.new_tokens, plan.generate_rounds, self.sync)
        ratio = speed_ratio(seconds, "cached", "transformers")
        same = same_tokens(outputs["cached"], outputs["transformers"])
        note = (f"{plan.new_tokens} after {plan.prompt_len}-token prompts, {str(model.embed.weight.dtype)[6:]}; "
                f"{same}/{batch * plan.new_tokens} tokens equal to transformers'")
        return [row(f"gpt2 generation, batch {batch}", f"{speed['cached']:,.0f} new tok/s (KV cache)",
                    f"transformers {speed['transformers']:,.0f} new tok/s", f"ratio {ratio:.2f}",
                    f">= {TARGETS['generate']}", ratio >= TARGETS["generate"], note, cached=speed["cached"],
                    transformers=speed["transformers"], ratio=ratio, same_tokens=same, tokens=batch * plan.new_tokens)]

    def loop_configs(self, **train_overrides) -> tuple[ModelConfig, TrainConfig]:
        """The loop's model (the plan's gpt2) and a run of plan.loop_steps steps on the TinyStories sample that
        logs every quarter, at the batch the gpt2 step ran at, and neither evaluates nor saves before it stops."""
        steps = self.plan.loop_steps
        model_cfg = ModelConfig.preset(PRESET_OF_KIND["gpt2"], **self.plan.models["gpt2"])
        train_cfg = TrainConfig(name="gpu", data="tinystories-sample", tokenizer="tinystories-sample-2048",
                                max_docs=self.plan.max_docs, device=str(self.device), compile=self.compile,
                                batch_size=self.fitted.get("gpt2", self.plan.batch_size), max_steps=steps + 1,
                                log_every=steps // 4, eval_every=10 ** 9, eval_batches=1, save_every=10 ** 9,
                                **train_overrides)
        return model_cfg, train_cfg

    def real_loop(self, **train_overrides) -> float:
        """Tokens/s of toolkit.trainer.train, as train.py runs it. Its fallback to eager when torch.compile fails
        is an error here: the figure would not be the compiled loop's."""
        model_cfg, train_cfg = self.loop_configs(**train_overrides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            speed = loop_tokens_per_s(model_cfg, train_cfg, stop_at=self.plan.loop_steps)
        failed = [str(w.message) for w in caught if str(w.message).startswith("torch.compile failed")]
        if failed:
            raise RuntimeError(failed[0])
        return speed

    def bare_step(self, optimizer: str) -> float:
        """train_step's tokens/s on the loop's model (built, moved and compiled once, as train() does) with a new
        optimizer: the first quarter of plan.loop_steps warms up, as the loop's first log interval does."""
        model_cfg, train_cfg = self.loop_configs(optimizer=optimizer)
        if "bare" not in self.kept:
            torch.manual_seed(train_cfg.seed)
            model = Model(model_cfg).to(self.device)
            self.kept["bare"] = model, torch.compile(model) if self.compile else model
        steps = self.plan.loop_steps
        return bare_step_tokens_per_s(*self.kept["bare"], train_cfg, self.device, steps - steps // 4, steps // 4,
                                      self.sync)

    def loop(self, optimizer: str):
        """The real loop (token shards, schedule, logging; bf16 and compile on a GPU) against the bare step."""
        bare, loop = self.bare_step(optimizer), self.real_loop(optimizer=optimizer)
        self.kept[f"loop {optimizer}"] = loop
        ratio = loop / bare
        _, train_cfg = self.loop_configs()
        note = f"gpt2, batch {train_cfg.batch_size}{', compiled' if self.compile else ''}"
        rows = [row(f"real loop ({optimizer}) vs bare step", f"{loop:,.0f} tok/s", f"bare step {bare:,.0f} tok/s",
                    f"ratio {ratio:.3f}", f">= {TARGETS['loop']}", ratio >= TARGETS["loop"], note, loop=loop,
                    bare=bare, ratio=ratio)]
        if optimizer == "adamw":
            rows.append(self.mfu_row("real loop MFU (the progress bar's)", self.kept["bare"][0], loop))
        return rows

    def doc_masked_loop(self):
        """The loop with doc_masking (FlexAttention on a GPU) against the same loop unmasked."""
        unmasked = self.kept.get("loop adamw") or self.real_loop(optimizer="adamw")
        masked = self.real_loop(optimizer="adamw", doc_masking=True)
        ratio = masked / unmasked
        kernel = "FlexAttention" if self.device.type == "cuda" else "a dense mask (FlexAttention is for CUDA)"
        return [row("doc-masked loop vs unmasked", f"{masked:,.0f} tok/s", f"unmasked {unmasked:,.0f} tok/s",
                    f"ratio {ratio:.3f}", f">= {TARGETS['doc_masking']}", ratio >= TARGETS["doc_masking"],
                    f"doc_masking=true: {kernel}", masked=masked, unmasked=unmasked, ratio=ratio)]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def kernel_split(step, steps: int, device: torch.device, sync) -> tuple[dict, dict]:
    """({"wall", "kernels"} seconds per step, {kernel name: seconds per step}) of `steps` calls of step(), after
    two warm-up calls. The device's kernels on a GPU; on a CPU (for --smoke) the operators' own CPU time."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        step()
    sync()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - start) / steps
    kernels = {}
    for event in prof.key_averages():
        seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6 / steps
        if seconds > 0 and (cuda or event.device_type == torch.autograd.DeviceType.CPU):
            kernels[event.key] = kernels.get(event.key, 0.0) + seconds
    return {"wall": wall, "kernels": sum(kernels.values())}, kernels


def write_kernel_table(path: Path, kind: str, ours: tuple, theirs: tuple):
    """Every kernel's milliseconds per step, ours and PlainGPT's, longest first (compiled kernels are named
    by what they fuse, so a kernel that only one side has shows a fusion the other did not make)."""
    (our_total, our_kernels), (their_total, their_kernels) = ours, theirs
    names = sorted(set(our_kernels) | set(their_kernels),
                   key=lambda n: -max(our_kernels.get(n, 0.0), their_kernels.get(n, 0.0)))
    lines = [f"# {kind} step: kernels, ms per step (ours vs PlainGPT)", "",
             f"wall {our_total['wall'] * 1e3:.3f} vs {their_total['wall'] * 1e3:.3f}; "
             f"kernels {our_total['kernels'] * 1e3:.3f} vs {their_total['kernels'] * 1e3:.3f}", "",
             "| kernel | kind | ours | PlainGPT | difference |", "|---|---|---|---|---|"]
    for name in names:
        a, b = our_kernels.get(name, 0.0) * 1e3, their_kernels.get(name, 0.0) * 1e3
        lines.append(f"| `{name[:120]}` | {kernel_kind(name)} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    path.write_text("\n".join(lines) + "\n")


def configure_compile():
    """One process compiles many models: room for all of them in dynamo's cache (past its limit they would run
    eager, silently), and a static graph for each batch size tried (no automatically dynamic shapes)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    config.automatic_dynamic_shapes = False


def gpu_sections(text: str) -> tuple:
    sections = tuple(part.strip() for part in text.split(","))
    unknown = [s for s in sections if s not in GPU_SECTIONS + EXTRA_GPU_SECTIONS]
    if unknown or not sections:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: give sections among "
                                         f"{','.join(GPU_SECTIONS + EXTRA_GPU_SECTIONS)}, "
                                         f"comma-separated")
    return sections


def environment(device: torch.device, smoke: bool, compile: bool, batch_size: int) -> dict:
    """What the figures were measured on, for the head of the table."""
    import transformers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    return {"device": name, "torch": torch.__version__, "CUDA": torch.version.cuda,
            "transformers": transformers.__version__, "sizes": "smoke" if smoke else "full",
            "compile": compile, "batch": batch_size, "date": time.strftime("%Y-%m-%d %H:%M")}


def bench_gpu(args):
    """The GPU issue's figures on one CUDA machine, in about six minutes with compilation: a bf16 matmul's measured
    peak; the training step of GPT-2 124M and a Llama of its size (GQA 12/4) against PlainGPT, compiled alike,
    bf16, fused AdamW, with MFU; the real loop (token shards, bf16, compile, AdamW, Muon, document masking)
    against the bare step; KV-cache generation against transformers' generate. Every row goes to --out as it
    is measured (results.jsonl, table.md); a measurement that fails is recorded with its error and the next one
    runs. --smoke: tiny sizes and few steps, the whole section's logic in seconds, also on a CPU."""
    parser = argparse.ArgumentParser(prog="bench.py gpu", description=bench_gpu.__doc__)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu only with --smoke")
    parser.add_argument("--out", default="bench_gpu", help="folder for results.jsonl and table.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps: checks the logic, not speed")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile every trained model (default: on CUDA)")
    parser.add_argument("--batch_size", type=int, help=f"training batch to start from, halved on out-of-memory "
                        f"(default {GPU_PLAN.batch_size}, with --smoke {SMOKE_PLAN.batch_size})")
    parser.add_argument("--only", type=gpu_sections, default=GPU_SECTIONS,
                        help=f"comma-separated sections to run (default: {','.join(GPU_SECTIONS)}; 'profile' "
                        f"splits each kind's step against PlainGPT's by kernel kind, into profile_KIND.md)")
    parser.add_argument("--max_minutes", type=float, default=5.5,
                        help="measurements not started by then are recorded as not run, and the table is printed")
    o = parser.parse_args(args)
    device = torch.device(o.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: run it on a GPU machine, or check its logic with --device=cpu --smoke")
    if device.type != "cuda" and not o.smoke:
        parser.error(f"--device={o.device} runs only with --smoke: the issue's sizes need a GPU")
    if o.batch_size is not None and o.batch_size < 1:
        parser.error(f"--batch_size={o.batch_size} is not valid: must be a positive integer")
    plan = SMOKE_PLAN if o.smoke else GPU_PLAN
    plan = dataclasses.replace(plan, batch_size=o.batch_size or plan.batch_size)
    compile = device.type == "cuda" if o.compile is None else o.compile
    out = Path(o.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        results = Results(out, environment(device, o.smoke, compile, plan.batch_size),
                          time.perf_counter() + 60 * o.max_minutes, device)
    except OSError as e:
        parser.error(f"--out={o.out} cannot be written ({e.strerror or e}): choose another folder")
    if compile:
        configure_compile()
    GpuBench(plan, device, compile, results).run_all(o.only)
    print(f"\n{results.table()}\n\nwritten to {out / 'table.md'} and {out / 'results.jsonl'}")
    if results.errors():
        sys.exit(f"error: {results.errors()} of {len(results.rows)} measurements failed or did not run: see the table")
# --- end GPU benchmark ---


BENCHMARKS = {"model": bench_model, "loop": bench_loop, "tokenizer": bench_tokenizer, "generate": bench_generate,
              "optim": bench_optim, "gpu": bench_gpu}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the section's own options (SECTION --help)")
    args = parser.parse_args(argv)
    try:
        BENCHMARKS[args.benchmark](args.options)
    except (ConfigError, DataError, TokenizerError, TrainError) as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        sys.exit(f"stopped: {e}")


if __name__ == "__main__":
    main()
