"""Train a language model into trained/NAME.

    python train.py                                   # what config.py says (Llama-style 1M on TinyStories)
    python train.py --preset=gpt2-1m --name=GPT2_1m --n_layers=8 --lr=3e-4 --device=cpu
    python train.py --data=shakespeare --tokenizer=bytes --name=shakespeare
    python train.py --name=GPT2_1m --resume           # continue a run (train settings may be overridden)
    torchrun --nproc_per_node=4 train.py ...          # DDP on 4 GPUs (add --fsdp=true to shard the model)

Every field of ModelConfig and TrainConfig in config.py can be set with --field=value (or
--model.field=value / --train.field=value); --help lists them with the values this command would use
(--preset=gpt2-1m --help shows that preset's). vocab_size follows the tokenizer unless set. An existing
run is never overwritten: pass --resume or --overwrite. Ctrl+C, SIGTERM and SIGHUP save a checkpoint and
exit with 128 + the signal's number (130, 143, 129); errors exit with 1.
"""
import os
import re
import sys

from config import ConfigError, ModelConfig, TrainConfig
from toolkit import checkpoint
from toolkit.checkpoint import TRAIN_CONFIG, read_json
from toolkit.cli import describe_settings, protect_output, route_overrides, split_arguments
from toolkit.data import DataError, absolute_spec
from toolkit.hf import LoadError
from toolkit.tokenizer import TokenizerError, load_tokenizer
from toolkit.trainer import Interrupted, TrainError, check_output, check_stop_at, command_line, train

RUN_OPTIONS = {  # options of this command, not saved with the run
    "preset=NAME": "start from a ModelConfig preset (gpt2, gpt2-1m, llama3-1m, ...); --name defaults to NAME",
    "resume": "continue trained/NAME from its last checkpoint (train settings such as --max_steps may change)",
    "overwrite": "start trained/NAME again, replacing the run there",
    "stop_at=STEP": "save and stop after this step (continue later with --resume)",
}
FLAGS = tuple(name for name in RUN_OPTIONS if "=" not in name) + ("help",)
OPTIONS = tuple(name.partition("=")[0] for name in RUN_OPTIONS if "=" in name)


def configs(argv: list[str], vocab_from_tokenizer: bool = True):
    """(ModelConfig, TrainConfig, flags, stop_at) from the command line and config.py's defaults."""
    values, flags = split_arguments(argv, FLAGS)
    model_overrides, train_overrides, options = route_overrides(values, OPTIONS, FLAGS)
    stop_at = options.get("stop_at")
    if stop_at is not None:
        if not re.fullmatch(r"[+-]?\d+", stop_at.strip()):
            raise ConfigError(f"--stop_at={stop_at!r} is not valid: expected a step number")
        stop_at = check_stop_at(int(stop_at))
    if "resume" in flags:
        return (*resumed_configs(model_overrides, train_overrides, options, flags), flags, stop_at)
    preset = options.get("preset")
    if preset:  # a preset's run gets the preset's name, never the default model's folder
        train_overrides.setdefault("name", preset)
    train_cfg = TrainConfig(**train_overrides)
    if vocab_from_tokenizer and "vocab_size" not in model_overrides:
        model_overrides["vocab_size"] = load_tokenizer(train_cfg.tokenizer).vocab_size
    model_cfg = ModelConfig.preset(preset, **model_overrides) if preset else ModelConfig(**model_overrides)
    return model_cfg, train_cfg, flags, stop_at


def resumed_configs(model_overrides: dict, train_overrides: dict, options: dict, flags: set):
    """The saved run's settings, with train settings overridden."""
    name = train_overrides.get("name", TrainConfig().name)
    out = checkpoint.TRAINED / name
    check_output(out, resume=True, overwrite="overwrite" in flags)
    if model_overrides or "preset" in options:
        raise ConfigError(f"--resume continues trained/{name} as it was built: drop the model settings "
                          f"({', '.join(model_overrides) or 'preset'}) or start a new --name")
    model_cfg, record = checkpoint.read_model_config(out)
    saved = read_json(out / TRAIN_CONFIG)
    saved.pop("data_sha256", None)  # recorded with the run, not a setting: the trainer checks it
    if "data" in saved:
        saved["data"] = absolute_spec(saved["data"])  # recorded relative to the project root
    train_cfg = TrainConfig.from_dict({**saved, **train_overrides})
    checkpoint.check_tokenizer(f"trained/{name}", record, load_tokenizer(train_cfg.tokenizer))
    return model_cfg, train_cfg


def main(argv=None):
    protect_output()  # a closed pipe or terminal must never stop a run from saving
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--help" in argv or "-h" in argv:
            rest = [a for a in argv if a not in ("--help", "-h")]
            try:  # the vocab_size the run would take: the tokenizer's
                model_cfg, train_cfg, _, _ = configs(rest)
            except (TokenizerError, DataError, LoadError):  # help still shows, with config.py's vocab_size
                model_cfg, train_cfg, _, _ = configs(rest, False)
            print(__doc__ + "\n" + describe_settings(model_cfg, train_cfg, RUN_OPTIONS))
            return
        model_cfg, train_cfg, flags, stop_at = configs(argv)
        out = train(model_cfg, train_cfg, resume="resume" in flags, overwrite="overwrite" in flags,
                    stop_at=stop_at, command=command_line())
    except (ConfigError, DataError, LoadError, TokenizerError, TrainError) as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl+C while Python was still importing or parsing: nothing had started
        print("stopped by Ctrl+C before training began: nothing was saved", file=sys.stderr)
        sys.exit(130)
    print(f"saved to {out}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved and every process has passed the last barrier. Gloo's worker threads can still
        # abort the interpreter's own teardown (SIGABRT, "terminate called without an active exception";
        # pytorch/pytorch#179291), which torchrun reports as a failed job: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
