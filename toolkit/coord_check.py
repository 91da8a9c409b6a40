"""The coordinate check, muP's standard diagnostic (Yang et al. 2022, "Tensor Programs V", section 7):
train a few steps at several widths with the same hyperparameters and watch the root-mean-square of
every module's output. Under a parametrization whose hyperparameters transfer, the curves over width
are flat at every step; under SP the logits and attention scores grow with width as soon as training
moves the weights.

The RMS values come from the shape logger's statistics (`log_shapes(stats=True)`), measured on one
fixed probe batch before each step; attention modules then also log their scores (the logits before
softmax). `python experiment.py --coord_check` runs it and writes trained/coord_check/.
"""
import math
from pathlib import Path

import pandas as pd
import torch

from config import ModelConfig, TrainConfig
from modules.model import Model
from modules.parametrization import PARAMETRIZATIONS
from toolkit import data
from toolkit.optim import make_optimizer, set_learning_rate
from toolkit.tokenizer import load_tokenizer

WIDTHS = (64, 128, 256, 512, 1024)
# Module outputs drawn in the picture: (label, path suffix or "", method, output name).
SHOWN = (("attention scores", "attention", "scores", "scores"),
         ("attention output", "attention", "forward", "output"), ("MLP output", "mlp", "forward", "output"),
         ("layer output", "layers.", "forward", "output"), ("logits", "", "forward", "logits"))


