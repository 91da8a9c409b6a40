"""Command-line plumbing: overrides of config fields (--field=value, or --model.field / --train.field)
parsed by each field's type with one-line errors that suggest the closest valid name; --help built from
config.py's own comments; the argparse parser of the scripts that take fixed options, with the same errors;
and console streams that survive a closed pipe or terminal."""
import argparse
import dataclasses
import inspect
import io
import json
import os
import sys
import tokenize
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
        expected = {bool: "true or false", int: "an integer", float: "a number",
                    dict: "a JSON object"}.get(kind, kind.__name__)
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


def route_overrides(values: dict[str, str], extra: tuple[str, ...] = (), flags: tuple[str, ...] = ()) \
        -> tuple[dict, dict, dict]:
    """(model overrides, train overrides, extra options) parsed from raw --name=value texts; `flags` (the
    command's bare --flags) are only suggested for a misspelt name."""
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
            known = list(model_fields) + list(train_fields) + list(extra) + list(flags)
            raise ConfigError(f"unknown setting --{raw_name}{closest(name, known)}; see --help")
    return model, train, other


class Parser(argparse.ArgumentParser):
    """argparse with the project's errors: one line that names the problem and the command's --help (no usage
    block), and no abbreviations, so that a typo is an error with the closest option, never another option
    taken silently. `command` is how the user runs it, e.g. "python inference.py"."""

    def __init__(self, command: str, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.command = command

    def error(self, message):
        self.exit(2, f"error: {message}; see {self.command} --help\n")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown(unknown[0]))
        return parsed

    def unknown(self, text: str) -> str:
        """What is wrong with an argument the parser does not take, and the closest option it does."""
        flag = text.partition("=")[0]
        if not flag.startswith("-"):
            return f"unexpected argument {text!r}"
        known = [option[2:] for action in self._actions for option in action.option_strings if option.startswith("--")]
        return f"unknown setting {flag}{closest(flag.lstrip('-').replace('-', '_'), known)}"


def field_descriptions(cls) -> dict[str, str]:
    """Each field's trailing comment in its class's source (config.py): the one place settings are described."""
    names = {f.name for f in dataclasses.fields(cls)}
    descriptions, first = {}, None  # first: the first token of the current logical line
    for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            first = None
        elif token.type not in (tokenize.INDENT, tokenize.DEDENT) and first is None:
            first = token.string
        if token.type == tokenize.COMMENT and first in names:
            descriptions.setdefault(first, token.string.lstrip("#").strip())
    return descriptions


def shown(value) -> str:
    """A setting as --help shows it: floats without binary rounding noise (3e-05, not 2.9999999999999997e-05)."""
    return repr(float(f"{value:.12g}")) if isinstance(value, float) else str(value)


def describe_settings(model_cfg, train_cfg, run_options: dict[str, str]) -> str:
    """--help: the run options, then every field with the value it would take and its description."""
    rows = [("Run options (not saved with the run):", None)]
    rows += [(f"  --{name}", text) for name, text in run_options.items()]
    for cfg in (model_cfg, train_cfg):
        cls = type(cfg)
        rows.append((f"{cls.__name__} (--field=value or --{cls.__name__[:-6].lower()}.field=value):", None))
        descriptions = field_descriptions(cls)
        rows += [(f"  --{f.name}={shown(getattr(cfg, f.name))}", descriptions.get(f.name, ""))
                 for f in dataclasses.fields(cls)]
    width = max(len(left) for left, text in rows if text is not None) + 2
    return "\n".join(left if text is None else f"{left:<{width}}{text}" for left, text in rows)


class SafeStream:
    """stdout or stderr that ignores writes once nobody reads them (a closed pipe, a closed terminal), so
    that printing can never stop a run from saving its work. After the first failed write the file
    descriptor is pointed at /dev/null, which also quiets C code, other writers and the flush at exit."""

    def __init__(self, stream):
        self.stream, self.lost = stream, False

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # BrokenPipeError, EIO from a hung-up terminal, or a closed file
            self.discard()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.discard()

    def discard(self):
        if self.lost:
            return
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # no descriptor of its own (a closed or in-memory stream): dropping the writes is enough

    def __getattr__(self, name):
        return getattr(self.stream, name)


def safe(stream):
    return stream if isinstance(stream, SafeStream) or stream is None else SafeStream(stream)


def protect_output():
    """Make sys.stdout and sys.stderr SafeStreams for the rest of the process."""
    sys.stdout, sys.stderr = safe(sys.stdout), safe(sys.stderr)
