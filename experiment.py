"""Run an ablation: variants x seeds under an equal budget, then a verdict with error bars and p-values.

    python experiment.py experiments/quick.toml                # run what has not ended, then write the report
    python experiment.py experiments/norms.toml --dry_run      # the runs, their size, FLOPs per token and budget
    python experiment.py experiments/norms.toml --report       # only the report, from the runs on disk
    python experiment.py experiments/norms.toml --prune        # lean enough to commit, even half way
    python experiment.py experiments/norms.toml --prune=all    # the same, without any weights
    python experiment.py experiments/norms.toml --parallel=4   # 4 runs at a time (a GPU each, or a share of the CPU)
    python experiment.py experiments/norms.toml --executor=slurm   # a Slurm job per run, through submitit
    python experiment.py --base=llama3-1m --vary norm=rmsnorm,layernorm,cosinenorm --seeds=3 --budget=steps:400
    python experiment.py --coord_check                         # muP's coordinate check -> trained/coord_check/

Runs go to trained/NAME/[SIZE/]VARIANT/[lrRATE/]seedK/ (ordinary trained models: inference.py and
model_comparison.py take these names); the verdict to trained/NAME/report.md, report.csv and PNG plots.
Rerunning the same command skips the runs that ended and resumes interrupted ones. --prune drops the
training states of the runs that ended and keeps weights (in bfloat16) for one seed per variant only;
runs still to end are left as they are, so a study can be committed half way and resumed.

Options (they override the file's keys): --name, --base, --seeds=3 (or 0,1,2), --budget=KIND:AMOUNT
(steps, tokens, flops, minutes), --eval_data, --lr_grid=5e-4,1e-3,2e-3, --sizes="dim=64;dim=128",
--threads, --vary FIELD=V1,V2,... (variants without a file; the first is the baseline); how to run:
--parallel=N, --executor=slurm|local (submitit; local tries the same path on this machine). Any
ModelConfig or TrainConfig field applies to every run: --train.batch_size=16, --model.dim=64, --lr=2e-3.

--coord_check trains a few AdamW steps at several widths under each parametrization (SP, muP, ...) and
draws each module's output RMS against width (toolkit/coord_check.py); its options: --base=llama3-1m,
--widths=64,128,256,512,1024, --base_dim=64, --steps=4, --lr=1e-2, --seed=0.
"""
import sys

import pandas as pd

from config import PRESETS, ConfigError
from modules.parametrization import PARAMETRIZATIONS
from toolkit.cli import parse_value, protect_output, route_overrides, split_arguments
from toolkit.data import DataError
from toolkit.experiment import (
    MODEL_FIELDS,
    TRAIN_FIELDS,
    Experiment,
    ExperimentError,
    Interrupted,
    field_of,
    prune,
    read_plan,
    run_experiment,
)
from toolkit.hf import LoadError
from toolkit.report import plan_table, write_report
from toolkit.tokenizer import TokenizerError
from toolkit.trainer import TrainError, command_line

FLAGS = ("report", "dry_run", "prune", "help")
PLAN_OPTIONS = ("name", "base", "vary", "seeds", "budget", "eval_data", "lr_grid", "sizes", "threads")
RUN_OPTIONS = ("parallel", "executor", "prune")
EXECUTORS = ("slurm", "local")


def variants_from(text: str) -> dict:
    """{"rmsnorm": {"norm": "rmsnorm"}, ...} from --vary norm=rmsnorm,layernorm: one variant per value."""
    key, has_values, values = text.partition("=")
    if not has_values or not values:
        raise ExperimentError(f"--vary={text!r} is not valid: write FIELD=V1,V2,..., "
                              f"e.g. --vary norm=rmsnorm,layernorm")
    field = field_of(key, "--vary")
    return {value: {key: parse_value(field, value)} for value in values.split(",")}


def numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise ExperimentError(f"--{option}={text!r} is not valid: expected {what} separated by commas, "
                              f"e.g. --{option}={'0,1,2' if kind is int else '1e-3,2e-3'}") from None


def plan_values(options: dict, values: dict) -> dict:
    """The experiment's settings with the command line's options applied on top."""
    if "vary" in options:
        if "variants" in values:
            raise ExperimentError("--vary builds the variants when there is no file: "
                                  "edit the file's [variants] instead")
        values["variants"] = variants_from(options["vary"])
        values.setdefault("name", f"{options.get('base', values.get('base', 'experiment'))}-"
                                  f"{options['vary'].partition('=')[0]}")
    if "seeds" in options:
        seeds = numbers(options["seeds"], int, "seeds")
        values["seeds"] = seeds[0] if len(seeds) == 1 else seeds
    if "lr_grid" in options:
        values["lr_grid"] = numbers(options["lr_grid"], float, "lr_grid")
    if "threads" in options:
        values["threads"] = numbers(options["threads"], int, "threads")[0]
    if "sizes" in options:
        values["sizes"] = options["sizes"].split(";")
    values.update({k: options[k] for k in ("name", "base", "budget", "eval_data") if k in options})
    return values


