"""The verdict of an experiment, from what its runs left on disk (result.json, log_data.csv,
stability.csv, provenance.json): trained/NAME/report.md, report.csv (one row per variant and size),
runs.csv (one row per run) and PNG plots. Reading only files, it reproduces a shipped report from
shipped logs, without weights.
"""
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from toolkit import scaling, stats
from toolkit.experiment import Experiment, Run
from toolkit.stability import PROBE_SEQUENCES, STABILITY
from toolkit.trainer import LOG, STATE

EDGE = "inconclusive (learning rate at the grid's edge)"
X_AXES = {"step": "optimizer steps", "tokens": "training tokens", "flops": "training FLOPs",
          "time": "training time (s)"}


@dataclass
class Variant:
    """One variant at one size: the runs the verdict compares, and what came of them."""
    size: str
    name: str
    runs: list[Run]  # the verdict's runs (every seed, at the chosen rate)
    results: dict[int, dict]  # seed -> result.json of the runs that ended
    lr: float | None  # the grid's chosen rate
    lr_at_edge: bool
    diverged_on_grid: bool = False  # every rate of the grid diverged: no rate to run the seeds at

    @property
    def finished(self) -> dict[int, float]:
        """seed -> held-out bits per byte of the runs that finished."""
        return {seed: r["eval_bpb"] for seed, r in self.results.items() if r["status"] == "finished"}

    @property
    def diverged(self) -> list[int]:
        return [seed for seed, r in self.results.items() if r["status"] == "diverged"]


class Study:
    """An experiment's plan and its runs' results, read once."""

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self.runs = experiment.runs()
        self.results = {run.name: run.result() for run in self.runs}
        self.variants = {size: [self.variant(size, name) for name in experiment.variants]
                         for size in experiment.size_labels}

    def variant(self, size: str, name: str) -> Variant:
        runs = self.experiment.verdict_runs(size, name)
        results = {run.seed: self.results.get(run.name) or run.result() for run in runs}
        lr = runs[0].lr if runs else None
        grid = self.experiment.grid(size, name) if self.experiment.lr_grid else []
        edge = len(grid) > 1 and lr in (grid[0], grid[-1])
        on_grid = bool(grid) and not runs and not self.grid_pending(size, name)
        return Variant(size, name, runs, {s: r for s, r in results.items() if r is not None}, lr, edge, on_grid)

    @property
    def missing(self) -> list[str]:
        """Runs not ended yet, and seeds still waiting for their grid."""
        names = [name for name, result in self.results.items() if result is None]
        seeds_after_grid = len(self.experiment.seeds) - len(self.experiment.grid_seed_list)
        for size, variants in self.variants.items():
            names += [f"{self.experiment.name}/{size + '/' if size else ''}{v.name}: {seeds_after_grid} seed(s) after "
                      f"the grid"
                      for v in variants if not v.runs and seeds_after_grid and self.grid_pending(size, v.name)]
        return names

    def grid_pending(self, size: str, variant: str) -> bool:
        return any(r.result() is None for seed in self.experiment.grid_seed_list
                   for r in self.experiment.grid_runs(size, variant, seed))


# --- the verdict ---

def verdict(study: Study, size: str) -> pd.DataFrame:
    """One row per variant: cost, budget used, held-out bits per byte over seeds, the paired
    difference from the baseline with p-values (raw and Holm-adjusted) and the call."""
    variants = study.variants[size]
    baseline = variants[0]
    rows = [describe_variant(v) for v in variants]
    tests = {}
    for v in variants[1:]:
        paired = stats.paired_test(v.finished, baseline.finished)
        tests[v.name] = paired
        rows[variants.index(v)].update(diff_mean=paired.mean, diff_ci_low=paired.ci_low, diff_ci_high=paired.ci_high,
                                       t=paired.t, p=paired.p)
    adjusted = dict(zip(tests, stats.holm([t.p for t in tests.values()])))
    for v, row in zip(variants, rows):
        if v is baseline:
            row["call"] = "baseline" + (" (learning rate at the grid's edge)" if v.lr_at_edge else "")
            continue
        row["p_holm"] = adjusted[v.name]
        row["call"] = variant_call(v, baseline, tests[v.name], adjusted[v.name], len(study.experiment.seeds))
    return pd.DataFrame(rows)


def describe_variant(v: Variant) -> dict:
    finished = [r for r in v.results.values() if r["status"] == "finished"]
    summary = stats.summarize(list(v.finished.values()))

    def mean(key):
        return sum(r[key] for r in finished) / len(finished) if finished else math.nan

    run = v.runs[0] if v.runs else None
    return {"size": v.size, "variant": v.name, "lr": v.lr if v.lr is not None else (run.train.lr if run else math.nan),
            "seeds": len(v.finished), "diverged": len(v.diverged),
            "params": run.params if run else math.nan,
            "params_without_embeddings": run.params_without_embeddings if run else math.nan,
            "flops_per_token": run.flops_per_token if run else math.nan, "steps": mean("steps"),
            "tokens": mean("tokens"),
            "train_flops": mean("tokens") * run.flops_per_token if run else math.nan, "time_s": mean("elapsed_s"),
            "bpb_mean": summary.mean, "bpb_std": summary.std, "bpb_ci_low": summary.ci_low,
            "bpb_ci_high": summary.ci_high}


def variant_call(v: Variant, baseline: Variant, paired: stats.Paired, p_holm: float, n_seeds: int) -> str:
    if baseline.diverged or baseline.diverged_on_grid:
        return "inconclusive (the baseline diverged)"
    if v.diverged_on_grid:
        return "worse (diverged at every rate of the grid)"
    if len(v.results) < n_seeds or len(baseline.results) < n_seeds:
        return "incomplete (runs missing)"
    if v.diverged:
        return f"worse (diverged in {len(v.diverged)} of {n_seeds} seeds)"
    if v.lr_at_edge or baseline.lr_at_edge:
        return EDGE if v.lr_at_edge else "inconclusive (the baseline's learning rate is at the grid's edge)"
    if paired.n < 2:
        return "inconclusive (one seed: no test)"
    return stats.call(paired.mean, p_holm)


