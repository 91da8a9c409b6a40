"""Put models side by side, fairly across tokenizers.

    python model_comparison.py GPT2_1m_atto Llama3_1m_atto --out=comparison   # on the shipped held-out stories
    python model_comparison.py GPT2_1m_atto Llama3_1m_atto --data=my_text.txt

For each model (a trained/ name or folder, or a Hugging Face GPT-2/Llama id): its size, tokenizer,
what its training log says (tokens seen, time, final losses), and, measured now on the same raw
text for every model (each with its own tokenizer, in eval mode, over the whole text, in sliding
windows where a document is longer than the context): loss per token, bits per byte (the figure
that does not depend on the tokenizer) and top-1/5/10 accuracy. Writes to --out: comparison.md and
comparison.csv (the table and samples), curves_vs_step.png, curves_vs_tokens.png and
curves_vs_time.png (validation bits per byte, and loss per token, from the training logs) and
bits_per_byte.png. A model that fails (cannot load, wrong tokenizer, scoring error) is named in a
one-line error; the others are still compared and written. The functions serve
model_comparison.ipynb too.
"""
import math
import sys
import textwrap
from pathlib import Path

import pandas as pd
import torch

import tools
from toolkit import checkpoint
from toolkit.checkpoint import TRAIN_CONFIG, read_json
from toolkit.cli import Parser, protect_output
from toolkit.data import read_documents
from toolkit.generate import GenerationSettings, generate
from toolkit.metrics import score, text_batches, token_byte_lengths
from toolkit.trainer import LOG

PROMPTS = ["Once upon a time, there was a little", "The dog wanted to"]
X_AXES = {"step": "optimizer step", "tokens_seen": "tokens seen", "elapsed_s": "training time (s)"}
PLOTS = {"step": "step", "tokens": "tokens_seen", "time": "elapsed_s"}  # curves_vs_<name>.png: x column


class ComparisonError(ValueError):
    """A comparison that cannot start (nowhere to write, no text); one line that says what to do."""


# ---------------------------------------------------------------- inputs

def read_text(spec: str) -> list[str]:
    """The documents of the held-out text, read by toolkit.data; a text with nothing to score is an error."""
    documents = list(read_documents(spec))
    if not any(document.strip() for document in documents):
        raise ComparisonError(f"--data={spec} holds no text to score: give a file with some text in it")
    return documents


def writable_folder(out: str) -> Path:
    """The output folder, created and checked for writing before any work is done."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ComparisonError(f"cannot write to --out={out} ({e.strerror or e}): "
                              f"choose a folder you can write to") from None
    return folder


def data_name(spec: str) -> str:
    """A data source as a plot can show it: the file names of local paths, other names as given."""
    return ", ".join(Path(part).name if "/" in part or "\\" in part else part for part in spec.split(","))


def attempt(failures: dict | None, name: str, what: str, work, *args):
    """work(*args), or None after recording why it failed for model `name` in `failures` (None:
    let the error through). Any exception counts: one model's failure must not lose the others'
    results, and the message names the model and the error."""
    if failures is None:
        return work(*args)
    try:
        return work(*args)
    except Exception as e:  # noqa: BLE001 (see the docstring)
        line = next(iter(str(e).strip().splitlines()), "")
        if not isinstance(e, ValueError):  # not one of the project's one-line errors: say what kind it is
            line = f"{type(e).__name__}: {line}".removesuffix(": ")
        failures[name] = f"{name}: {what} failed: {line}"
        return None


def load_one(name: str, device="cpu"):
    """(model, tokenizer): a model without a tokenizer, or with ids beyond its vocabulary, cannot read text."""
    model, tokenizer = tools.load_model(name, device)
    if tokenizer is None:
        raise tools.no_tokenizer_error(name)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise tools.TokenizerError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's "
                                   f"vocab_size is {model.cfg.vocab_size}: "
                                   f"its train_config.json names the wrong tokenizer")
    return model, tokenizer


def load_models(names: list[str], device="cpu", failures: dict | None = None) -> dict:
    """{name: (model, tokenizer)} of the models that load (failures: see `attempt`)."""
    models = {name: attempt(failures, name, "loading", load_one, name, device) for name in names}
    return {name: loaded for name, loaded in models.items() if loaded is not None}


def training_log(name: str) -> pd.DataFrame | None:
    """The model's log_data.csv, if it was trained here."""
    folder = run_folder(name)
    return pd.read_csv(folder / LOG) if folder is not None and (folder / LOG).is_file() else None


def run_folder(name: str) -> Path | None:
    """The folder of a model trained here (a trained/ name or a path), or None."""
    for folder in (checkpoint.TRAINED / name, Path(name)):
        if (folder / LOG).is_file() or (folder / TRAIN_CONFIG).is_file():
            return folder
    return None


