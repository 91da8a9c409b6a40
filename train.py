"""Train a language model into trained/NAME.

    python train.py                                   # what config.py says: Llama-style 1M on the stories in data/
    python train.py --preset=gpt2-1m --name=GPT2_1m --n_layers=8 --lr=3e-4 --device=cpu
    python train.py --data=tinystories --name=Llama3_1m_full   # all of TinyStoriesV2, streamed from the hub
    python train.py --data=shakespeare --tokenizer=bytes --name=shakespeare
    python train.py --name=GPT2_1m --resume           # continue a run (train settings may be overridden)
    torchrun --nproc_per_node=4 train.py ...          # DDP on 4 GPUs (add --fsdp=true to shard the model)

Every field of ModelConfig and TrainConfig in config.py can be set with --field=value (or
--model.field=value / --train.field=value); --help lists them. vocab_size follows the tokenizer
unless set. An existing run is never overwritten: pass --resume or --overwrite.
"""
import sys

from config import ConfigError, ModelConfig, TrainConfig
from toolkit import checkpoint
from toolkit.checkpoint import MODEL_CONFIG, TRAIN_CONFIG, read_json
from toolkit.cli import describe_fields, route_overrides, split_arguments
from toolkit.data import DataError, absolute_spec
from toolkit.hf import LoadError
from toolkit.tokenizer import TokenizerError, load_tokenizer
from toolkit.trainer import TrainError, command_line, train

FLAGS = ("resume", "overwrite", "help")
OPTIONS = ("preset", "stop_at")  # run options that are not saved with the run


def configs(argv: list[str]):
    """(ModelConfig, TrainConfig, flags, options) from the command line and config.py's defaults."""
    values, flags = split_arguments(argv, FLAGS)
    model_overrides, train_overrides, options = route_overrides(values, OPTIONS)
    stop_at = options.get("stop_at")
    if stop_at is not None:
        if not stop_at.isdigit():
            raise ConfigError(f"--stop_at={stop_at!r} is not valid: expected a step number")
        stop_at = int(stop_at)
    if "resume" in flags:
        name = train_overrides.get("name", TrainConfig().name)
        if not (checkpoint.TRAINED / name / MODEL_CONFIG).is_file():
            raise TrainError(f"nothing to resume: trained/{name} holds no run (train without --resume to start one)")
        if model_overrides or "preset" in options:
            raise ConfigError(f"--resume continues trained/{name} as it was built: drop the model settings "
                              f"({', '.join(model_overrides) or 'preset'}) or start a new --name")
        model_cfg, record = checkpoint.read_model_config(checkpoint.TRAINED / name)
        saved = read_json(checkpoint.TRAINED / name / TRAIN_CONFIG)
        saved.pop("data_sha256", None)  # recorded with the run, not a setting: the trainer checks it
        if "data" in saved:
            saved["data"] = absolute_spec(saved["data"])  # recorded relative to the project root
        train_cfg = TrainConfig.from_dict({**saved, **train_overrides})
        checkpoint.check_tokenizer(f"trained/{name}", record, load_tokenizer(train_cfg.tokenizer))
        return model_cfg, train_cfg, flags, stop_at
    train_cfg = TrainConfig(**train_overrides)
    if "vocab_size" not in model_overrides:
        model_overrides["vocab_size"] = load_tokenizer(train_cfg.tokenizer).vocab_size
    preset = options.get("preset")
    model_cfg = ModelConfig.preset(preset, **model_overrides) if preset else ModelConfig(**model_overrides)
    return model_cfg, train_cfg, flags, stop_at


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + describe_fields())
        return
    try:
        model_cfg, train_cfg, flags, stop_at = configs(argv)
        out = train(model_cfg, train_cfg, resume="resume" in flags, overwrite="overwrite" in flags,
                    stop_at=stop_at, command=command_line())
    except (ConfigError, DataError, LoadError, TokenizerError, TrainError) as e:
        sys.exit(f"error: {e}")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
