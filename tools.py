"""Plumbing behind one import: models in and out (trained/ folders, Hugging Face checkpoints),
tokenizers, data, training, generation and metrics. The code lives in toolkit/, one file per job;
this module is its public face.
"""
from pathlib import Path

from config import closest
from toolkit import checkpoint
from toolkit.checkpoint import (
    TRAIN_CONFIG,
    checkpoint_tokenizer,
    is_checkpoint,
    load_checkpoint,
    save_model,
)
from toolkit.data import DataError, prepare_data, read_documents
from toolkit.generate import GenerationError, GenerationSettings, generate
from toolkit.hf import LoadError, export_hf, hf_directory, load_hf_model
from toolkit.metrics import score, text_batches
from toolkit.tokenizer import (
    TOKENIZER_FILES,
    Tokenizer,
    TokenizerError,
    available_tokenizers,
    has_tokenizer_files,
    load_tokenizer,
)

__all__ = ["load_model", "save_model", "export_hf", "trained_names", "load_tokenizer", "available_tokenizers",
           "Tokenizer", "read_documents", "prepare_data", "generate", "GenerationSettings", "score", "text_batches",
           "LoadError", "TokenizerError", "DataError", "GenerationError", "no_tokenizer_error"]

HF_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")  # hub ids without an owner


def trained_names() -> list[str]:
    """Every model under trained/, nested ones such as an experiment's study/variant/seed0 included."""
    trained = checkpoint.TRAINED
    if not trained.is_dir():
        return []
    return sorted(p.parent.relative_to(trained).as_posix() for p in trained.rglob(checkpoint.MODEL_CONFIG))


def model_path(name_or_path: str) -> Path:
    """trained/NAME if there is one, else the path as given."""
    trained = checkpoint.TRAINED / name_or_path
    return trained if trained.is_dir() else Path(name_or_path).expanduser()


def load_model(name_or_path: str, device="cpu"):
    """(model in eval mode, tokenizer or None) for a trained/ name or folder, or a Hugging Face GPT-2
    or Llama-family checkpoint (hub id such as "gpt2", "meta-llama/Llama-3.2-1B" or "Qwen/Qwen3-0.6B", or a local
    directory).
    A checkpoint that recorded its tokenizer is refused in one line if that tokenizer has changed since;
    a Hugging Face checkpoint without tokenizer files comes with None."""
    path = model_path(name_or_path)
    if is_checkpoint(path):
        model, train_config = load_checkpoint(path, device)
        return model, checkpoint_tokenizer(path, train_config)
    if path.is_dir() and not (path / "config.json").is_file():  # a study's folder, or a run not yet saved
        raise LoadError(folder_without_model(name_or_path, path))
    in_trained = (checkpoint.TRAINED / name_or_path.split("/")[0]).is_dir()  # an experiment's nested name
    hub_id = (name_or_path.count("/") == 1 and not in_trained) or name_or_path in HF_GPT2  # owner/name
    if not path.is_dir() and not hub_id:
        known = trained_names()
        shown = ", ".join(known[:12]) + (f" and {len(known) - 12} more" if len(known) > 12 else "")
        raise LoadError(f"no model {name_or_path!r}{closest(name_or_path, known)}: trained/ has "
                        f"{shown or 'nothing yet'}; Hugging Face ids look like owner/name or {HF_GPT2[0]}")
    directory = hf_directory(str(path) if path.is_dir() else name_or_path)
    model = load_hf_model(str(directory), device)
    if not has_tokenizer_files(directory):
        return model, None
    return model, load_tokenizer("gpt2" if name_or_path == "gpt2"
                                 else f"hf:{directory if path.is_dir() else name_or_path}")


def folder_without_model(name: str, path: Path) -> str:
    """What a folder that holds no model (no checkpoint, no config.json) holds instead, in one line."""
    inside = sorted(p.parent.relative_to(path).as_posix() for p in path.rglob(checkpoint.MODEL_CONFIG))
    if not inside:
        return (f"{name} is a folder without a model in it (no {checkpoint.MODEL_CONFIG} or config.json): "
                f"a run saves one at its first checkpoint")
    shown = ", ".join(f"{name.rstrip('/')}/{run}" for run in inside[:6]) + (
        f" and {len(inside) - 6} more" if len(inside) > 6 else "")
    return f"{name} is a folder of models, not one: name one of them, e.g. {shown}"


def no_tokenizer_error(name_or_path: str) -> LoadError:
    """The one-line error for a model that load_model returned without a tokenizer, saying how to give it one."""
    if is_checkpoint(model_path(name_or_path)):
        return LoadError(f"{name_or_path} names no tokenizer: "
                         f"add its name to {model_path(name_or_path) / TRAIN_CONFIG}, "
                         f'e.g. "tokenizer": "tinystories-2048"')
    return LoadError(f"{name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy them from where "
                     f"the model came from, or export it with tools.export_hf(model, folder, tokenizer)")
