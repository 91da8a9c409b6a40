"""Put models side by side, fairly across tokenizers.

    python model_comparison.py GPT2_1m_atto Llama3_1m_atto --data=../shared/data/tinystories/tinystories_extra_2.txt --out=comparison

For each model (a trained/ name or folder, or a Hugging Face GPT-2/Llama id): its size, tokenizer,
what its training log says (tokens seen, time, final losses), and, measured now on the same raw
text for every model (each with its own tokenizer, in eval mode, over the whole text): loss per
token, bits per byte (the figure that does not depend on the tokenizer) and top-1/5/10 accuracy.
Writes to --out: comparison.md and comparison.csv (the table and samples), loss_vs_step.png,
loss_vs_tokens.png, loss_vs_time.png and bits_per_byte.png. The functions serve
model_comparison.ipynb too.
"""
import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

import tools
from toolkit import checkpoint
from toolkit.data import DataError, read_documents
from toolkit.generate import GenerationError, GenerationSettings, generate
from toolkit.metrics import score, text_batches, token_byte_lengths
from toolkit.trainer import LOG

PROMPTS = ["Once upon a time, there was a little", "The dog wanted to"]
X_AXES = {"step": "optimizer step", "tokens_seen": "tokens seen", "elapsed_s": "training time (s)"}


def load_models(names: list[str], device="cpu") -> dict:
    """{name: (model, tokenizer)}; a model without a tokenizer cannot be compared on text."""
    models = {}
    for name in names:
        model, tokenizer = tools.load_model(name, device)
        if tokenizer is None:
            raise tools.no_tokenizer_error(name)
        models[name] = (model, tokenizer)
    return models


def training_log(name: str) -> pd.DataFrame | None:
    """The model's log_data.csv, if it was trained here."""
    for folder in (checkpoint.TRAINED / name, Path(name)):
        if (folder / LOG).is_file():
            return pd.read_csv(folder / LOG)
    return None


def evaluate_text(model, tokenizer, documents: list[str], device="cpu", batch_size: int = 16) -> dict:
    """Loss per token, bits per byte and top-k accuracy of every token of the documents."""
    batches = text_batches(tokenizer, documents, model.cfg.context_length, batch_size)
    scores = score(model, batches, token_byte_lengths(tokenizer, model.cfg.vocab_size), device, top_k=(1, 5, 10))
    return {"loss_per_token": scores.loss, "bits_per_byte": scores.bits_per_byte, "top1": scores.accuracy(1),
            "top5": scores.accuracy(5), "top10": scores.accuracy(10), "text_tokens": scores.tokens,
            "text_bytes": scores.bytes}


def compare(models: dict, documents: list[str], device="cpu") -> pd.DataFrame:
    """One row per model: what it is, what its log says, and how it scores on the documents."""
    rows = []
    for name, (model, tokenizer) in models.items():
        row = {"model": name, "params": model.n_params(), "params_without_embeddings": model.n_params(embeddings=False),
               "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size}
        log = training_log(name)
        if log is not None:
            val = log.dropna(subset=["val_loss"])
            row.update(tokens_trained=int(log["tokens_seen"].iloc[-1]), training_time_s=float(log["elapsed_s"].iloc[-1]),
                       final_train_loss=float(log["train_loss"].iloc[-1]),
                       final_val_loss=float(val["val_loss"].iloc[-1]) if len(val) else None)
        rows.append({**row, **evaluate_text(model, tokenizer, documents, device)})
    return pd.DataFrame(rows)


def plot_losses(names: list[str], x: str = "step", log_axes: bool = False):
    """Train (solid) and validation (dashed) loss of each model against step, tokens_seen or elapsed_s."""
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for k, name in enumerate(names):
        log = training_log(name)
        if log is None:
            continue
        colour = f"C{k}"
        axes.plot(log[x], log["train_loss"], color=colour, label=f"{name} train")
        val = log.dropna(subset=["val_loss"])
        axes.plot(val[x], val["val_loss"], "--o", color=colour, markersize=3, label=f"{name} validation")
    axes.set(xlabel=X_AXES[x], ylabel="loss per token (nats)", title=f"loss against {X_AXES[x]}")
    if log_axes:
        axes.set_xscale("log")
        axes.set_yscale("log")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_bits_per_byte(table: pd.DataFrame):
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(table)), 4))
    bars = axes.bar(table["model"], table["bits_per_byte"], color=[f"C{k}" for k in range(len(table))])
    axes.bar_label(bars, fmt="%.3f")
    axes.set(ylabel="bits per byte (lower is better)", title="bits per byte on the same text")
    figure.tight_layout()
    return figure


def samples(models: dict, prompts: list[str], settings: GenerationSettings) -> dict:
    """{prompt: {model: continuation}}: every model continues the same prompts with the same seed."""
    out = {prompt: {} for prompt in prompts}
    for name, (model, tokenizer) in models.items():
        new_ids = generate(model, tokenizer.encode(prompts, bos=True), settings, eos_id=tokenizer.eos_id)
        for prompt, text in zip(prompts, tokenizer.decode(new_ids)):
            out[prompt][name] = text
    return out


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.astype(object).itertuples(index=False)]
    return "\n".join(lines)


def write_report(table: pd.DataFrame, generations: dict, out: Path, source: str, log_axes: bool = False) -> list[Path]:
    """The table (markdown and CSV), the plots (PNG) and the samples into `out`; returns the files."""
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    files = [out / "comparison.csv", out / "comparison.md"]
    names = list(table["model"])
    figures = {f"loss_vs_{name}.png": plot_losses(names, x, log_axes)
               for name, x in (("step", "step"), ("tokens", "tokens_seen"), ("time", "elapsed_s"))}
    figures["bits_per_byte.png"] = plot_bits_per_byte(table)
    for filename, figure in figures.items():
        figure.savefig(out / filename, dpi=110)
        plt.close(figure)
        files.append(out / filename)
    text = [f"# Model comparison\n\nMeasured on `{source}` ({int(table['text_bytes'].iloc[0]):,} UTF-8 bytes), "
            f"each model with its own tokenizer, in eval mode.\n", markdown_table(table), ""]
    text += [f"![{name}]({name})" for name in figures]
    text.append("\n## Samples (same prompts, same seed)\n")
    for prompt, by_model in generations.items():
        text.append(f"### {prompt!r}\n")
        text += [f"- **{name}**: {prompt}{continuation}" for name, continuation in by_model.items()]
        text.append("")
    (out / "comparison.md").write_text("\n".join(text))
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="trained/ names or folders, or Hugging Face GPT-2/Llama ids")
    parser.add_argument("--data", required=True, help="the held-out text: a txt/jsonl/parquet file (or folder, glob)")
    parser.add_argument("--out", default="comparison", help="folder for the table, plots and samples")
    parser.add_argument("--prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--max_len", type=int, default=60, help="new tokens per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log_axes", action="store_true", help="logarithmic axes for the loss plots")
    args = parser.parse_args(argv)
    try:
        documents = list(read_documents(args.data))
        models = load_models(args.models, args.device)
        table = compare(models, documents, args.device)
        settings = GenerationSettings(temp=0.7, min_p=0.05, max_len=args.max_len, seed=args.seed)
        files = write_report(table, samples(models, args.prompts, settings), Path(args.out), args.data, args.log_axes)
    except (tools.LoadError, DataError, GenerationError, tools.TokenizerError) as e:
        sys.exit(f"error: {e}")
    columns = ["model", "params", "tokenizer", "loss_per_token", "bits_per_byte", "top1", "top5", "top10"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
