"""One tokenizer API for every kind: nested sentencepiece BPE families, raw UTF-8 bytes and Hugging Face
tokenizers. `load_tokenizer(spec)` picks the kind from a name:

    "tinystories-2048"           family folder tokenizers/tinystories/ cut to its first 2048 ids
    "path/to/family-4096"        the same for a family folder anywhere (or load_tokenizer("path/to/family", 4096))
    "bytes"                      UTF-8 bytes are ids 0..255, then bos 256, eos 257, pad 258
    "gpt2", "hf:<hub id or dir>" a Hugging Face tokenizer through transformers.AutoTokenizer

Every kind round-trips exactly: decode(encode(s)) == s for any str that encodes to UTF-8 (a lone
surrogate raises UnicodeEncodeError). Special ids (bos, eos, pad, and unk for families) decode to nothing.
Every kind has a `fingerprint` (what a saved model records, so that a changed tokenizer is noticed) and
`to_hf()`, the same tokenizer as a `transformers` one (what `export_hf` writes next to a model).
"""
import functools
import hashlib
import html
import json
import os
import re
import sys
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from toolkit.data import hub_unreachable

TOKENIZERS_DIR = Path(__file__).resolve().parent.parent / "tokenizers"
MODEL_FILE = "tokenizer.model"
FAMILY_FILE = "family.json"
# family id layout: these specials, then the 256 byte-fallback pieces, then characters, then merges
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
N_BASE_PIECES = len(SPECIAL_PIECES) + 256
SPACE_MARK = "\u2581"  # sentencepiece's stand-in for a space; decodes back to a space
PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
N_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
ANSI_COLOURS = ("\x1b[30;48;5;153m", "\x1b[30;48;5;223m")  # black on light blue / light orange
ANSI_RESET = "\x1b[0m"
HTML_COLOURS = ("#cfe3ff", "#ffe2c2")
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")  # how byte-fallback vocabularies spell a raw byte
# a Hugging Face folder holds a tokenizer if it has one of these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")


class TokenizerError(ValueError):
    """A tokenizer the user asked for cannot be loaded or built; the message says what to do."""