def experiment_verdict(name: str) -> tuple[pd.DataFrame, list[Path]]:
    """An experiment's verdict as experiment.py wrote it under trained/NAME/: the per-variant table of
    report.csv (held-out bits per byte over seeds, difference from the baseline, p-values, call) and
    its plots, the difference chart first."""
    folder = checkpoint.TRAINED / name
    if not (folder / "report.csv").is_file():
        raise FileNotFoundError(f"trained/{name} has no report.csv: run `python experiment.py FILE` (or --report) "
                                f"for that experiment first")
    table = pd.read_csv(folder / "report.csv", keep_default_na=False, na_values=[""])
    columns = ["size", "variant", "lr", "seeds", "params", "tokens", "bpb_mean", "bpb_std", "diff_mean",
               "diff_ci_low", "diff_ci_high", "p", "p_holm", "call"]
    table = table[[c for c in columns if c in table]]
    if "size" in table and table["size"].isna().all():
        table = table.drop(columns="size")  # a study at one size
    plots = sorted(folder.glob("*.png"), key=lambda p: (p.name != "difference.png", p.name))
    return table, plots


# ---------------------------------------------------------------- measuring

def evaluate_text(model, tokenizer, documents: list[str], device="cpu", batch_size: int = 16) -> dict:
    """Loss per token, bits per byte and top-k accuracy of every token of the documents."""
    batches = text_batches(tokenizer, documents, model.cfg.context_length, batch_size)
    scores = score(model, batches, token_byte_lengths(tokenizer, model.cfg.vocab_size), device, top_k=(1, 5, 10))
    return {"loss_per_token": scores.loss, "bits_per_byte": scores.bits_per_byte, "top1": scores.accuracy(1),
            "top5": scores.accuracy(5), "top10": scores.accuracy(10), "text_tokens": scores.tokens,
            "text_bytes": scores.bytes}


def model_row(name: str, model, tokenizer, documents: list[str], device="cpu") -> dict:
    """What the model is, what its log says, and how it scores on the documents."""
    row = {"model": name, "params": model.n_params(), "params_without_embeddings": model.n_params(embeddings=False),
           "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "context_length": model.cfg.context_length}
    log = training_log(name)
    if log is not None:
        val = log.dropna(subset=["val_loss"])
        row.update(tokens_trained=int(log["tokens_seen"].iloc[-1]), training_time_s=float(log["elapsed_s"].iloc[-1]),
                   final_train_loss=float(log["train_loss"].iloc[-1]),
                   final_val_loss=float(val["val_loss"].iloc[-1]) if len(val) else None)
    return {**row, **evaluate_text(model, tokenizer, documents, device)}


def compare(models: dict, documents: list[str], device="cpu", failures: dict | None = None) -> pd.DataFrame:
    """One row per model that scores (failures: see `attempt`)."""
    rows = [attempt(failures, name, "scoring", model_row, name, model, tokenizer, documents, device)
            for name, (model, tokenizer) in models.items()]
    return pd.DataFrame([row for row in rows if row is not None])


def samples(models: dict, prompts: list[str], settings: GenerationSettings, failures: dict | None = None) -> dict:
    """{prompt: {model: continuation}}: every model continues the same prompts with the same seed."""
    out = {prompt: {} for prompt in prompts}

    def continue_prompts(model, tokenizer):
        return tokenizer.decode(generate(model, tokenizer.encode(prompts, bos=True), settings, eos_id=tokenizer.eos_id))

    for name, (model, tokenizer) in models.items():
        texts = attempt(failures, name, "sampling", continue_prompts, model, tokenizer)
        for prompt, text in zip(prompts, texts or []):
            out[prompt][name] = text
    return out


# ---------------------------------------------------------------- plots

def human_count(value: float, _position=None) -> str:
    """Counts as axes show them: 950, 40K, 1.6M, 2.5B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def plain_number(value: float, _position=None) -> str:
    """1.5, 2, 300: what log-scale axes show instead of powers of ten."""
    return f"{value:.3g}" if abs(value) < 1e4 else human_count(value)


LOG_TICKS = ((1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0),
             (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0), (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0),
             (1.0, 2.0, 3.0, 5.0), (1.0, 2.0, 5.0), (1.0,))  # tick mantissas, finest first


def readable_log_axis(axis, formatter=plain_number, max_ticks: int = 7):
    """A log-scale axis (axes.xaxis or axes.yaxis) labelled with plain numbers at the finest mantissas
    that give at most `max_ticks` ticks over the data (matplotlib labels only powers of ten, often a
    single "10^0" for losses)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    low, high = axis.get_data_interval()
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for subs in LOG_TICKS:
        if sum(low <= sub * 10 ** decade <= high for decade in decades for sub in subs) <= max_ticks:
            break
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(formatter))
    axis.set_minor_formatter(NullFormatter())


