"""The project's benchmarks. Each prints figures measured against a reference in the same run.

    python bench.py model       # training step against ../shared/bench's plain GPT (see build_for_reference)
    python bench.py loop        # the real training loop (data, logging) against the bare training step
    python bench.py tokenizer   # encoding MB/s and family training time
    python bench.py generate    # new tokens/s: KV cache, no cache, transformers' generate
    python ../shared/bench/train_step_bench.py --candidate bench:build_for_reference --kind gpt2
"""
import argparse
import sys
from pathlib import Path


def build_for_reference(kind, vocab_size, block_size, n_layer, n_head, n_kv_head, n_embd, mlp_hidden):
    """The project's Model with the same architecture as ../shared/bench/reference_gpt.py for these
    dims: the gpt2-1m or llama3-1m preset resized (the reference uses default norm epsilons)."""
    from config import ModelConfig
    from modules.model import Model
    preset = {"gpt2": "gpt2-1m", "llama": "llama3-1m"}[kind]
    eps = 1e-5 if kind == "gpt2" else 1e-6
    return Model(ModelConfig.preset(preset, vocab_size=vocab_size, context_length=block_size, n_layers=n_layer,
                                    n_heads=n_head, n_kv_heads=n_kv_head, dim=n_embd, mlp_hidden=mlp_hidden,
                                    norm_eps=eps))


# --- tokenizer benchmark ---
def bench_tokenizer(args):
    """Encoding MB/s of the batch API on 2 MB of TinyStories stories for every size of the shipped tinystories
    family, and the time to train the 8192 family (all sizes) on all TinyStories text in ../shared/data."""
    import os
    import tempfile
    import time
    import timeit

    from toolkit.tokenizer import N_THREADS, load_tokenizer
    from toolkit.tokenizer_training import DEFAULT_SIZES, read_sources, train_family

    parser = argparse.ArgumentParser(prog="bench.py tokenizer")
    parser.add_argument("--mb", type=float, default=2.0, help="megabytes of text to encode")
    parser.add_argument("--repeats", type=int, default=3, help="encoding runs per size; the fastest counts")
    options = parser.parse_args(args)
    data_dir = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parent.parent / "shared" / "data"))
    if not (data_dir / "tinystories").is_dir():
        sys.exit(f"error: no TinyStories text in {data_dir}; set SHARED_DATA to the shared data folder")
    stories = sorted((data_dir / "tinystories").glob("*.txt"))
    documents, _ = read_sources(stories, verbose=False)

    texts, n_bytes = [], 0
    for doc in documents:
        if n_bytes >= options.mb * 1e6:
            break
        texts.append(doc)
        n_bytes += len(doc.encode())
    print(f"encoding {n_bytes / 1e6:.2f} MB ({len(texts)} stories) with the batch API, {N_THREADS} threads, "
          f"best of {options.repeats}")
    for size in DEFAULT_SIZES:
        tokenizer = load_tokenizer(f"tinystories-{size}")
        seconds = min(timeit.repeat(lambda: tokenizer.encode(texts), number=1, repeat=options.repeats))
        print(f"  tinystories-{size:<5} {n_bytes / 1e6 / seconds:6.1f} MB/s")

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        documents, _ = read_sources(stories, verbose=False)
        family = train_family(documents, DEFAULT_SIZES, out_dir, verbose=False)
        total = time.perf_counter() - start
    print(f"training the {DEFAULT_SIZES[-1]} family on {len(stories)} TinyStories files "
          f"({family['training_bytes'] / 1e6:.1f} MB, {family['training_documents']} stories): sentencepiece "
          f"{family['training_seconds']:.1f} s, {total:.1f} s in all (reading, training, checking every size, writing)")
# --- end tokenizer benchmark ---


# --- generation benchmark ---
def bench_generate(args):
    """New tokens per second of toolkit.generate with and without the KV cache, and of transformers'
    generate on the same weights (exported with tools.export_hf): greedy, every run exactly
    --new_tokens tokens after a --prompt_len token prompt, at batch 1 and 8, alternating runs, medians."""
    import statistics
    import tempfile
    import time

    import torch
    import transformers

    import tools
    from config import ModelConfig
    from modules.model import Model
    from toolkit.generate import GenerationSettings, generate

    parser = argparse.ArgumentParser(prog="bench.py generate")
    parser.add_argument("--preset", default="llama3-1m")
    parser.add_argument("--prompt_len", type=int, default=56)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
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
    for batch in map(int, options.batches.split(",")):
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, options.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        runs = {"cached": lambda: ours(prompts, True), "uncached": lambda: ours(prompts, False),
                "transformers": lambda: theirs(prompts)}
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and the tokens to compare
        assert outputs["cached"] == outputs["uncached"]
        same = sum(a == b for x, y in zip(outputs["cached"], outputs["transformers"]) for a, b in zip(x, y))
        seconds = {name: [] for name in runs}
        for _ in range(options.rounds):  # interleaved, so that machine noise hits all alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        speed = {name: batch * options.new_tokens / statistics.median(s) for name, s in seconds.items()}

        def speedup(name):  # median over rounds of the per-round ratio: robust to the machine's drift
            return statistics.median(t / c for t, c in zip(seconds[name], seconds["cached"]))

        cache_target = 3 if batch == 1 else 6
        print(f"{batch:>5} {speed['cached']:>9.0f} {speed['uncached']:>9.0f} {speed['transformers']:>12.0f}   "
              f"{speedup('uncached'):>8.1f}x (>= {cache_target}x)   "
              f"{speedup('transformers'):>7.2f}x (>= 1x)   {same}/{batch * options.new_tokens}")
    print("(new tokens/s, medians; ratios: medians of per-round ratios; greedy argmax may differ from "
          "transformers' only on float near-ties)")