class Tokenizer:
    """The interface of every kind. Subclasses set name, vocab_size, bos_id, eos_id, pad_id and
    implement _encode (list of str -> list of id lists), _decode (the reverse), token_bytes, _definition
    (the bytes that decide every id, for the fingerprint) and to_hf."""
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of what decides the ids: equal fingerprints encode every text the same way, whatever
        the name or path the tokenizer was loaded by."""
        return hashlib.sha256(self._definition()).hexdigest()

    def _definition(self) -> bytes:
        raise NotImplementedError

    def to_hf(self, model_max_length: int | None = None):
        """This tokenizer as a `transformers` tokenizer that encodes every text to the same ids (with
        add_special_tokens=False; by default it puts bos in front, as training and inference do)."""
        raise NotImplementedError

    def encode(self, text, bos=False, eos=False):
        """Ids of a string, or a list of id lists for a list of strings (encoded in parallel threads)."""
        if isinstance(text, str):
            return self.encode([text], bos, eos)[0]
        texts = list(text)
        batch = self._encode(texts) if texts else []
        if bos or eos:
            head, tail = [self.bos_id] * bos, [self.eos_id] * eos
            batch = [head + ids + tail for ids in batch]
        return batch

    def decode(self, ids):
        """Text of ids (a list, 1-D tensor or array), or a list of texts for a list of id lists (or 2-D).
        Special ids decode to nothing; bytes that form no valid UTF-8 decode to U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return self._decode(ids)
        return self._decode([ids])[0]

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one id stands for (empty for special ids)."""
        raise NotImplementedError

    def bytes_per_token(self, texts) -> float:
        """UTF-8 bytes of the texts per token of their encoding (no bos/eos): higher is more compression."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return sum(len(t.encode()) for t in texts) / sum(map(len, self.encode(texts)))

    def segments(self, text: str) -> list[tuple[str, list[int]]]:
        """The text as its tokens cut it: (piece of text, ids) pairs. Ids that only form whole characters
        together (byte fallback of a character outside the vocabulary) share one segment."""
        segments, pending, pending_ids = [], b"", []
        for token_id in self.encode(text):
            pending += self.token_bytes(token_id)
            pending_ids.append(token_id)
            try:
                piece = pending.decode()
            except UnicodeDecodeError:  # a character split across byte tokens: wait for its other bytes
                continue
            segments.append((piece, pending_ids))
            pending, pending_ids = b"", []
        if pending_ids:
            segments.append((pending.decode(errors="replace"), pending_ids))
        return segments

    def display(self, text: str) -> None:
        """Show how the text is cut, with the ids: HTML in a Jupyter notebook, coloured text in a terminal,
        plain text into a pipe or a file (or with NO_COLOR set)."""
        if _in_notebook():
            from IPython.display import HTML, display
            display(HTML(self.display_html(text)))
        elif sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
            print(self.display_ansi(text))
        else:
            print(self.display_plain(text))

    def display_ansi(self, text: str) -> str:
        """Tokens on alternating background colours, then their ids in the same colours."""
        segments = self.segments(text)

        def paint(k, shown):  # colour each line on its own so the colour never runs past a line end
            return "\n".join(f"{ANSI_COLOURS[k % 2]}{line}{ANSI_RESET}" if line else "" for line in shown.split("\n"))

        pieces = "".join(paint(k, _visible(piece)) for k, (piece, _) in enumerate(segments))
        ids = " ".join(paint(k, " ".join(map(str, ids))) for k, (_, ids) in enumerate(segments))
        return f"{self._summary(text)}\n{pieces}\n{ids}"

    def display_plain(self, text: str) -> str:
        """The same without colours: the tokens between bars, then each token's ids in brackets."""
        segments = self.segments(text)
        pieces = "|".join(_visible(piece) for piece, _ in segments)
        ids = " ".join(f"[{' '.join(map(str, ids))}]" for _, ids in segments)
        return f"{self._summary(text)}\n|{pieces}|\n{ids}"

    def display_html(self, text: str) -> str:
        """The same as display_ansi as an HTML snippet; hovering a token shows its ids."""
        segments = self.segments(text)

        def span(k, content, title=""):
            return f'<span style="background:{HTML_COLOURS[k % 2]}"{title}>{content}</span>'

        pieces = "".join(span(k, html.escape(_visible(piece)), f' title="{" ".join(map(str, ids))}"')
                         for k, (piece, ids) in enumerate(segments))
        ids = " ".join(span(k, " ".join(map(str, ids))) for k, (_, ids) in enumerate(segments))
        return (f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7">'
                f"<div><b>{html.escape(self._summary(text))}</b></div><div>{pieces}</div><div>{ids}</div></div>")

    def _summary(self, text):
        n_bytes, n_tokens = len(text.encode()), len(self.encode(text))
        ratio = f", {n_bytes / n_tokens:.2f} bytes/token" if n_tokens else ""
        return f"{self.name}: {n_tokens} tokens, {n_bytes} bytes{ratio}"

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A nested BPE family (see toolkit/tokenizer_training.py) cut to its first `size` ids:
    unk 0, bos 1, eos 2, pad 3, bytes <0x00>..<0xFF> 4..259, characters, then merges in merge order."""

    def __init__(self, model_file, size: int, name: str):
        proto = read_family_model(model_file)
        min_size, max_size = family_min_size(proto, model_file), len(proto.pieces)
        if not min_size <= size <= max_size:
            raise TokenizerError(f"size {size} is outside {model_file}'s range {min_size}..{max_size} "
                                 f"(specials + bytes + characters .. trained size); pick a size in it")
        del proto.pieces[size:]
        proto.trainer_spec.vocab_size = size
        self._model_bytes = proto.SerializeToString()  # the member's own model: what decides its ids
        self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self.name, self.vocab_size, self.min_size, self.max_size = name, size, min_size, max_size
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
        self._token_bytes = [_piece_bytes(piece) for piece in proto.pieces]
        # a literal U+2581 in the text would come back as a space, so it goes through its byte pieces
        self._space_mark_ids = [len(SPECIAL_PIECES) + b for b in SPACE_MARK.encode()]

    def _encode(self, texts):
        # as bytes, so that a str that is no valid Unicode (a lone surrogate) fails as in every kind: UnicodeEncodeError
        batch = self.sp.encode([text.encode() for text in texts], num_threads=N_THREADS)
        for k, text in enumerate(texts):
            if SPACE_MARK in text:
                batch[k] = self._encode_with_space_marks(text)
        return batch

    def _encode_with_space_marks(self, text):
        parts = self.sp.encode(text.split(SPACE_MARK))
        ids = parts[0]
        for part in parts[1:]:
            ids += self._space_mark_ids + part
        return ids

    def _decode(self, batch):
        return self.sp.decode(batch, num_threads=N_THREADS)

    def token_bytes(self, token_id):
        return self._token_bytes[token_id]

    def _definition(self):
        return self._model_bytes

    def to_hf(self, model_max_length=None):
        """A byte-fallback BPE whose vocabulary spells spaces as spaces (so a literal U+2581 in the text has no
        piece and goes through its bytes, as here), with every split of every merged piece as a merge,
        ranked in merge order: sentencepiece merges the best-ranked adjacent pair that forms a piece, and so
        does this. (Two splits of one piece both on offer at once are taken leftmost first there, by split
        order here; no text tried, stories, web text or random strings, differs.)"""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models
        spelled = [self.sp.id_to_piece(i) if i < N_BASE_PIECES else self.sp.id_to_piece(i).replace(SPACE_MARK, " ")
                   for i in range(self.vocab_size)]
        vocab = {piece: i for i, piece in enumerate(spelled)}
        normal = set(spelled[N_BASE_PIECES:])
        merges = [(piece[:k], piece[k:]) for piece in spelled[self.min_size:]
                  for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=SPECIAL_PIECES[UNK_ID]))
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        return _fast_tokenizer(backend, *(SPECIAL_PIECES[i] for i in (BOS_ID, EOS_ID, PAD_ID, UNK_ID)),
                               model_max_length=model_max_length)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then bos 256, eos 257, pad 258 (vocab_size 259). Encoding is a memory
    copy, so lists need no threads."""

    def __init__(self):
        self.name, self.vocab_size, self.bos_id, self.eos_id, self.pad_id = "bytes", 259, 256, 257, 258

    def _encode(self, texts):
        return [list(text.encode()) for text in texts]

    def _decode(self, batch):
        specials = (self.bos_id, self.eos_id, self.pad_id)
        return [bytes(i for i in ids if i not in specials).decode(errors="replace") for ids in batch]

    def token_bytes(self, token_id):
        return bytes([token_id]) if token_id < 256 else b""

    def _definition(self):
        return b"bytes: ids 0..255 are UTF-8 bytes; bos 256, eos 257, pad 258"

    def to_hf(self, model_max_length=None):
        """GPT-2's byte-level alphabet (one printable character per byte) as a vocabulary without merges."""
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        specials = ("<s>", "</s>", "<pad>")
        vocab = {char: byte for byte, char in bytes_to_unicode().items()}
        vocab.update({token: 256 + k for k, token in enumerate(specials)})
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return _fast_tokenizer(backend, *specials, model_max_length=model_max_length)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer (hub id or local folder) through transformers.AutoTokenizer. Special-token
    text in the input stays text; bos and pad fall back to eos when the tokenizer has none (as GPT-2)."""

    def __init__(self, name_or_path: str, name: str):
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        self.hf = _auto_tokenizer(name_or_path)
        if len(self.hf) <= len(set(self.hf.all_special_ids)):  # what transformers builds from a folder without files
            raise TokenizerError(f"Hugging Face tokenizer {name_or_path!r} has no vocabulary (only "
                                 f"{len(self.hf)} special tokens): its tokenizer files are missing")
        if self.hf.eos_token_id is None:
            raise TokenizerError(f"Hugging Face tokenizer {name_or_path!r} has no eos token; use one that has")
        self.name, self.vocab_size, self.eos_id = name, len(self.hf), self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eos_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self._special_ids = set(self.hf.all_special_ids)
        decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
        # byte-level BPE (GPT-2) spells each byte as one printable character: undo that to get the bytes
        self._byte_of_char = ({c: b for b, c in bytes_to_unicode().items()}
                              if type(decoder).__name__ == "ByteLevel" else None)
        backend_model = getattr(getattr(self.hf, "backend_tokenizer", None), "model", None)
        self._byte_fallback = getattr(backend_model, "byte_fallback", False)

    def _encode(self, texts):
        return self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _decode(self, batch):
        return self.hf.batch_decode(batch, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id):
        if token_id in self._special_ids:
            return b""
        token = self.hf.convert_ids_to_tokens(token_id)
        if self._byte_of_char is not None:
            return bytes(self._byte_of_char[c] for c in token)
        byte = BYTE_PIECE.fullmatch(token) if self._byte_fallback else None
        if byte:  # a byte-fallback piece decodes alone to U+FFFD, not to its byte
            return bytes([int(byte[1], 16)])
        return self.hf.decode([token_id], clean_up_tokenization_spaces=False).encode()

    def _definition(self):
        """The vocabulary (added tokens included), the merges and the special ids: what a tokenizer.json's
        content decides, without the parts of its format that change between library versions."""
        merges = None
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            merges = json.loads(backend.to_str())["model"].get("merges")
            merges = [m.split(" ") if isinstance(m, str) else m for m in merges or []]
        vocab = sorted(self.hf.get_vocab().items(), key=lambda item: item[1])
        return json.dumps([vocab, merges, [self.bos_id, self.eos_id, self.pad_id]]).encode()

    def to_hf(self, model_max_length=None):
        return self.hf


def _auto_tokenizer(name_or_path: str):
    """transformers.AutoTokenizer's tokenizer, or a one-line TokenizerError."""
    from transformers import AutoTokenizer
    if Path(name_or_path).is_dir() and not has_tokenizer_files(name_or_path):
        raise TokenizerError(f"{name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        try:  # a cached tokenizer loads without asking the hub, which retries for a minute when offline
            return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except OSError:
            unreachable = None if Path(name_or_path).is_dir() else hub_unreachable()
            if unreachable is None:
                return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise TokenizerError(f"cannot load Hugging Face tokenizer {name_or_path!r} ({str(e).splitlines()[0]}); "
                             f"run once online to cache it, or pass a local folder as 'hf:/path/to/folder'") from None
    except (ValueError, TypeError, KeyError) as e:  # no tokenizer files, or files transformers cannot read
        reason = " ".join(str(e).split())[:300]
        raise TokenizerError(f"cannot load Hugging Face tokenizer {name_or_path!r}: {reason}") from None
    raise TokenizerError(f"cannot load Hugging Face tokenizer {name_or_path!r}: it is not cached and the hub cannot be "
                         f"reached ({unreachable}); run once online to cache it, or pass a local folder as "
                         f"'hf:/path/to/folder'")


def has_tokenizer_files(directory) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def _fast_tokenizer(backend, bos: str, eos: str, pad: str, unk: str | None = None, model_max_length=None):
    """A transformers tokenizer around a `tokenizers` one whose special tokens are in its vocabulary;
    it puts bos in front by default, as training and inference.py do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, clean_up_tokenization_spaces=False, **extra)


def load_tokenizer(spec: str, size: int | None = None) -> Tokenizer:
    """The tokenizer a name stands for (see the module docstring); `size` goes with a family folder or name
    that has no size in it. Any size from the family's minimum to its trained size works."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        return HuggingFaceTokenizer("gpt2", name="gpt2")
    if spec.startswith("hf:"):
        return HuggingFaceTokenizer(spec[len("hf:"):], name=spec)
    family, name = spec, f"{spec}-{size}"
    if size is None:
        family, _, size_text = spec.rpartition("-")
        if not (family and size_text.isdigit()):
            raise TokenizerError(f"tokenizer {spec!r} has no size: ask for '<family>-<size>', one of "
                                 f"{', '.join(available_tokenizers())}, or 'hf:<hub id or folder>'")
        size, name = int(size_text), spec
    folder = Path(family) if (Path(family) / MODEL_FILE).is_file() else TOKENIZERS_DIR / family
    if not (folder / MODEL_FILE).is_file():
        raise TokenizerError(f"unknown tokenizer family {family!r} (no {folder / MODEL_FILE}); known: "
                             f"{', '.join(available_tokenizers())}; or train one with "
                             f"python -m toolkit.tokenizer_training")
    return SentencePieceTokenizer(folder / MODEL_FILE, size, name=name)


def available_tokenizers() -> list[str]:
    """Names of the shipped tokenizers: every listed size of every family under tokenizers/, and bytes."""
    names = []
    for family_file in sorted(TOKENIZERS_DIR.glob(f"*/{FAMILY_FILE}")):
        sizes = json.loads(family_file.read_text())["sizes"]
        names += [f"{family_file.parent.name}-{size}" for size in sizes]
    return names + ["bytes"]


def read_family_model(model_file) -> sentencepiece_model_pb2.ModelProto:
    from google.protobuf.message import DecodeError
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except (DecodeError, OSError) as e:
        raise TokenizerError(f"cannot read {model_file} as a sentencepiece model ({e}); retrain the family") from e
    return proto


def family_min_size(proto, model_file) -> int:
    """The number of specials, bytes and characters, checking the nested layout that makes prefixes valid."""
    types = [piece.type for piece in proto.pieces]
    n_chars = next((k for k, piece in enumerate(proto.pieces[N_BASE_PIECES:]) if len(piece.piece) > 1),
                   len(proto.pieces) - N_BASE_PIECES)
    min_size = N_BASE_PIECES + n_chars
    nested = (types[:N_BASE_PIECES] == [PIECE.UNKNOWN] + [PIECE.CONTROL] * 3 + [PIECE.BYTE] * 256
              and [piece.piece for piece in proto.pieces[:len(SPECIAL_PIECES)]] == list(SPECIAL_PIECES)
              and all(piece.type == PIECE.NORMAL for piece in proto.pieces[N_BASE_PIECES:])
              and all(len(piece.piece) > 1 for piece in proto.pieces[min_size:]))
    if not nested:
        raise TokenizerError(f"{model_file} is not a nested family model (specials, bytes, characters, merges); "
                             f"train one with python -m toolkit.tokenizer_training")
    return min_size


def _piece_bytes(piece) -> bytes:
    if piece.type == PIECE.BYTE:  # spelled "<0xAB>"
        return bytes([int(piece.piece[3:5], 16)])
    if piece.type == PIECE.NORMAL:
        return piece.piece.replace(SPACE_MARK, " ").encode()
    return b""


def _visible(text: str) -> str:
    """Newlines as ↵ plus a line break and other invisible characters as escapes, so every token shows."""
    return "".join("↵\n" if c == "\n" else c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in text)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"