def validation_data(names: list[str]) -> str:
    """Which text each model's logged validation was measured on, for a plot's subtitle."""
    sources = {}
    for name in names:
        folder = run_folder(name)
        if folder is not None and (folder / TRAIN_CONFIG).is_file():
            config = read_json(folder / TRAIN_CONFIG)
            sources[name] = f"{config.get('val_fraction', 0.1):.0%} of {data_name(str(config.get('data', '?')))}"
    if len(set(sources.values())) == 1:
        return f"validation data: {next(iter(sources.values()))}"
    if not sources:
        return "validation data: unknown"
    return "validation data differs, curves not comparable: " + "; ".join(f"{n}: {s}" for n, s in sources.items())


def plot_curves(names: list[str], x: str = "step", log_axes: bool = False):
    """From each model's training log, against step, tokens_seen or elapsed_s: validation bits per
    byte (left: fair across tokenizers) and loss per token (right: train solid, validation dashed)."""
    import matplotlib.pyplot as plt
    figure, (bpb_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for k, name in enumerate(names):
        log = training_log(name)
        if log is None:
            continue
        colour, val = f"C{k}", log.dropna(subset=["val_loss"])
        if "val_bpb" in val:
            bpb_axes.plot(val[x], val["val_bpb"], "-o", color=colour, markersize=3, label=name)
        loss_axes.plot(log[x], log["train_loss"], color=colour, label=f"{name} train")
        loss_axes.plot(val[x], val["val_loss"], "--o", color=colour, markersize=3, label=f"{name} validation")
    bpb_axes.set(xlabel=X_AXES[x], ylabel="bits per byte (lower is better)", title="validation bits per byte")
    loss_axes.set(xlabel=X_AXES[x], ylabel="loss per token (nats)", title="loss per token (depends on the tokenizer)")
    for axes in (bpb_axes, loss_axes):
        if log_axes:
            axes.set_xscale("log")
            axes.set_yscale("log")
            readable_log_axis(axes.yaxis)
            readable_log_axis(axes.xaxis, human_count if x == "tokens_seen" else plain_number)
        elif x == "tokens_seen":
            from matplotlib.ticker import FuncFormatter
            axes.xaxis.set_major_formatter(FuncFormatter(human_count))
        if axes.lines:
            axes.legend(fontsize=8)
        axes.grid(alpha=0.3, which="both" if log_axes else "major")
    subtitle = textwrap.fill(validation_data(names), 120)
    figure.suptitle(f"training curves against {X_AXES[x]}\n{subtitle}", fontsize=10)
    figure.tight_layout()
    return figure


def plot_bits_per_byte(table: pd.DataFrame, data: str):
    """Bits per byte of each model on the held-out text `data` (its name goes in the title)."""
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(max(5, 1.6 * len(table)), 4))
    bars = axes.bar(table["model"], table["bits_per_byte"], color=[f"C{k}" for k in range(len(table))])
    axes.bar_label(bars, fmt="%.3f")
    axes.set(ylabel="bits per byte (lower is better)", title=f"bits per byte on {data_name(data)}")
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------- report

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
    figures = {f"curves_vs_{name}.png": plot_curves(names, x, log_axes) for name, x in PLOTS.items()}
    figures["bits_per_byte.png"] = plot_bits_per_byte(table, source)
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
    protect_output()  # `| head` closing the pipe ends the output, never with a traceback
    parser = Parser("python model_comparison.py", description=__doc__)
    parser.add_argument("models", nargs="+", help="trained/ names or folders, or Hugging Face ids or folders")
    parser.add_argument("--data", default="tinystories-heldout",
                        help="the held-out text: a shipped name (tinystories-heldout: 650 stories no shipped model or "
                             "tokenizer saw) or a txt/jsonl/parquet file (or folder, glob)")
    parser.add_argument("--out", default="comparison", help="folder for the table, plots and samples")
    parser.add_argument("--prompts", nargs="*", default=PROMPTS)
    parser.add_argument("--max_len", type=int, default=60, help="new tokens per sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log_axes", action="store_true", help="logarithmic axes for the training curves")
    args = parser.parse_args(argv)
    try:  # everything that can be checked before the work
        settings = GenerationSettings(temp=0.7, min_p=0.05, max_len=args.max_len, seed=args.seed)
        out = writable_folder(args.out)
        documents = read_text(args.data)
    except ValueError as e:  # the project's errors (ConfigError, DataError, ComparisonError) are ValueErrors
        sys.exit(f"error: {e}")
    failures = {}
    models = load_models(args.models, args.device, failures)
    table = compare(models, documents, args.device, failures)
    if len(table):
        scored = {name: models[name] for name in table["model"]}
        files = write_report(table, samples(scored, args.prompts, settings, failures), out, args.data, args.log_axes)
        columns = ["model", "params", "tokenizer", "loss_per_token", "bits_per_byte", "top1", "top5", "top10"]
        print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print("wrote " + ", ".join(str(f) for f in files))
    for message in failures.values():
        print(f"error: {message}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