def noise_floor(study: Study, size: str) -> tuple[float, float, int]:
    """(the baseline's seed standard deviation, the smallest difference these seeds detect at 80% power, seeds).
    The detectable difference assumes each run's noise is the baseline's, independent between variants:
    differences then have sqrt(2) times that spread (pairing by seed usually shrinks it)."""
    baseline = study.variants[size][0]
    summary = stats.summarize(list(baseline.finished.values()))
    return summary.std, stats.min_detectable_difference(math.sqrt(2) * summary.std, summary.n), summary.n


def transfer(study: Study) -> tuple[bool, str]:
    """Whether the variants rank the same at every size, and a sentence that says how. Only variants
    scored at every size are ranked (a study half way has arms without a score yet)."""
    scores = {}
    for size in study.experiment.size_labels:
        table = verdict(study, size)
        scores[size] = dict(zip(table["variant"], table["bpb_mean"]))
    scored = [v for v in scores[study.experiment.size_labels[0]]
              if all(math.isfinite(by_variant.get(v, math.nan)) for by_variant in scores.values())]
    rankings = {size: stats.ranking({v: by_variant[v] for v in scored}) for size, by_variant in scores.items()}
    left_out = [v for v in scores[study.experiment.size_labels[0]] if v not in scored]
    note = f" ({', '.join(left_out)}: not yet scored at every size)" if left_out else ""
    if len(scored) < 2:
        return False, f"No ranking across sizes yet: fewer than two variants are scored at every size{note}."
    orders = {size: " < ".join(order) for size, order in rankings.items()}
    sizes = list(rankings)
    holds = len({tuple(r) for r in rankings.values()}) == 1
    if holds:
        return True, f"The ranking holds at every size: {orders[sizes[0]]} (lowest bits per byte first){note}."
    tau = stats.kendall_tau(rankings[sizes[0]], rankings[sizes[-1]])
    listed = "; ".join(f"{size}: {order}" for size, order in orders.items())
    return False, (f"The ranking changes with size: {listed} (Kendall tau between the smallest and the largest: "
                   f"{tau:.2f}){note}.")


# --- reading the runs' logs ---

def run_log(run: Run, filename: str = LOG) -> pd.DataFrame | None:
    path = run.folder / filename
    return pd.read_csv(path) if path.is_file() else None


def curves(v: Variant) -> pd.DataFrame | None:
    """Validation bits per byte at the evaluation steps all seeds share: mean, min and max over seeds,
    against step, tokens, FLOPs and (mean) training time."""
    frames = []
    for run in v.runs:
        log = run_log(run)
        if log is not None and run.seed in v.results:
            val = log.dropna(subset=["val_bpb"])[["step", "tokens_seen", "elapsed_s", "val_bpb"]]
            frames.append(val.assign(seed=run.seed))
    if not frames:
        return None
    rows = pd.concat(frames)
    shared = rows.groupby("step")["seed"].nunique()
    rows = rows[rows["step"].isin(shared[shared == len(frames)].index)]
    grouped = rows.groupby("step")
    table = grouped["val_bpb"].agg(["mean", "min", "max"]).reset_index()
    table["tokens"] = grouped["tokens_seen"].mean().to_numpy()
    table["flops"] = table["tokens"] * v.runs[0].flops_per_token
    table["time"] = grouped["elapsed_s"].mean().to_numpy()
    return table


def stability(v: Variant) -> dict:
    """Per variant: the largest gradient norm, the part with the largest mean gradient norm, the last
    logits RMS (mean over seeds), the largest attention logit (over evaluations and seeds), loss spikes
    (over seeds) and the largest rise of the train loss."""
    grad_max, spikes, rise, logits, part_norms, attn_max = math.nan, 0, 0.0, [], {}, []
    for run in v.runs:
        log = run_log(run)
        if log is None:
            continue
        grad_max = max(grad_max, log["grad_norm"].max()) if not math.isnan(grad_max) else log["grad_norm"].max()
        n, largest = stats.loss_spikes(log["train_loss"].tolist())
        spikes, rise = spikes + n, max(rise, largest)
        table = run_log(run, STABILITY)
        if table is None:
            continue
        rms = table["logits_rms"].dropna()
        if len(rms):
            logits.append(float(rms.iloc[-1]))
        if "attn_logit_max" in table:  # runs from before it was recorded have no column
            attn_max += table["attn_logit_max"].dropna().tolist()
        for column in sorted((c for c in table.columns if c.startswith("grad_norm.")),
                             key=lambda c: part_order(c.removeprefix("grad_norm."))):
            part_norms.setdefault(column.removeprefix("grad_norm."), []).append(table[column].mean())
    parts = {part: sum(values) / len(values) for part, values in part_norms.items()}
    return {"variant": v.name, "grad_norm_max": grad_max,
            "logits_rms": sum(logits) / len(logits) if logits else math.nan,
            "attn_logit_max": max(attn_max) if attn_max else math.nan,
            "loss_spikes": spikes, "largest_rise": rise, "diverged": len(v.diverged), "part_grad_norms": parts}


