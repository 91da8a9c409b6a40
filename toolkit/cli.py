"""Command-line overrides of config fields: --field=value (or --model.field / --train.field),
parsed by each field's type, with one-line errors that suggest the closest valid name."""
import dataclasses
import json
import types
import typing

from config import ConfigError, ModelConfig, TrainConfig, closest


def parse_value(field: dataclasses.Field, text: str):
    """The value of `text` for a field of this type ("None" for optional fields, JSON for dicts)."""
    annotation = field.type
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    kind = next(t for t in options if t is not type(None))
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return kind(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number", dict: "a JSON object"}.get(kind, kind.__name__)
        raise ConfigError(f"--{field.name}={text!r} is not valid: expected {expected}") from None


def split_arguments(argv: list[str], flags: tuple[str, ...]) -> tuple[dict[str, str], set[str]]:
    """{name: text} for --name=value / --name value, and the set of bare --flags among `flags`."""
    values, seen_flags, i = {}, set(), 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: settings look like --field=value")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not has_value and name in flags:
            seen_flags.add(name)
        elif has_value:
            values[name] = text
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[name] = argv[i + 1]
            i += 1
        else:  # a bare --field for a boolean field means true
            values[name] = "true"
        i += 1
    return values, seen_flags


def route_overrides(values: dict[str, str], extra: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """(model overrides, train overrides, extra options) parsed from raw --name=value texts."""
    model_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    model, train, other = {}, {}, {}
    for raw_name, text in values.items():
        prefix, _, name = raw_name.rpartition(".")
        if name in extra and not prefix:
            other[name] = text
        elif name in model_fields and prefix in ("", "model"):
            model[name] = parse_value(model_fields[name], text)
        elif name in train_fields and prefix in ("", "train"):
            train[name] = parse_value(train_fields[name], text)
        else:
            known = list(model_fields) + list(train_fields) + list(extra)
            raise ConfigError(f"unknown setting --{raw_name}{closest(name, known)}; see --help")
    return model, train, other


def describe_fields() -> str:
    """Every setting with its default, for --help."""
    lines = []
    for cls in (ModelConfig, TrainConfig):
        lines.append(f"{cls.__name__} (--field=value or --{cls.__name__[:-6].lower()}.field=value):")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  --{f.name}={default}")
    return "\n".join(lines)
