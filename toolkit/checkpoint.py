"""The one checkpoint format: a folder with model_config.json, train_config.json and model.safetensors.

Weights are safetensors (loading never runs code), saved from the plain module (never with
torch.compile's `_orig_mod.` or DDP's `module.` prefixes) and with a tied head stored once.
model_config.json also records the tokenizer, {"tokenizer": {"name": ..., "fingerprint": ...}}, so that
a model whose tokenizer has changed since is refused instead of reading wrong ids. Checkpoints saved
before the record existed name their tokenizer in train_config.json only and load as they always did.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from config import ConfigError, ModelConfig
from modules.model import Model
from toolkit.hf import LoadError
from toolkit.tokenizer import Tokenizer, load_tokenizer

WEIGHTS, MODEL_CONFIG, TRAIN_CONFIG = "model.safetensors", "model_config.json", "train_config.json"
TOKENIZER_RECORD = "tokenizer"  # the key in model_config.json; not a ModelConfig field
# Where runs live: trained/ next to this code, or TRAINED_DIR (tests point it elsewhere).
TRAINED = Path(os.environ.get("TRAINED_DIR", Path(__file__).resolve().parent.parent / "trained"))


def unwrap(model: torch.nn.Module) -> Model:
    """The Model inside torch.compile (`_orig_mod`) and DDP/FSDP (`module`) wrappers."""
    while not isinstance(model, Model):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def write_atomically(path: Path, write):
    """Write through a temporary file and rename, so an interruption never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def save_model(model, directory, train_config: dict | None = None, state_dict: dict | None = None,
               metadata: dict | None = None, tokenizer: Tokenizer | None = None, weights_file: str = WEIGHTS) -> Path:
    """Write the model (and, if given, the training settings and the tokenizer's record) into
    `directory`. `state_dict` replaces the model's own (a sharded model's gathered weights);
    `metadata` goes into the safetensors header; `weights_file` names the weights' file (the trainer writes
    them under another name first: see save_checkpoint)."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if model.cfg.tie_embeddings:
        state.pop("head.weight", None)  # the same tensor as embed.weight
    write_atomically(directory / weights_file, lambda p: save_file(state, str(p), metadata=metadata))
    return save_configs(directory, model.cfg, train_config, tokenizer)


def save_configs(directory, model_config: ModelConfig, train_config: dict | None = None,
                 tokenizer: Tokenizer | None = None) -> Path:
    """Write model_config.json (with the tokenizer's name and fingerprint) and train_config.json. Without a
    tokenizer, the record already in the folder for the same model stays: a run's later saves keep it."""
    directory = Path(directory)
    values = json.loads(model_config.to_json())
    record = ({"name": tokenizer.name, "fingerprint": tokenizer.fingerprint} if tokenizer is not None
              else _kept_record(directory, values))
    if record is not None:
        values[TOKENIZER_RECORD] = record
    write_atomically(directory / MODEL_CONFIG, lambda p: p.write_text(json.dumps(values, indent=2)))
    if train_config is not None:
        write_atomically(directory / TRAIN_CONFIG, lambda p: p.write_text(json.dumps(train_config, indent=2)))
    return directory


def _kept_record(directory: Path, values: dict) -> dict | None:
    try:
        saved = json.loads((directory / MODEL_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    record = saved.pop(TOKENIZER_RECORD, None)
    return record if saved == values else None


def is_checkpoint(path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{path} cannot be read ({e}): the checkpoint is damaged; retrain or restore it") from None


def load_state_dict_file(path: Path) -> tuple[dict, dict]:
    """(tensors, header metadata) of a safetensors file, or a one-line LoadError if it is damaged."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{path} cannot be read ({e}): the file is missing, truncated or corrupt; "
                        f"retrain or restore it") from None


def weights_metadata(path: Path) -> dict | None:
    """The header metadata of a safetensors file, without reading its tensors; None if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return None


def read_model_config(directory) -> tuple[ModelConfig, dict | None]:
    """(ModelConfig, tokenizer record {"name", "fingerprint"} or None) of a checkpoint folder."""
    path = Path(directory) / MODEL_CONFIG
    values = read_json(path)
    record = values.pop(TOKENIZER_RECORD, None)
    try:
        return ModelConfig.from_dict(values), record
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None


def check_tokenizer(directory, record: dict | None, tokenizer: Tokenizer):
    """A one-line LoadError when `tokenizer` is not the one the checkpoint recorded (no record: nothing to check)."""
    if record is None or record["fingerprint"] == tokenizer.fingerprint:
        return
    then, now = record["fingerprint"][:12], tokenizer.fingerprint[:12]
    if record["name"] != tokenizer.name:
        raise LoadError(f"{directory} was trained with tokenizer {record['name']} (fingerprint {then}), not "
                        f"{tokenizer.name} ({now}): use {record['name']}")
    raise LoadError(f"{directory} was trained with tokenizer {record['name']} (fingerprint {then}), which has "
                    f"changed since (now {now}), so the model would read wrong ids: restore the tokenizer it was "
                    f"trained with (e.g. git checkout tokenizers/) or retrain the model")


def checkpoint_tokenizer(directory, train_config: dict | None = None) -> Tokenizer | None:
    """The tokenizer a checkpoint was trained with, checked against its record; None if it names none."""
    _, record = read_model_config(directory)
    if train_config is None:
        path = Path(directory) / TRAIN_CONFIG
        train_config = read_json(path) if path.is_file() else {}
    name = record["name"] if record else train_config.get("tokenizer")
    if not name:
        return None
    tokenizer = load_tokenizer(name)
    check_tokenizer(directory, record, tokenizer)
    return tokenizer


def load_checkpoint(directory, device="cpu") -> tuple[Model, dict]:
    """(model in eval mode, train settings as a dict, {} if none were saved) from a checkpoint folder."""
    directory = Path(directory)
    cfg, _ = read_model_config(directory)
    train_config = read_json(directory / TRAIN_CONFIG) if (directory / TRAIN_CONFIG).is_file() else {}
    state, _ = load_state_dict_file(directory / WEIGHTS)
    if cfg.tie_embeddings and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]
    model = Model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise LoadError(f"{directory / WEIGHTS} does not match {MODEL_CONFIG}: {first}") from None
    return model.to(device).eval(), train_config