# --- end generation benchmark ---


# --- training benchmarks ---
def bench_model(args):
    """The training step against ../shared/bench's plain reference GPT, both kinds, CPU float32."""
    import json
    import subprocess
    reference = Path(__file__).resolve().parent.parent / "shared" / "bench" / "train_step_bench.py"
    for kind in (["--kind", "gpt2"], ["--kind", "llama", "--n_kv_head", "2"]):
        done = subprocess.run([sys.executable, str(reference), "--candidate", "bench:build_for_reference", *kind, *args],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.splitlines()[-1])
        print(f"{kind[1]:5s} ours {result['candidate_tokens_per_s']:>9.1f} tok/s  reference "
              f"{result['reference_tokens_per_s']:>9.1f} tok/s  ratio {result['ratio']:.3f} (target >= 0.97)")


def bench_loop(args):
    """Tokens/s of the real training loop (batches from the token shards, schedule, logging) against the
    bare step (toolkit.trainer.train_step on one fixed batch), same model and shapes, alternating. Both
    count the wall time of all steps after the first log interval (warm-up), evaluation and saving excluded."""
    import statistics
    import tempfile
    import time

    import pandas as pd
    import torch

    from config import ModelConfig, TrainConfig
    from modules.model import Model
    from toolkit import checkpoint
    from toolkit.trainer import Distributed, make_optimizer, train, train_step

    parser = argparse.ArgumentParser(prog="bench.py loop")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "shared" / "data" / "tinystories"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--context_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args(args)
    model_cfg = ModelConfig.preset("llama3-1m", context_length=a.context_length)
    checkpoint.TRAINED = Path(tempfile.mkdtemp())
    log_every = a.steps // 4
    train_cfg = TrainConfig(name="bench", data=a.data, tokenizer="tinystories-2048", device="cpu",
                            batch_size=a.batch_size, max_steps=a.steps, log_every=log_every,
                            eval_every=10 ** 9, eval_batches=1, save_every=10 ** 9)
    tokens_per_step = a.batch_size * a.context_length
    device = torch.device("cpu")

    def bare_tokens_per_s():
        torch.manual_seed(train_cfg.seed)
        model = Model(model_cfg)
        optimizer = make_optimizer(model, train_cfg, device)
        ids = torch.randint(0, model_cfg.vocab_size, (a.batch_size, a.context_length + 1))
        batch = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]
        for step in range(a.steps):
            if step == log_every:  # the loop's first log interval is its warm-up, so it is left out here too
                start = time.perf_counter()
            train_step(model, optimizer, batch, train_cfg, Distributed(), device, train_cfg.lr)
        return tokens_per_step * (a.steps - log_every) / (time.perf_counter() - start)

    def loop_tokens_per_s():
        out = train(model_cfg, train_cfg, overwrite=True, progress_bar=False)
        intervals = pd.read_csv(out / "log_data.csv").iloc[1:]  # each row: tokens/s over its interval
        return tokens_per_step * log_every * len(intervals) / (log_every * tokens_per_step / intervals["tokens_per_s"]).sum()

    loop_tokens_per_s()  # builds the token cache once, outside the timing
    ratios = []
    for _ in range(a.rounds):
        bare, loop = bare_tokens_per_s(), loop_tokens_per_s()
        ratios.append(loop / bare)
        print(f"bare step {bare:9.1f} tok/s   real loop {loop:9.1f} tok/s   ratio {loop / bare:.3f}")
    print(f"median ratio {statistics.median(ratios):.3f} (target >= 0.97); batch {a.batch_size} x "
          f"{a.context_length}, llama3-1m, {torch.get_num_threads()} threads")
# --- end training benchmarks ---


BENCHMARKS = {"model": bench_model, "loop": bench_loop, "tokenizer": bench_tokenizer, "generate": bench_generate}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    args, rest = parser.parse_known_args()
    BENCHMARKS[args.benchmark](rest)


if __name__ == "__main__":
    sys.exit(main())