def probe_batches(tokenizer_name: str, text: str, count: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """`count` batches of (batch_size, seq_len + 1) consecutive tokens from the start of `text`."""
    ids = torch.tensor(load_tokenizer(tokenizer_name).encode(text[:200_000]))
    needed = count * batch_size * (seq_len + 1)
    if len(ids) < needed:
        raise ValueError(f"the text has {len(ids)} tokens, the coordinate check needs {needed}")
    return list(ids[:needed].view(count, batch_size, seq_len + 1))


def measure(model: Model, probe: torch.Tensor) -> dict[str, float]:
    """RMS of every logged output over the probe batch: {"path.method:output": rms}."""
    model.eval()
    with torch.no_grad(), model.log_shapes(stats=True, print_fn=None) as log:
        model(probe)
    model.train()
    rms = {}
    for record in log.records:
        for name, info in record.outputs.items():
            if getattr(info, "stats", None):
                rms[f"{record.path or 'model'}.{record.method}:{name}"] = info.stats["rms"]
    return rms


def coord_check(base: str = "llama3-1m", widths=WIDTHS, parametrizations=tuple(PARAMETRIZATIONS),
                base_dim: int = 64, steps: int = 4, lr: float = 1e-2, batch_size: int = 8, seq_len: int = 64,
                seed: int = 0, text: str = "tinystories-sample", tokenizer: str = "tinystories-sample-2048",
                model_overrides: dict | None = None) -> pd.DataFrame:
    """One row per (parametrization, width, step, module output) with its RMS: step t is measured after
    t AdamW updates at the constant rate `lr` (no warmup: the check is about the first steps). The
    preset's head count is kept, so head_dim grows with the width."""
    batches = probe_batches(tokenizer, data.read_text(text), steps + 1, batch_size, seq_len)
    probe = batches[-1][:, :-1]  # never trained on
    train_cfg = TrainConfig(optimizer="adamw", lr=lr, weight_decay=0.0, grad_clip=0.0)
    rows = []
    for parametrization in parametrizations:
        for width in widths:
            torch.manual_seed(seed)
            cfg = ModelConfig.preset(base, **{"dim": width, "context_length": max(seq_len, 8),
                                              "parametrization": parametrization, "base_dim": base_dim,
                                              "vocab_size": load_tokenizer(tokenizer).vocab_size,
                                              **(model_overrides or {})})
            model = Model(cfg)
            optimizer = make_optimizer(model, train_cfg, torch.device("cpu"))
            set_learning_rate(optimizer, lr)
            for step in range(steps + 1):
                for module, value in measure(model, probe).items():
                    rows.append({"parametrization": parametrization, "width": width, "step": step,
                                 "module": module, "rms": value})
                if step == steps:
                    break
                batch = batches[step]
                _, loss = model(batch[:, :-1], batch[:, 1:])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return pd.DataFrame(rows)


def shown_rms(table: pd.DataFrame, label: str) -> pd.DataFrame:
    """The rows of one SHOWN entry, averaged over the modules it covers (every layer's attention, ...)."""
    _, part, method, output = next(s for s in SHOWN if s[0] == label)
    path = table["module"].str.rsplit(".", n=1).str[0]
    method_output = table["module"].str.rsplit(".", n=1).str[1]
    if part == "":
        chosen = path == "model"
    elif part.endswith("."):  # whole layers: layers.N
        chosen = path.str.fullmatch(r"layers\.\d+")
    else:
        chosen = path.str.endswith(part)
    if method is not None:
        chosen &= method_output == f"{method}:{output}"
    return table[chosen].groupby(["parametrization", "width", "step"], as_index=False)["rms"].mean()


def growth(table: pd.DataFrame, label: str, step: int) -> dict[str, float]:
    """Per parametrization: the RMS at the widest model over that at the narrowest, at `step`."""
    rows = shown_rms(table, label)
    rows = rows[rows["step"] == step]
    out = {}
    for parametrization, group in rows.groupby("parametrization"):
        group = group.sort_values("width")
        out[parametrization] = float(group["rms"].iloc[-1] / group["rms"].iloc[0])
    return out


def plot(table: pd.DataFrame, path: Path, title: str = ""):
    """The standard picture: per module (rows), RMS against width for each step, every parametrization side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parametrizations = list(dict.fromkeys(table["parametrization"]))
    labels = [s[0] for s in SHOWN if not shown_rms(table, s[0]).empty]
    steps = sorted(table["step"].unique())
    colours = plt.cm.viridis([i / max(1, len(steps) - 1) for i in range(len(steps))])
    fig, axes = plt.subplots(len(labels), len(parametrizations), figsize=(4.2 * len(parametrizations),
                                                                         2.4 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        rows = shown_rms(table, label)
        low, high = rows["rms"].min(), rows["rms"].max()
        for col, parametrization in enumerate(parametrizations):
            ax = axes[row][col]
            for step, colour in zip(steps, colours):
                line = rows[(rows["parametrization"] == parametrization) & (rows["step"] == step)]
                ax.plot(line["width"], line["rms"], marker="o", markersize=3, color=colour, label=f"step {step}")
            ax.set_xscale("log", base=2)
            widths = sorted(rows["width"].unique())
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_ylim(low / 1.5, high * 1.5)  # shared per row, so flat and growing compare by eye
            ax.set_title(f"{parametrization}: {label}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == len(labels) - 1:
                ax.set_xlabel("width (dim)", fontsize=8)
            if col == 0:
                ax.set_ylabel("RMS", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(table: pd.DataFrame, folder: Path, settings: str) -> list[Path]:
    """coord_check.csv and coord_check.png into folder; returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    csv, png = folder / "coord_check.csv", folder / "coord_check.png"
    table.to_csv(csv, index=False)
    plot(table, png, settings)
    return [csv, png]


def summary(table: pd.DataFrame) -> list[str]:
    """Lines: per shown module, the RMS growth from the narrowest to the widest model at the last step."""
    last = int(table["step"].max())
    widths = sorted(table["width"].unique())
    lines = [f"RMS at step {last}, width {widths[-1]} over width {widths[0]} ({widths[-1] // widths[0]}x wider):"]
    for label, *_ in SHOWN:
        if shown_rms(table, label).empty:
            continue
        ratios = growth(table, label, last)
        lines.append(f"  {label:>17}: " + "  ".join(f"{p} {r:.3g}x" for p, r in ratios.items()
                                                     if not math.isnan(r)))
    return lines