def parse(argv: list[str]) -> tuple[Experiment, set, dict]:
    """(the experiment, flags, run options) from the command line."""
    file = argv[0] if argv and not argv[0].startswith("--") else None
    texts, flags = split_arguments(argv[1:] if file else argv, FLAGS)
    model, train, options = route_overrides(texts, PLAN_OPTIONS + RUN_OPTIONS, FLAGS)
    if file is None and not {"base", "vary", "budget"} <= set(options):
        raise ExperimentError("give an experiment file (see experiments/), or --base, --vary and --budget")
    values = plan_values(options, read_plan(file) if file else {})
    values["model"] = {**values.get("model", {}), **model}
    values["train"] = {**values.get("train", {}), **train}
    parallel = options.get("parallel", "1")
    if not parallel.strip().isdigit():
        raise ExperimentError(f"--parallel={parallel!r} is not valid: give how many runs at a time, e.g. --parallel=2")
    run_options = {"parallel": int(parallel), "executor": options.get("executor"), "prune": options.get("prune")}
    if run_options["prune"] not in (None, "all"):
        raise ExperimentError(f"--prune={run_options['prune']!r} is not valid: --prune keeps one seed's weights per "
                              f"variant, --prune=all none")
    if run_options["parallel"] < 1:
        raise ExperimentError("--parallel must be at least 1")
    if run_options["executor"] not in (None, *EXECUTORS):
        raise ExperimentError(f"--executor={run_options['executor']!r} is not valid; "
                              f"choose one of: {', '.join(EXECUTORS)}")
    return Experiment.from_dict(values, file or "the command line"), flags, run_options


COORD_OPTIONS = {"base": str, "widths": int, "base_dim": int, "steps": int, "lr": float, "seed": int}


def coord_check_main(argv: list[str]):
    """--coord_check: the runs, trained/coord_check/coord_check.{csv,png}, and the RMS growth per module."""
    from toolkit import checkpoint, coord_check
    texts, _ = split_arguments([a for a in argv if a != "--coord_check"], ())
    unknown = [k for k in texts if k not in COORD_OPTIONS]
    if unknown:
        raise ExperimentError(f"--{unknown[0]} is not an option of --coord_check; its options: "
                              f"{', '.join('--' + k for k in COORD_OPTIONS)}")
    options = {k: numbers(v, COORD_OPTIONS[k], k) if COORD_OPTIONS[k] is not str else v for k, v in texts.items()}
    options = {k: v if k == "widths" or not isinstance(v, list) else v[0] for k, v in options.items()}
    if "base" in options and options["base"] not in PRESETS:
        raise ExperimentError(f"--base={options['base']!r} is not a preset; presets: {', '.join(PRESETS)}")
    settings = {"base": "llama3-1m", "widths": list(coord_check.WIDTHS), "base_dim": 64, "steps": 4, "lr": 1e-2,
                "seed": 0, **options}
    print(f"coordinate check: {settings['base']} at widths {settings['widths']}, {', '.join(PARAMETRIZATIONS)} "
          f"(base_dim {settings['base_dim']}), {settings['steps']} AdamW steps at lr {settings['lr']:g}")
    table = coord_check.coord_check(**settings)
    title = (f"{settings['base']}: output RMS against width, steps 0-{settings['steps']} "
             f"(AdamW lr {settings['lr']:g}, muP base_dim {settings['base_dim']})")
    files = coord_check.write(table, checkpoint.TRAINED / "coord_check", title)
    print("\n".join(coord_check.summary(table)))
    print(f"wrote {', '.join(str(f) for f in files)}")


def main(argv=None):
    protect_output()  # a closed pipe (| head) or terminal must never stop a study or its report
    argv = sys.argv[1:] if argv is None else argv
    if "--coord_check" in argv:
        try:
            return coord_check_main(argv)
        except (ExperimentError, ConfigError, DataError, TokenizerError) as e:
            sys.exit(f"error: {e}")
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(f"fields: {', '.join(MODEL_FIELDS)}; {', '.join(TRAIN_FIELDS)}")
        return
    try:
        experiment, flags, options = parse(argv)
        if "dry_run" in flags:
            print(plan_table(experiment))
            return
        if "prune" in flags or options["prune"]:
            prune(experiment, keep_weights=options["prune"] != "all")
            return
        if "report" not in flags:
            run_experiment(experiment, options["parallel"], options["executor"], command=command_line())
        files = write_report(experiment)
    except Interrupted as e:
        sys.exit(f"stopped: {e}")
    except (ExperimentError, ConfigError, DataError, LoadError, TokenizerError, TrainError) as e:
        sys.exit(f"error: {e}")
    columns = ["size", "variant", "bpb_mean", "bpb_std", "diff_mean", "p_holm", "call"]
    table = pd.read_csv(files[1])  # report.csv
    table = table[[c for c in columns[0 if experiment.sizes else 1:] if c in table]]  # one variant: no differences
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    print(f"wrote {files[0]} (and {', '.join(f.name for f in files[1:])})")


if __name__ == "__main__":
    main()
