"""The project's benchmarks. Each prints figures measured against a reference in the same run.

    python bench.py model       # training step of the project's Model against PlainGPT, this file's plain reference
    python bench.py loop        # the real training loop (data, logging) against the bare training step
    python bench.py tokenizer   # encoding MB/s and family training time, on the embedded TinyStories sample
    python bench.py generate    # new tokens/s: KV cache, no cache, transformers' generate
    python bench.py optim       # a training step with each optimizer (Muon, ...) against one with AdamW

`python bench.py SECTION --help` lists a section's options.
"""
import argparse
import functools
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError, ModelConfig, TrainConfig
from modules.model import Model
from toolkit.data import DataError, read_documents
from toolkit.optim import OPTIMIZERS, make_optimizer
from toolkit.tokenizer import TokenizerError
from toolkit.trainer import TrainError

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
    architecture, each built from seed 0. Equal parameter counts are checked: unequal ones would make
    a speed ratio meaningless."""
    cfg = ModelConfig.preset(PRESET_OF_KIND[kind], **dims)
    torch.manual_seed(0)
    ours = Model(cfg)
    torch.manual_seed(0)
    reference = PlainGPT(kind, cfg.vocab_size, cfg.context_length, cfg.dim, cfg.n_layers, cfg.n_heads,
                         cfg.n_kv_heads, cfg.mlp_hidden)
    counts = [sum(p.numel() for p in model.parameters()) for model in (ours, reference)]
    if counts[0] != counts[1]:
        raise RuntimeError(f"{kind}: the project's Model has {counts[0]} parameters, PlainGPT {counts[1]}")
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
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    generator = torch.Generator().manual_seed(0)
    input_ids, targets = torch.randint(0, o.vocab_size, (2, o.batch_size, o.context_length),
                                       generator=generator).to(device)
    dims = {kind: {"vocab_size": o.vocab_size, "context_length": o.context_length, "dim": o.dim, "n_layers": o.n_layers,
                   "n_heads": o.n_heads, "n_kv_heads": o.n_kv_heads if kind == "llama" else o.n_heads}
            for kind in o.kinds}
    for kind in o.kinds:  # bad dims fail now, not after minutes of timing
        ModelConfig.preset(PRESET_OF_KIND[kind], **dims[kind])
    print(f"{device.type} {'bf16 autocast' if o.amp else 'float32'}{', compiled' if o.compile else ''}: batch "
          f"{o.batch_size} x {o.context_length}, {o.n_layers} layers, {o.dim} dims, {o.n_heads} heads, vocab "
          f"{o.vocab_size}; median of {o.rounds} rounds of {o.steps} steps, {torch.get_num_threads()} threads")
    for kind in o.kinds:
        models = [model.to(device).train() for model in matching_models(kind, **dims[kind])]
        n_params = sum(p.numel() for p in models[0].parameters())
        if o.compile:
            models = [torch.compile(model) for model in models]
        steps = [make_step(model, input_ids, targets, o.amp) for model in models]

        def run(step):
            return lambda: [step() for _ in range(o.steps)]
        runs = {"ours": run(steps[0]), "reference": run(steps[1])}
        interleaved_seconds(runs, rounds=2, sync=sync)  # warm-up (and compilation)
        seconds = interleaved_seconds(runs, o.rounds, sync)
        speed = {name: o.steps * o.batch_size * o.context_length / statistics.median(s) for name, s in seconds.items()}
        kv = f"{dims[kind]['n_kv_heads']} KV heads" if kind == "llama" else "MHA"
        print(f"{kind:5s} ({n_params / 1e6:.2f}M params, {kv:10s}) ours {speed['ours']:>9.1f} tok/s  reference "
              f"{speed['reference']:>9.1f} tok/s  ratio {speed_ratio(seconds, 'ours', 'reference'):.3f} "
              f"(target >= 0.97)")


def bench_loop(args):
    """Tokens/s of the real training loop (batches from the token shards, schedule, logging) against the
    bare step (toolkit.trainer.train_step on one fixed batch), same model and shapes, alternating. Both
    count the wall time of all steps after the first log interval (warm-up), evaluation and saving excluded.
    The data is the embedded TinyStories sample."""
    import pandas as pd

    from toolkit import checkpoint, data
    from toolkit.trainer import Distributed, train, train_step

    parser = argparse.ArgumentParser(prog="bench.py loop", description=bench_loop.__doc__)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--context_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args(args)
    if a.steps < 4:
        parser.error("--steps must be at least 4 (the first quarter is the warm-up)")
    scratch = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    # Runs and token shards go to scratch space, not into the repository's trained/ and data_cache/.
    checkpoint.TRAINED, data.CACHE = scratch / "trained", scratch / "data_cache"
    model_cfg = ModelConfig.preset("llama3-1m", context_length=a.context_length)
    log_every = a.steps // 4
    train_cfg = TrainConfig(name="bench", data="tinystories-sample", tokenizer="tinystories-sample-2048", device="cpu",
                            batch_size=a.batch_size, max_steps=a.steps, log_every=log_every,
                            eval_every=10 ** 9, eval_batches=1, save_every=10 ** 9)
    tokens_per_step = a.batch_size * a.context_length

    def bare_tokens_per_s():
        torch.manual_seed(train_cfg.seed)
        model = Model(model_cfg)
        optimizer = make_optimizer(model, train_cfg, torch.device("cpu"))
        ids = torch.randint(0, model_cfg.vocab_size, (a.batch_size, a.context_length + 1))
        batch = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]
        for step in range(a.steps):
            if step == log_every:  # the loop's first log interval is its warm-up, so it is left out here too
                start = time.perf_counter()
            train_step(model, optimizer, batch, train_cfg, Distributed(), torch.device("cpu"), train_cfg.lr)
        return tokens_per_step * (a.steps - log_every) / (time.perf_counter() - start)

    def loop_tokens_per_s():
        out = train(model_cfg, train_cfg, overwrite=True, progress_bar=False)
        intervals = pd.read_csv(out / "log_data.csv").iloc[1:]  # each row: tokens/s over its interval
        return (tokens_per_step * log_every * len(intervals)
                / (log_every * tokens_per_step / intervals["tokens_per_s"]).sum())

    try:
        loop_tokens_per_s()  # builds the token cache once, outside the timing
        ratios = []
        for _ in range(a.rounds):
            bare, loop = bare_tokens_per_s(), loop_tokens_per_s()
            ratios.append(loop / bare)
            print(f"bare step {bare:9.1f} tok/s   real loop {loop:9.1f} tok/s   ratio {loop / bare:.3f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
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


def bench_generate(args):
    """New tokens per second of toolkit.generate with and without the KV cache, and of transformers'
    generate on the same weights (exported with tools.export_hf): greedy, every run exactly
    --new_tokens tokens after a --prompt_len token prompt, at each batch size, alternating runs, medians."""
    import transformers

    import tools
    from toolkit.generate import GenerationSettings, generate

    parser = argparse.ArgumentParser(prog="bench.py generate", description=bench_generate.__doc__)
    parser.add_argument("--preset", default="llama3-1m")
    parser.add_argument("--prompt_len", type=int, default=56)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--batches", type=batch_sizes, default=[1, 8], help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each; the median counts")
    options = parser.parse_args(args)
    torch.manual_seed(0)
    model = Model(ModelConfig.preset(options.preset)).eval()  # random weights run as fast as trained ones
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as directory:
        tools.export_hf(model, directory)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    settings = GenerationSettings(temp=0, max_len=options.new_tokens)

    def ours(prompts, use_cache):
        return generate(model, prompts.tolist(), settings, eos_id=None, use_cache=use_cache)

    def theirs(prompts):
        with torch.inference_mode():
            out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                    max_new_tokens=options.new_tokens, min_new_tokens=options.new_tokens,
                                    pad_token_id=0)
        return out[:, prompts.shape[1]:].tolist()

    print(f"{options.preset} ({model.n_params() / 1e6:.2f}M parameters), {options.prompt_len}-token prompts, "
          f"{options.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, median of {options.rounds} "
          f"runs; transformers {transformers.__version__} ({hf_model.config._attn_implementation} attention)")
    print(f"{'batch':>5} {'cached':>9} {'uncached':>9} {'transformers':>12}   {'cache/no cache':>18}   "
          f"{'ours/transformers':>17}   same tokens as transformers")
    for batch in options.batches:
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, options.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        runs = {"cached": functools.partial(ours, prompts, True), "uncached": functools.partial(ours, prompts, False),
                "transformers": functools.partial(theirs, prompts)}
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and the tokens to compare
        assert outputs["cached"] == outputs["uncached"]
        same = sum(a == b for x, y in zip(outputs["cached"], outputs["transformers"]) for a, b in zip(x, y))
        seconds = interleaved_seconds(runs, options.rounds)
        speed = {name: batch * options.new_tokens / statistics.median(s) for name, s in seconds.items()}
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


BENCHMARKS = {"model": bench_model, "loop": bench_loop, "tokenizer": bench_tokenizer, "generate": bench_generate,
              "optim": bench_optim}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the section's own options (SECTION --help)")
    args = parser.parse_args(argv)
    try:
        BENCHMARKS[args.benchmark](args.options)
    except (ConfigError, DataError, TokenizerError, TrainError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