def run_provenance(run: Run, result: dict) -> dict:
    """Code, device and threads of a run: from the sessions of its provenance.json (written by the trainer;
    a resumed run has several) where there is one, else what result.json recorded. A dirty tree is named
    by a hash of its diff, so that runs made from the same changes compare equal."""
    found = {"device": result.get("device"), "threads": result.get("threads"), "torch": result.get("torch"),
             "commit": None, "dirty": None}
    try:
        sessions = json.loads((run.folder / "provenance.json").read_text())["sessions"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return found
    commits = sorted({s["git_commit"][:12] for s in sessions if s.get("git_commit")})
    states = set()
    for session in sessions:
        if session.get("git_dirty") is None:
            continue
        diff = run.folder / str(session.get("git_diff"))
        changes = diff.read_bytes() if session["git_dirty"] and diff.is_file() else b""
        states.add(hashlib.sha256(changes).hexdigest()[:8] if session["git_dirty"] else "clean")
    found["commit"] = ", ".join(commits) or None
    found["dirty"] = ", ".join(sorted(states)) or None
    if sessions and sessions[-1].get("threads") is not None:
        found["threads"] = sessions[-1]["threads"]
    return found


def provenance(study: Study) -> tuple[pd.DataFrame, list[str]]:
    """Each run's code, device, threads and torch, and warnings when the runs of the study differ."""
    rows = [{"run": run.name, **run_provenance(run, result)} for run in study.runs
            if (result := study.results[run.name]) is not None]
    table = pd.DataFrame(rows, columns=["run", "commit", "dirty", "device", "threads", "torch"])
    warnings = []
    for column, what in (("commit", "code (git commit)"), ("dirty", "code (uncommitted changes)"),
                         ("device", "device"), ("threads", "thread count"), ("torch", "torch version")):
        counts = table[column].dropna().astype(str).value_counts()
        if len(counts) > 1:
            listed = ", ".join(f"{value} ({count} runs)" for value, count in counts.items())
            warnings.append(f"runs differ in {what}: {listed}")
    return table, warnings


def runs_table(study: Study) -> pd.DataFrame:
    columns = ["name", "size", "variant", "seed", "lr", "status", "steps", "tokens", "elapsed_s", "val_bpb", "eval_bpb",
               "eval_loss", "params", "params_without_embeddings", "flops_per_token", "device", "threads"]
    rows = [{k: result.get(k) for k in columns} for result in study.results.values() if result is not None]
    return pd.DataFrame(rows, columns=columns)


def architecture_diff(study: Study, size: str) -> dict[str, str]:
    """variant -> what it changes from the base config: model fields (derived ones included, such as
    head_dim after n_heads) and the train fields it sets, e.g. "norm: rmsnorm → layernorm"."""
    experiment = study.experiment
    model_before, train_before = experiment.reference(size)
    changes = {}
    for name, overrides in experiment.variants.items():
        run = experiment.run(size, name, experiment.seeds[0], experiment.lr_grid[0] if experiment.lr_grid else None)
        model = run.model.to_dict()
        lines = [f"{k}: {model_before.get(k)} → {v}" for k, v in model.items() if model_before.get(k) != v]
        lines += [f"{k}: {train_before.get(k)} → {v}" for k, v in overrides.items() if k not in model]
        changes[name] = ", ".join(lines) or "nothing (the base)"
    return changes


# --- plots ---

def figure_grid(n: int, width: float = 6.0, height: float = 4.2, columns: int = 4):
    """n panels, at most `columns` to a row (a study of many sizes wraps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncols = min(n, columns)
    nrows = -(-n // ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax in axes[n:]:
        ax.set_visible(False)
    return plt, figure, axes[:n]


def save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def legend(ax):
    if ax.get_legend_handles_labels()[0]:  # nothing to name before any run has ended
        ax.legend(fontsize=8)


SIZE_PANELS = 4  # up to this many sizes, a panel per size; beyond, a panel per variant with a line per size


def panels(study: Study) -> list[tuple[str, list[tuple[str, str, Variant]]]]:
    """(title, [(label, colour, variant)]) of each panel: the variants of a size side by side, or with
    many sizes (scaling studies) the sizes of a variant, narrow to wide in the viridis colours."""
    if len(study.variants) <= SIZE_PANELS:
        return [(size, [(v.name, f"C{k}", v) for k, v in enumerate(variants)])
                for size, variants in study.variants.items()]
    import matplotlib
    sizes = list(study.variants)
    colours = [matplotlib.colormaps["viridis"](i / max(1, len(sizes) - 1)) for i in range(len(sizes))]
    return [(name, [(size, colour, study.variants[size][k]) for size, colour in zip(sizes, colours)])
            for k, name in enumerate(study.experiment.variants)]


def plot_curves(study: Study, x: str, path: Path) -> Path:
    """Validation bits per byte against x, mean over seeds with a band from the lowest to the highest."""
    chosen = panels(study)
    plt, figure, axes = figure_grid(len(chosen))
    for ax, (title, lines) in zip(axes, chosen):
        for label, colour, v in lines:
            table = curves(v)
            if table is None:
                continue
            ax.plot(table[x], table["mean"], color=colour, label=label)
            ax.fill_between(table[x], table["min"], table["max"], color=colour, alpha=0.2)
        ax.set(xlabel=X_AXES[x], ylabel="validation bits per byte",
               title=f"{title + ': ' if title else ''}bits per byte against {X_AXES[x]} (band: seeds)")
        ax.grid(alpha=0.3)
        legend(ax)
    return save(plt, figure, path)


def plot_differences(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    """Each variant's mean difference from the baseline with its 95% interval."""
    plt, figure, axes = figure_grid(len(tables))
    for ax, (size, table) in zip(axes, tables.items()):
        rows = table.iloc[1:]
        colours = ["C2" if c == "better" else "C3" if c.startswith("worse") else "C7" for c in rows["call"]]
        low = (rows["diff_mean"] - rows["diff_ci_low"]).fillna(0).clip(lower=0)
        high = (rows["diff_ci_high"] - rows["diff_mean"]).fillna(0).clip(lower=0)
        ax.barh(rows["variant"], rows["diff_mean"], xerr=[low, high], color=colours, capsize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set(xlabel=f"held-out bits per byte minus {table['variant'].iloc[0]}'s (lower is better)",
               title=f"{size + ': ' if size else ''}difference from the baseline, 95% interval")
        ax.grid(alpha=0.3, axis="x")
    return save(plt, figure, path)


def grid_ticks(ax, rates: list[float]):
    """Ticks at the grid's rates, written plainly (a log axis would label its own decades)."""
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.minorticks_off()


def plot_learning_rates(study: Study, path: Path) -> Path:
    """Validation bits per byte of the first seed at each rate of the grid; x marks a diverged run."""
    plt, figure, axes = figure_grid(len(study.variants))
    for ax, size in zip(axes, study.variants):
        for k, name in enumerate(study.experiment.variants):
            points = [(run.lr, run.result()) for run in study.experiment.grid_runs(size, name)]  # the first seed
            done = [(lr, r["val_bpb"]) for lr, r in points if r is not None and r["status"] == "finished"]
            if done:
                ax.plot(*zip(*done), "-o", color=f"C{k}", label=name)
            diverged = [lr for lr, r in points if r is not None and r["status"] == "diverged"]
            top = max((b for _, b in done), default=1.0)
            ax.plot(diverged, [top] * len(diverged), "x", color=f"C{k}", markersize=10)
        ax.set_xscale("log")
        grid_ticks(ax, study.experiment.all_rates)
        ax.set(xlabel="peak learning rate", ylabel="validation bits per byte (first seed)",
               title=f"{size + ': ' if size else ''}learning rate (x: diverged)")
        ax.grid(alpha=0.3)
        legend(ax)
    return save(plt, figure, path)


def plot_transfer(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    plt, figure, axes = figure_grid(1)
    ax = axes[0]
    combined = pd.concat(tables.values())
    for k, (name, rows) in enumerate(combined.groupby("variant", sort=False)):
        error = (rows["bpb_ci_high"] - rows["bpb_mean"]).fillna(0)
        ax.errorbar(rows["params_without_embeddings"], rows["bpb_mean"], yerr=error, fmt="-o", color=f"C{k}",
                    label=name, capsize=3)
    ax.set_xscale("log")
    ax.set(xlabel="parameters without embeddings", ylabel="held-out bits per byte (95% interval)",
           title="the variants across sizes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(plt, figure, path)


def part_order(part: str) -> tuple:
    """Embeddings, then the layers in order, then the final norm and the head."""
    if part.startswith("layers."):
        return (2, int(part.split(".")[1]))
    return ({"embed": 0, "pos_embed": 1, "norm": 3, "head": 4}.get(part, 5), 0)


def plot_gradients(study: Study, path: Path) -> Path:
    """Mean gradient norm of each part of the model over training, per variant (parts in model order,
    so variants of different depths line up)."""
    chosen = panels(study)
    plt, figure, axes = figure_grid(len(chosen))
    for ax, (title, lines) in zip(axes, chosen):
        norms = {label: (colour, stability(v)["part_grad_norms"]) for label, colour, v in lines}
        parts = sorted({part for _, values in norms.values() for part in values}, key=part_order)
        for label, (colour, values) in norms.items():
            if values:
                ax.plot([parts.index(p) for p in values], list(values.values()), "-o", color=colour, label=label)
        ax.set_xticks(range(len(parts)), parts, rotation=45)
        ax.set_yscale("log")
        ax.set(xlabel="part of the model", ylabel="mean gradient norm (before clipping)",
               title=f"{title + ': ' if title else ''}gradient norms per part")
        ax.grid(alpha=0.3)
        legend(ax)
    return save(plt, figure, path)


# --- the report ---

def number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def count(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def signed(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:+.4f}"


def interval(low, high) -> str:
    return "—" if low is None or pd.isna(low) else f"[{low:+.4f}, {high:+.4f}]"


def p_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def verdict_section(study: Study, size: str, table: pd.DataFrame, grid: bool) -> list[str]:
    header = (["variant", "params (no emb.)", "FLOPs/token", "steps", "tokens", "time (s)"] + (["lr"] if grid else [])
              + ["held-out bpb (mean ± std)", "95% CI", "Δ vs baseline", "95% CI of Δ", "p", "p (Holm)", "call"])
    rows = []
    for r in table.to_dict("records"):
        rows.append([f"`{r['variant']}`", f"{count(r['params'])} ({count(r['params_without_embeddings'])})",
                     count(r["flops_per_token"]), count(r["steps"]), count(r["tokens"]), count(r["time_s"])]
                    + ([f"{r['lr']:g}"] if grid else [])
                    + [f"{number(r['bpb_mean'])} ± {number(r['bpb_std'])}"
                       + (f" ({r['diverged']} diverged)" if r["diverged"] else ""),
                       f"[{number(r['bpb_ci_low'])}, {number(r['bpb_ci_high'])}]",
                       signed(r.get("diff_mean")), interval(r.get("diff_ci_low"), r.get("diff_ci_high")),
                       p_value(r.get("p")), p_value(r.get("p_holm")), f"**{r['call']}**"])
    std, detectable, n = noise_floor(study, size)
    lines = markdown(header, rows) + [""]
    if n < 2:
        return lines + ["Noise floor: needs at least two finished seeds of the baseline."]
    return lines + [f"Noise floor: the baseline's seed standard deviation is {number(std)} bits per byte; with {n} "
                    f"seeds the smallest difference a paired t-test detects at 80% power (α = 0.05, each run as noisy "
                    f"as the baseline's) is {number(detectable)}."]


def stability_section(study: Study) -> list[str]:
    header = ["variant", "largest gradient norm", "part with the largest gradients", "final logits RMS",
              "largest attention logit", "loss spikes (all seeds)", "largest loss rise", "diverged"]
    lines = []
    for size, variants in study.variants.items():
        rows = []
        for v in variants:
            s = stability(v)
            part = max(s["part_grad_norms"], key=s["part_grad_norms"].get) if s["part_grad_norms"] else None
            rows.append([f"`{v.name}`", number(s["grad_norm_max"], 3),
                         f"{part} ({s['part_grad_norms'][part]:.3g})" if part else "n/a", number(s["logits_rms"], 3),
                         number(s["attn_logit_max"], 3),
                         str(s["loss_spikes"]), f"{s['largest_rise']:.1%}", f"{s['diverged']} of {len(v.runs)}"])
        lines += ([f"**{size}**", ""] if size else []) + markdown(header, rows) + [""]
    lines.append("Gradient norms are measured at the log steps, before clipping; the logits RMS over the validation "
                 "set at the last evaluation; the largest attention logit (scaled query-key product, of any head and "
                 f"layer) over the first {PROBE_SEQUENCES} validation sequences at every evaluation; a loss spike is "
                 "a log interval whose train loss rose more than 10% above the lowest before it.")
    return lines


def write_report(experiment: Experiment) -> list[Path]:
    """report.md, report.csv, runs.csv and the plots into trained/NAME/; returns the files."""
    study = Study(experiment)
    folder = experiment.folder
    folder.mkdir(parents=True, exist_ok=True)
    tables = {size: verdict(study, size) for size in experiment.size_labels}
    pd.concat(tables.values()).to_csv(folder / "report.csv", index=False)
    runs_table(study).to_csv(folder / "runs.csv", index=False)
    files = [folder / "report.md", folder / "report.csv", folder / "runs.csv"]
    files += [plot_curves(study, x, folder / f"bpb_vs_{x}.png") for x in X_AXES]
    if len(experiment.variants) > 1:
        files.append(plot_differences(tables, folder / "difference.png"))
    if experiment.lr_grid:
        files.append(plot_learning_rates(study, folder / "learning_rate.png"))
    if experiment.sizes and len(experiment.sizes) > 1:
        files.append(plot_transfer(tables, folder / "transfer.png"))
        if experiment.lr_grid:
            files.append(plot_lr_transfer(study, folder / "lr_transfer.png"))
        if any(scalable(scaling_points(study, name)) for name in experiment.variants):
            files.append(plot_scaling(study, folder / "scaling.png"))
    files.append(plot_gradients(study, folder / "gradient_norms.png"))
    (folder / "report.md").write_text("\n".join(report_text(study, tables, [f.name for f in files])) + "\n")
    return files


def report_text(study: Study, tables: dict[str, pd.DataFrame], files: list[str]) -> list[str]:
    experiment = study.experiment
    results = [r for r in study.results.values() if r is not None]
    eval_bytes = next((r["eval_bytes"] for r in results if r.get("eval_bytes")), None)
    n_variants = len(experiment.variants) - 1
    lines = [f"# Experiment `{experiment.name}`", "",
             f"Base `{experiment.base}`, {len(experiment.variants)} variants × {len(experiment.seeds)} seeds "
             f"({', '.join(map(str, experiment.seeds))}; a seed fixes the initial weights and the data order, the same "
             f"for every variant). Budget: {experiment.budget.describe()}."
             + (f" Learning rate chosen per variant from {', '.join(f'{r:g}' for r in experiment.lr_grid)} "
                f"by {chooser(experiment)} validation bits per byte" + grown(experiment) + "."
                if experiment.lr_grid else ""),
             "",
             f"Held-out text: `{experiment.eval_data}`" + (f" ({eval_bytes:,} UTF-8 bytes)" if eval_bytes else "")
             + ", scored in bits per byte with each run's own tokenizer, every token once.",
             "",
             f"Test: the difference from `{experiment.baseline}` paired by seed, two-sided paired t-test"
             + (f", p-values Holm-adjusted over the {n_variants} variants; the call uses the adjusted p"
                if n_variants > 1 else "; the call uses p")
             + " at α = 0.05 (differences all exactly zero give p = 1).", ""]
    missing = study.missing
    if missing:
        lines += [f"**Incomplete**: {len(missing)} run(s) have not ended: {', '.join(missing[:10])}"
                  + (" ..." if len(missing) > 10 else "") + ".", ""]
    size = experiment.size_labels[0]  # the variants change the same fields at every size
    lines += ["## What each variant changes", ""] + ([f"At size {size}, the smallest:", ""] if size else [])
    diff = architecture_diff(study, size)
    lines += markdown(["variant", "changes from the base config"], [[f"`{k}`", v] for k, v in diff.items()]) + [""]
    lines += ["## Verdict", ""]
    for size, table in tables.items():
        lines += (([f"### {size}", ""] if size else []) + verdict_section(study, size, table, bool(experiment.lr_grid))
                  + [""])
    if "difference.png" in files:
        lines += ["![difference from the baseline](difference.png)", ""]
    if experiment.sizes and len(experiment.sizes) > 1:
        lines += ["## Transfer across sizes", "", transfer(study)[1], "", "![transfer](transfer.png)", ""]
    lines += ["## Curves", "",
              "Validation bits per byte (the training data's held-out split) during training, mean over "
              "seeds with a band from the lowest to the highest seed, against each measure of the budget.", ""]
    lines += [f"![bits per byte against {X_AXES[x]}](bpb_vs_{x}.png)" for x in X_AXES] + [""]
    if experiment.lr_grid:
        lines += ["## Learning rate", "", learning_rate_table(study), "", "![learning rate](learning_rate.png)", ""]
    if "lr_transfer.png" in files:
        lines += ["## Learning rate across sizes", ""] + lr_transfer_section(study) + [""]
    if "scaling.png" in files:
        lines += ["## Scaling", ""] + scaling_section(study) + [""]
    lines += ["## Stability", ""] + stability_section(study) + ["", "![gradient norms](gradient_norms.png)", ""]
    lines += ["## Provenance", ""] + provenance_section(study)
    lines += ["", "Every run: `runs.csv`; every variant: `report.csv`; the plan: `experiment.json`."]
    return lines


# --- learning rate across sizes (muP's transfer check) ---

def grid_scores(study: Study) -> pd.DataFrame:
    """Every grid run that ended: size, its parameters without embeddings, variant, rate, seed and
    held-out bits per byte (inf for a diverged run: the worst)."""
    experiment, rows = study.experiment, []
    for size in experiment.size_labels:
        for name in experiment.variants:
            for seed in experiment.grid_seed_list:
                for run in experiment.grid_runs(size, name, seed):
                    result = run.result()
                    if result is not None:
                        rows.append({"size": size, "params": run.params_without_embeddings, "variant": name,
                                     "lr": run.lr, "seed": seed,
                                     "eval_bpb": result["eval_bpb"] if result["status"] == "finished" else math.inf})
    return pd.DataFrame(rows, columns=["size", "params", "variant", "lr", "seed", "eval_bpb"])


def lr_transfer(study: Study) -> dict[str, dict]:
    """Per variant: the mean held-out bits per byte at each (size, rate) over the grid's seeds, the best
    rate per size, how many grid steps the best rates span, and each (rate, narrower, wider) where the
    wider model did worse."""
    table, grid, out = grid_scores(study), study.experiment.all_rates, {}
    for name in study.experiment.variants:
        rows = table[table["variant"] == name]
        if rows.empty:
            continue
        means = rows.groupby(["params", "size", "lr"])["eval_bpb"].mean()
        sizes = list(dict.fromkeys(size for _, size, _ in sorted(means.index)))  # narrow to wide
        best = {size: means.xs(size, level="size").idxmin()[1] for size in sizes}
        steps = [grid.index(best[size]) for size in sizes]
        by = {(size, lr): value for (_, size, lr), value in means.items()}
        params = {size: n for n, size, _ in means.index}
        budget = {size: study.experiment.size_budget(size) for size in sizes}
        wider = [(a, b) for i, a in enumerate(sizes)  # the next wider size with the same budget
                 for b in [next((c for c in sizes[i + 1:] if params[c] > params[a] and budget[c] == budget[a]), None)]
                 if b is not None]
        compared = [(lr, a, b) for lr in grid for a, b in wider if (a, lr) in by and (b, lr) in by]
        worse = [(lr, a, b) for lr, a, b in compared if by[(b, lr)] > by[(a, lr)]]
        pairs = len(compared)
        out[name] = {"means": by, "sizes": sizes, "best": best, "spread": max(steps) - min(steps),
                     "wider_worse": worse, "beyond_noise": worse_beyond_noise(rows, worse), "pairs": pairs}
    return out


def worse_beyond_noise(scores: pd.DataFrame, worse: list) -> list | None:
    """The (rate, narrower, wider) pairs of `worse` where the wider model's mean is worse by more than twice
    the standard error of the difference of the two means; the seeds' standard deviation is pooled over the
    sizes at each rate (noise grows with the rate, and two seeds alone would give a poor estimate). None when
    no (size, rate) has two seeds with finite scores."""
    finite = scores[scores["eval_bpb"] < math.inf]
    cells = finite.groupby(["size", "lr"])["eval_bpb"]
    variance, count = cells.var(ddof=1), cells.count()
    pooled = variance[count >= 2].groupby(level="lr").mean()
    if pooled.empty:
        return None
    means = cells.mean()
    beyond = []
    for lr, a, b in worse:
        if lr in pooled.index and (a, lr) in count.index and (b, lr) in count.index:
            error = math.sqrt(pooled[lr] * (1 / count[(a, lr)] + 1 / count[(b, lr)]))
            if means[(b, lr)] - means[(a, lr)] > 2 * error:
                beyond.append((lr, a, b))
    return beyond


def plot_lr_transfer(study: Study, path: Path) -> Path:
    """Held-out bits per byte against the learning rate, one curve per size, a panel per variant (mean
    over the grid's seeds, bars from the lowest to the highest; x: diverged)."""
    table, found = grid_scores(study), lr_transfer(study)
    names = list(found) or list(study.experiment.variants)
    plt, figure, axes = figure_grid(len(names), columns=3)
    finite = table["eval_bpb"][table["eval_bpb"] < math.inf]
    low, high = (finite.min(), finite.max()) if len(finite) else (0, 1)
    for ax, name in zip(axes, names):
        rows = table[(table["variant"] == name)]
        sizes = found[name]["sizes"] if name in found else []
        for k, size in enumerate(sizes):
            points = rows[rows["size"] == size].groupby("lr")["eval_bpb"]
            mean, lo, hi = points.mean(), points.min(), points.max()
            ok = mean < math.inf
            ax.errorbar(mean.index[ok], mean[ok], yerr=[(mean - lo)[ok], (hi - mean)[ok]], fmt="-o", markersize=4,
                        capsize=3, color=plt.cm.viridis(k / max(1, len(sizes) - 1)), label=size)
            ax.plot(mean.index[~ok], [high] * int((~ok).sum()), "x", markersize=9,
                    color=plt.cm.viridis(k / max(1, len(sizes) - 1)))
        ax.set_xscale("log")
        grid_ticks(ax, study.experiment.all_rates)
        ax.set_ylim(low - 0.02 * (high - low + 1e-9), min(high, low + 3 * (finite.median() - low + 1e-9)) + 0.02)
        ax.set(xlabel="peak learning rate", ylabel="held-out bits per byte",
               title=f"{name}: learning rate at each size (x: diverged)")
        ax.grid(alpha=0.3)
        legend(ax)
    return save(plt, figure, path)


def lr_transfer_section(study: Study) -> list[str]:
    found, grid = lr_transfer(study), study.experiment.all_rates
    sizes = list(dict.fromkeys(size for info in found.values() for size in info["sizes"]))
    rows = []
    for name, info in found.items():
        cells = [f"{info['best'][size]:g} ({number(info['means'][(size, info['best'][size])])})"
                 if size in info["best"] else "n/a" for size in sizes]
        worse, beyond = info["wider_worse"], info["beyond_noise"]
        noise = "" if beyond is None else f" ({len(beyond)} beyond noise)"
        rows.append([f"`{name}`", *cells, f"{info['spread']} step{'s' if info['spread'] != 1 else ''}",
                     "yes" if not worse else f"no: {len(worse)} of {info['pairs']} pairs{noise}"])
    lines = [f"The best rate of the grid ({', '.join(f'{r:g}' for r in grid)}, held-out bits per byte averaged over "
             f"seed{'s' if len(study.experiment.grid_seed_list) > 1 else ''} "
             f"{', '.join(map(str, study.experiment.grid_seed_list))}) at each size, how many grid steps the best "
             "rates span across the sizes (a rate that transfers moves by at most one), and whether a wider model "
             "is never worse than the next narrower one at the same rate (beyond noise: worse by more than twice the "
             "standard error of the difference, the seeds' spread pooled over the sizes at that rate):", ""]
    lines += markdown(["variant", *sizes, "best rates span", "wider never worse"], rows) + [""]
    for name, info in found.items():
        for lr, a, b in sorted(info["wider_worse"], key=lambda w: w not in (info["beyond_noise"] or []))[:6]:
            mark = ", beyond noise" if (lr, a, b) in (info["beyond_noise"] or []) else ""
            lines.append(f"- `{name}` at {lr:g}: {b} {number(info['means'][(b, lr)])} against {a} "
                         f"{number(info['means'][(a, lr)])}{mark}")
    return lines + ["", "![learning rate across sizes](lr_transfer.png)"]


# --- scaling laws ---

def scaling_points(study: Study, name: str) -> list[scaling.Point]:
    """One point per size of the variant whose runs finished: N without embeddings, mean tokens, C."""
    points = []
    for size in study.experiment.size_labels:
        v = next(v for v in study.variants[size] if v.name == name)
        finished = [r for r in v.results.values() if r["status"] == "finished"]
        if finished:
            run = v.runs[0]
            tokens = sum(r["tokens"] for r in finished) / len(finished)
            points.append(scaling.Point(run.params_without_embeddings, tokens, run.flops_per_token * tokens,
                                        list(v.finished.values()), size))
    return points


def scalable(points: list) -> bool:
    """Enough for a fit with a held-out size: several sizes (three besides the largest) and several
    token counts; one token count is a transfer check, not a scaling study."""
    return len({p.params for p in points}) >= 4 and len({p.tokens for p in points}) >= 2


def scaling_fits(study: Study) -> dict[str, dict]:
    """Per variant with enough sizes: the L(C) fit on the frontier of every point with bootstrap
    intervals, L(N, D) if the points allow it, and the forecast of the largest size (computed once per
    study: the plot and the text share them)."""
    if hasattr(study, "scaling_fits"):
        return study.scaling_fits
    fits = study.scaling_fits = {}
    for name in study.experiment.variants:
        points = scaling_points(study, name)
        if not scalable(points):
            continue
        found = {"points": points, "frontier": scaling.frontier(points), "forecast": scaling.forecast(points, 500)}
        found["compute"] = scaling.fit_points(points, [p.loss for p in points], "L(C)")
        found["compute_draws"] = scaling.bootstrap_fits(points, "L(C)", 500)
        if scaling.chinchilla_possible(points):
            found["chinchilla"] = scaling.fit_points(points, [p.loss for p in points], "L(N, D)")
            found["chinchilla_draws"] = scaling.bootstrap_fits(points, "L(N, D)", 500)
        fits[name] = found
    return fits


def with_interval(value: float, draws) -> str:
    low, high = np.percentile(draws, [2.5, 97.5])
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def training_tokens(run: Run) -> int | None:
    """Tokens in the run's training split (tokenized through the data cache), for epochs; None if unreadable."""
    from toolkit import data
    from toolkit.tokenizer import load_tokenizer
    cfg = run.train
    try:
        folder = data.prepare_data(cfg.data, load_tokenizer(cfg.tokenizer), cfg.text_format, cfg.val_fraction,
                                   cfg.max_docs, progress=False)
        return len(data.TokenData(folder, "train"))
    except Exception:  # noqa: BLE001  (a report still writes without the epoch count)
        return None


def scaling_section(study: Study) -> list[str]:
    fits = scaling_fits(study)
    results = [r for r in study.results.values() if r is not None and r["status"] == "finished"]
    cpu_hours = sum(r["elapsed_s"] * (r.get("threads") or 1) for r in results) / 3600
    split = training_tokens(study.runs[0])
    most = max(r["tokens"] for r in results)
    lines = [f"Held-out bits per byte against training compute C = FLOPs per token (the model's own count, "
             f"attention included) x tokens, N = parameters without embeddings. {len(results)} finished runs, "
             f"{count(min(r['tokens'] for r in results))} to {count(most)} tokens each"
             + (f" (at most {most / split:.2f} epochs of the {count(split)}-token training split: each token seen "
                "at most once)" if split and most <= split else
                f" ({most / split:.2f} epochs: repeated data measures overfitting, not scaling)" if split else "")
             + f", {cpu_hours:.2f} CPU-hours (training time x threads).", ""]
    for name, found in fits.items():
        points, forecast = found["points"], found["forecast"]
        e, a, alpha = found["compute"]
        draws = found["compute_draws"]
        lines += [f"**`{name}`**: L(C) = E + A·C^-α on the compute frontier ({len(found['frontier'])} of "
                  f"{len(points)} points): E = {with_interval(e, draws[:, 0])}, "
                  f"α = {with_interval(alpha, draws[:, 2])} (95% bootstrap intervals over seeds)."]
        if "chinchilla" in found:
            e, a, alpha, b, beta = found["chinchilla"]
            d = found["chinchilla_draws"]
            largest = max(p.compute for p in points)
            n_opt, d_opt = scaling.compute_optimal(found["chinchilla"], largest)
            ratios = [scaling.compute_optimal(tuple(row), largest) for row in d]
            ratio_draws = [dd / nn for nn, dd in ratios]
            lines += ["", f"L(N, D) = E + A/N^α + B/D^β: E = {with_interval(e, d[:, 0])}, "
                      f"α = {with_interval(alpha, d[:, 2])}, β = {with_interval(beta, d[:, 4])}; at the study's "
                      f"largest compute ({largest:.3g} FLOPs, C = 6ND) it puts the optimum at N = {count(n_opt)}, "
                      f"D = {count(d_opt)}: {with_interval(d_opt / n_opt, ratio_draws)} tokens per parameter."]
        rows = [[p.label, count(p.params), count(p.tokens), f"{p.compute:.3g}",
                 f"{pred:.4f} [{lo:.4f}, {hi:.4f}]", f"{p.loss:.4f}" + (f" ± {np.std(p.losses, ddof=1):.4f}"
                                                                      if len(p.losses) > 1 else ""),
                 "inside" if ok else "**outside**"]
                for p, pred, lo, hi, ok in zip(forecast.held_out, forecast.predicted, forecast.low, forecast.high,
                                               forecast.inside)]
        passed = sum(forecast.inside)
        lines += ["", f"Forecast of the largest size from the others only ({forecast.law} fitted without it; the 95% "
                  "interval holds the fits to seed-resampled losses and the seed noise of a mean over the held-out "
                  f"size's seeds, pooled from the other sizes): {passed} of {len(rows)} measured within it.", ""]
        lines += markdown(["held-out size", "N", "tokens", "C (FLOPs)", "predicted (95%)", "measured (seeds)",
                           "forecast"], rows) + [""]
    return lines + ["![scaling](scaling.png)"]


def plot_scaling(study: Study, path: Path) -> Path:
    """Per variant: every point (colour: size), the frontier, the L(C) fit to all points, and the
    forecast of the largest size (fit without it) with its 95% interval."""
    fits = scaling_fits(study)
    plt, figure, axes = figure_grid(max(1, len(fits)), width=7.0, height=5.0, columns=2)
    for ax, (name, found) in zip(axes, fits.items()):
        points, forecast = found["points"], found["forecast"]
        sizes = sorted({p.params for p in points})
        colour = {n: plt.cm.viridis(i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}
        for p in points:
            ax.scatter(p.compute, p.loss, color=colour[p.params], s=22, zorder=3)
        for n in sizes:
            line = sorted((p.compute, p.loss) for p in points if p.params == n)
            ax.plot(*zip(*line), color=colour[n], alpha=0.5, linewidth=1, label=f"N = {count(n)}")
        c = np.geomspace(min(p.compute for p in points), max(p.compute for p in points) * 1.5, 100)
        ax.plot(c, scaling.compute_law(c, *found["compute"]), "k-", linewidth=1.2, label="L(C), frontier of all")
        front = [points[i] for i in found["frontier"]]
        ax.plot([p.compute for p in front], [p.loss for p in front], "ks", markerfacecolor="none", markersize=8)
        for p, pred, lo, hi in zip(forecast.held_out, forecast.predicted, forecast.low, forecast.high):
            ax.errorbar(p.compute * 1.04, pred, yerr=[[pred - lo], [hi - pred]], fmt="D", color="C3", capsize=4,
                        markersize=5)
        ax.plot([], [], "D", color="C3", label=f"forecast ({forecast.law}, without the largest N)")
        ax.set_xscale("log")
        ax.set(xlabel="training FLOPs", ylabel="held-out bits per byte", title=f"{name}: loss against compute")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save(plt, figure, path)


def chooser(experiment: Experiment) -> str:
    return "the first seed's" if experiment.grid_seeds == "first" else "the seeds' mean"


def grown(experiment: Experiment) -> str:
    """How the grids may grow, and which did."""
    if not experiment.grid_extend:
        return ""
    extended = [f"`{name}`{' at ' + size if size else ''} ({', '.join(f'{r:g}' for r in extra)})"
                for size in experiment.size_labels for name in experiment.variants
                for extra in [[r for r in experiment.grid(size, name) if r not in experiment.lr_grid]] if extra]
    return (f", a grid growing by up to {experiment.grid_extend} rate{'s' if experiment.grid_extend > 1 else ''} "
            f"beyond an edge whose rate was best ({'grown: ' + ', '.join(extended) if extended else 'none grew'})")


def learning_rate_table(study: Study) -> str:
    experiment = study.experiment
    rates, rows = experiment.all_rates, []
    for size, variants in study.variants.items():
        for v in variants:
            grid, cells = experiment.grid(size, v.name), []
            for lr in rates:
                results = [experiment.run(size, v.name, seed, lr).result() for seed in experiment.grid_seed_list]
                cells.append("" if lr not in grid else "n/a" if any(r is None for r in results)
                             else "diverged" if any(r["status"] == "diverged" for r in results)
                             else number(sum(r["val_bpb"] for r in results) / len(results)))
            best = f"{v.lr:g}" + (" (edge)" if v.lr_at_edge else "") if v.lr is not None else "n/a"
            rows.append([f"{size + ' ' if size else ''}`{v.name}`", *cells, best])
    header = ["variant", *(f"{r:g}" for r in rates), "best"]
    return "\n".join(markdown(header, rows))


def provenance_section(study: Study) -> list[str]:
    table, warnings = provenance(study)
    lines = [f"**Warning**: {w}." for w in warnings] + ([""] if warnings else [])
    if table.empty:
        return lines + ["No run has ended yet."]
    summary = []
    for column in ("commit", "dirty", "device", "threads", "torch"):
        values = table[column].dropna().astype(str).value_counts()
        summary.append([column, ", ".join(f"{v} ({c})" for v, c in values.items()) or "not recorded"])
    lines += markdown(["", "values (runs)"], summary)
    if table["commit"].isna().all():
        lines += ["", "No run has a provenance.json with its git commit: the code behind these runs is not recorded."]
    return lines


def plan_table(experiment: Experiment) -> str:
    """What --dry_run prints: every run known now, its size, cost, what the budget gives it and where it stands."""
    runs = experiment.runs()
    lines = [f"{experiment.name}: base {experiment.base}, {len(experiment.variants)} variants x "
             f"{len(experiment.seeds)} seeds" + (f" x {len(experiment.sizes)} sizes" if experiment.sizes else "")
             + f"; budget: {experiment.budget.describe()}; held-out text: {experiment.eval_data}"]
    header = ["run", "params (no emb.)", "FLOPs/token", "steps", "tokens", "train FLOPs", "status"]
    rows = []
    for run in runs:
        steps = run.train.max_steps
        tokens = steps * run.tokens_per_step
        limit = f" or {run.train.max_minutes:g} min" if run.train.max_minutes else ""
        rows.append([run.name, f"{count(run.params)} ({count(run.params_without_embeddings)})",
                     count(run.flops_per_token), f"{steps}{limit}", count(tokens),
                     f"{tokens * run.flops_per_token:.3g}", run_status(run)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    if experiment.lr_grid and experiment.grid_seeds == "first":  # with "all" every run is listed above
        waiting = [f"{size + '/' if size else ''}{name}"
                   for size in experiment.size_labels for name in experiment.variants
                   if experiment.best_lr(size, name) is None]
        if waiting and len(experiment.seeds) > 1:
            lines.append(f"then seeds {', '.join(map(str, experiment.seeds[1:]))} of {', '.join(waiting)} at the rate "
                         f"of the grid with the best validation (chosen when its grid has ended)")
    if experiment.grid_extend:
        lines.append(f"a grid whose best rate is at an edge grows by up to {experiment.grid_extend} rate(s) per side "
                     f"(listed here once its runs so far have ended)")
    return "\n".join(lines)


def run_status(run: Run) -> str:
    result = run.result()
    if result is not None:
        return result["status"]
    log = run_log(run)
    if (run.folder / STATE).is_file() and log is not None and len(log):
        return f"resumes after step {int(log['step'].max())}"
    return "to run"
