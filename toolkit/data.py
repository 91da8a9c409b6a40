"""Text in, batches out: documents from the hub, the texts shipped in data/ or local files, tokenized once
into cached uint16/uint32 token shards with a document index, then packed windows drawn without replacement
in a seeded order.

Cache layout (data_cache/<source>-<key>/): <split>_<n>.bin token shards, <split>_docs.npy (where each
document starts in the split's token stream), <split>_bytes.npy (UTF-8 bytes per document) and
meta.json, written last: a folder without it is an interrupted build and is rebuilt.
"""
import functools
import glob
import gzip
import hashlib
import itertools
import json
import os
import shutil
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DATA_CACHE", ROOT / "data_cache"))
SEPARATOR = "<|endoftext|>"
SHARD_TOKENS = 2 ** 27  # 256 MB of uint16 per shard file
ENCODE_BATCH_BYTES = 4 << 20  # text handed to the tokenizer's parallel encode at a time
FORMAT_VERSION = 1  # bump when the cache layout changes

# Datasets by name: (hub repository, config, data file, text column). TinyStoriesV2 is one text file
# with <|endoftext|> lines; fineweb-edu's sample is parquet with a "text" column. Both are streamed.
# Any other hub dataset with a "text" column: "hf:owner/name" or "hf:owner/name:config".
HUB_DATASETS = {
    "tinystories": ("roneneldan/TinyStories", None, "TinyStoriesV2-GPT4-train.txt", "text"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", None, "text"),
}
# Texts shipped with the project (data/README.md says where they come from), usable wherever a data spec is.
EMBEDDED = {
    "tinystories-sample": ROOT / "data" / "tinystories" / "train.txt.gz",  # 5,099 TinyStories stories
    "tinystories-heldout": ROOT / "data" / "tinystories" / "heldout.txt.gz",  # 650 other stories, for evaluation
    "shakespeare": ROOT / "data" / "tinyshakespeare" / "input.txt.gz",  # Tiny Shakespeare, one whole text
}
KINDS = (".txt", ".jsonl", ".parquet")  # .txt and .jsonl may also be gzipped: name.txt.gz
LOCAL_EXAMPLE = ("--data=tinystories-sample (stories shipped in data/) or local files, folders or globs of "
                 "txt, jsonl or parquet (comma-separated)")
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub before saying it cannot be reached


def hub_source(spec: str):
    """(repository, config, data file, text column) of a hub dataset spec, or None for local data."""
    if spec in HUB_DATASETS:
        return HUB_DATASETS[spec]
    if spec.startswith("hf:"):
        repo, _, config = spec[3:].partition(":")
        return repo, config or None, None, "text"
    return None


class DataError(ValueError):
    """Data that cannot be found or read; the message is one line that says what to do."""


# --- documents ---

def file_kind(path: Path) -> str | None:
    """.txt, .jsonl or .parquet for a data file (name.txt.gz is a gzipped .txt), else None."""
    unzipped = path.name.removesuffix(".gz")
    kind = Path(unzipped).suffix
    return kind if kind in KINDS and not (kind == ".parquet" and unzipped != path.name) else None


def open_text(path: Path):
    """A text file for reading, decompressed on the fly when its name ends in .gz."""
    if Path(path).suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def resolve(spec: str) -> list[Path]:
    """The data files of a local spec: shipped names (EMBEDDED), paths, folders or globs, several separated
    by commas."""
    files = []
    for part in spec.split(","):
        path = Path(part).expanduser()
        if part in EMBEDDED:
            if not EMBEDDED[part].is_file():
                raise DataError(f"the shipped text {part!r} is missing ({EMBEDDED[part]}): restore the "
                                f"project's data/ folder (git checkout -- data)")
            found = [EMBEDDED[part]]
        elif path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and file_kind(p)]
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(part), recursive=True)) if Path(p).is_file()]
        if not found:
            raise DataError(f"no data at {part!r}: give a dataset name ({', '.join(HUB_DATASETS)}), a shipped "
                            f"text ({', '.join(EMBEDDED)}) or local files, folders or globs of txt, jsonl or parquet "
                            f"(comma-separated)")
        files += found
    return files


def read_text(spec: str) -> str:
    """The whole text of a local spec's text files, decompressed and joined (raw text, not split into documents)."""
    files = resolve(spec)
    if not all(file_kind(path) == ".txt" for path in files):
        raise DataError(f"{spec!r} is not all text files (.txt or .txt.gz): read it with read_documents")
    return "".join(doc for path in files for doc in read_file(path, "whole"))


def txt_layout(path: Path, text_format: str) -> str:
    """'documents' (split at <|endoftext|> lines), 'lines' (one document per line) or 'whole'. Auto:
    documents when the file has separator lines, else lines when it has no blank line (a file of one
    story per line), else whole (a single text such as Tiny Shakespeare)."""
    if text_format != "auto":
        return text_format
    blank_before, has_blank = False, False  # blank lines at the very end do not count
    with open_text(path) as f:
        for line in f:
            if line.strip() == SEPARATOR:
                return "documents"
            has_blank = has_blank or (blank_before and bool(line.strip()))
            blank_before = not line.strip()
    return "whole" if has_blank else "lines"


class WholeText(str):
    """A source that is one long text rather than a set of documents (split by position, not by document)."""


def read_txt(path: Path, layout: str):
    with open_text(path) as f:
        if layout == "whole":
            yield WholeText(f.read())
            return
        if layout == "lines":
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
            return
        yield from _join_separated_lines(line.rstrip("\n") for line in f)


def read_file(path: Path, text_format: str):
    """Documents of one local file."""
    try:
        if file_kind(path) == ".jsonl":
            with open_text(path) as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise DataError(f"{path}:{number} is not a JSON object with a 'text' field") from None
        elif file_kind(path) == ".parquet":
            import pyarrow.parquet as pq
            table = pq.ParquetFile(path)
            if "text" not in table.schema_arrow.names:
                raise DataError(f"{path} has no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
            for batch in table.iter_batches(columns=["text"], batch_size=1024):
                yield from batch.column(0).to_pylist()
        else:
            yield from read_txt(path, txt_layout(path, text_format))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path} is not a complete gzip file ({e}): download or derive it again") from None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None. Offline mode (HF_HUB_OFFLINE,
    HF_DATASETS_OFFLINE), or no TCP connection to HF_ENDPOINT (or its proxy) within HUB_PROBE_SECONDS: a
    short probe, so that no network means one line at once rather than a minute of retries in `datasets`."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    failure = []

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection(address, timeout=HUB_PROBE_SECONDS).close()
        except OSError as e:
            failure.append(e.strerror or str(e) or type(e).__name__)
        else:
            failure.append(None)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    reason = failure[0] if failure else f"no answer in {HUB_PROBE_SECONDS:g} s"
    return None if reason is None else f"{address[0]}:{address[1]}: {reason}"


def read_hub(name: str, max_docs: int | None):
    """Documents of a hub dataset, streamed (so nothing is held in memory or fully downloaded)."""
    repo, config, data_file, column = hub_source(name)
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(f"cannot stream {name!r} ({repo}) from the Hugging Face hub ({unreachable}) and no "
                        f"tokenized copy is cached: connect once, or train on local files: {LOCAL_EXAMPLE}")
    try:
        import datasets
        stream = datasets.load_dataset(repo, config, data_files=data_file, split="train", streaming=True)
        rows = iter(stream)
        first = next(rows)
    except Exception as e:  # offline, hub down, name gone: all mean "use local files" to a user
        raise DataError(f"cannot stream {name!r} ({repo}) from the Hugging Face hub ({type(e).__name__}) and no "
                        f"tokenized copy is cached: connect once, or train on local files: {LOCAL_EXAMPLE}") from None
    if column not in first:
        raise DataError(f"{repo} has no {column!r} field (fields: {', '.join(first)})")
    rows = (r[column] for r in itertools.chain([first], rows))
    docs = _join_separated_lines(rows) if data_file and data_file.endswith(".txt") else rows
    yield from itertools.islice(docs, max_docs)


def _join_separated_lines(lines):
    """A text file streamed as lines back into its <|endoftext|>-separated documents."""
    lines_of_doc = []
    for line in lines:
        if line.strip() == SEPARATOR:
            doc = "\n".join(lines_of_doc).strip("\n")
            if doc:
                yield doc
            lines_of_doc = []
        else:
            lines_of_doc.append(line)
    doc = "\n".join(lines_of_doc).strip("\n")
    if doc:
        yield doc


def is_validation(text: str, val_fraction: float) -> bool:
    """A deterministic split by document content: the same document always lands on the same side,
    whatever the order or the number of workers (and duplicates never straddle the split)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2 ** 64


def read_documents(spec: str, text_format: str = "auto", max_docs: int | None = None):
    """Every document of a source: a dataset name, hf:ID, shipped text name, or local file, folder or glob."""
    if hub_source(spec) is not None:
        yield from read_hub(spec, max_docs)
        return
    docs = (doc for path in resolve(spec) for doc in read_file(path, text_format))
    yield from itertools.islice(docs, max_docs)


def split_documents(spec: str, text_format: str, val_fraction: float, max_docs: int | None):
    """(text, is_validation) for every document of a source. A single whole text (Tiny Shakespeare)
    gives its last `val_fraction` of characters, cut at a line end, to validation, as nanoGPT does."""
    for doc in read_documents(spec, text_format, max_docs):
        if isinstance(doc, WholeText) and val_fraction > 0:
            end = int(len(doc) * (1 - val_fraction))
            cut = doc.rfind("\n", 0, end) + 1 or end
            yield str(doc[:cut]), False
            yield str(doc[cut:]), True
        else:
            yield doc, is_validation(doc, val_fraction)


# --- data identity ---

def data_sha256(spec: str, max_docs: int | None = None) -> str:
    """What identifies the raw data: sha256 over the bytes of its files in reading order (as stored, so a
    .gz file's compressed bytes), or for a hub dataset over its id, config, file and max_docs."""
    hub = hub_source(spec)
    if hub is not None:
        return hashlib.sha256(json.dumps([*hub, max_docs]).encode()).hexdigest()
    return files_sha256(tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in resolve(spec)))


@functools.lru_cache(maxsize=32)
def files_sha256(files: tuple) -> str:
    """sha256 of the files' bytes one after another; keyed by (path, size, mtime) so each is read once."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def portable_spec(spec: str) -> str:
    """A spec as a run records it: names stay names; paths become relative to the project root when inside
    it, else absolute, so that the run can be resumed from any working directory (see absolute_spec)."""
    if hub_source(spec) is not None:
        return spec
    parts = []
    for part in spec.split(","):
        if part not in EMBEDDED:
            path = Path(part).expanduser().resolve()
            part = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        parts.append(part)
    return ",".join(parts)


def absolute_spec(spec: str) -> str:
    """A recorded spec read back: relative paths are relative to the project root."""
    if hub_source(spec) is not None:
        return spec
    return ",".join(part if part in EMBEDDED or Path(part).expanduser().is_absolute() else str(ROOT / part)
                    for part in spec.split(","))


def data_record(spec: str, max_docs: int | None = None) -> dict:
    """What a run's train_config.json records about its data besides the settings: the spec as
    portable_spec writes it, and data_sha256."""
    return {"data": portable_spec(spec), "data_sha256": data_sha256(spec, max_docs)}


def check_same_data(saved: dict, current: dict):
    """Refuse to continue a run (train_config.json `saved`) on other data than it was trained on: other
    bytes, or other reading settings. Runs recorded before data hashes only have their settings compared."""
    for key in ("text_format", "max_docs", "val_fraction"):
        if key in saved and saved[key] != current[key]:
            raise DataError(f"--resume needs the run's data as it was: {key} was {saved[key]!r}, now "
                            f"{current[key]!r}; drop --{key} or start a new --name")
    if saved.get("data_sha256", current["data_sha256"]) == current["data_sha256"]:
        return
    if saved["data"] != current["data"]:
        raise DataError(f"--resume needs the run's data: it was trained on {saved['data']!r}, not "
                        f"{current['data']!r}; drop --data or start a new --name")
    raise DataError(f"--resume needs the run's data as it was: {saved['data']!r} has changed since (sha256 "
                    f"{saved['data_sha256'][:12]}... then, {current['data_sha256'][:12]}... now); restore it "
                    f"or start a new --name")


# --- token shards ---


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies the tokenizer: its own fingerprint, the one a saved model records."""
    return tokenizer.fingerprint


def cache_dir(spec, tokenizer, text_format, val_fraction, max_docs) -> Path:
    key = json.dumps([FORMAT_VERSION, data_sha256(spec, max_docs), max_docs, tokenizer_fingerprint(tokenizer),
                      text_format, val_fraction])
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(spec.split(",")[0].rstrip("/")).name)[:40]
    return CACHE / f"{slug}-{tokenizer.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class ShardWriter:
    """Appends documents' tokens to <split>_<n>.bin files, starting a new file every SHARD_TOKENS."""

    def __init__(self, directory: Path, split: str, dtype):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shards, self.doc_starts, self.doc_bytes = [], [], []
        self.tokens, self.file = 0, None

    def add(self, ids: np.ndarray, n_bytes: int):
        self.doc_starts.append(self.tokens)
        self.doc_bytes.append(n_bytes)
        while len(ids):
            if self.file is None or self.shards[-1][1] == SHARD_TOKENS:
                self.close_file()
                name = f"{self.split}_{len(self.shards)}.bin"
                self.file = open(self.directory / name, "wb")
                self.shards.append([name, 0])
            room = SHARD_TOKENS - self.shards[-1][1]
            part, ids = ids[:room], ids[room:]
            self.file.write(part.astype(self.dtype).tobytes())
            self.shards[-1][1] += len(part)
            self.tokens += len(part)

    def close_file(self):
        if self.file is not None:
            self.file.close()

    def finish(self) -> dict:
        self.close_file()
        np.save(self.directory / f"{self.split}_docs.npy", np.array(self.doc_starts, dtype=np.int64))
        np.save(self.directory / f"{self.split}_bytes.npy", np.array(self.doc_bytes, dtype=np.int64))
        return {"shards": self.shards, "tokens": self.tokens, "documents": len(self.doc_starts),
                "bytes": int(sum(self.doc_bytes))}


def build_shards(directory: Path, documents, tokenizer, progress=True) -> dict:
    """Tokenize documents in batches (the tokenizer encodes a batch on all cores) into both splits."""
    from tqdm import tqdm
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    writers = {False: ShardWriter(directory, "train", dtype), True: ShardWriter(directory, "val", dtype)}
    # drawn after a second: a source that fails at once (the hub offline) leaves only its one-line error
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress, delay=1)

    def flush(batch):
        for (text, val), ids in zip(batch, tokenizer.encode([t for t, _ in batch], bos=True, eos=True)):
            n_bytes = len(text.encode("utf-8"))
            writers[val].add(np.asarray(ids), n_bytes)
            bar.update(n_bytes)

    batch, size = [], 0
    for text, val in documents:
        batch.append((text, val))
        size += len(text)
        if size >= ENCODE_BATCH_BYTES:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    bar.close()
    return {"dtype": np.dtype(dtype).name, "train": writers[False].finish(), "val": writers[True].finish()}


def prepare_data(spec: str, tokenizer, text_format="auto", val_fraction=0.1, max_docs=None, progress=True) -> Path:
    """The cached token shards of `spec` under `tokenizer`, built on first use."""
    directory = cache_dir(spec, tokenizer, text_format, val_fraction, max_docs)
    if (directory / "meta.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = build_shards(tmp, split_documents(spec, text_format, val_fraction, max_docs), tokenizer, progress)
        if meta["train"]["tokens"] == 0:
            raise DataError(f"{spec!r} gave no training text ({meta['val']['documents']} documents, all held out "
                            f"for validation): use more documents or a lower val_fraction")
        meta.update(source=spec, tokenizer=tokenizer.name, text_format=text_format, val_fraction=val_fraction,
                    max_docs=max_docs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def publish(tmp: Path, directory: Path):
    """Move a finished build into place. Another process (a parallel run of an experiment) may have
    published the same shards meanwhile: theirs stay, for they may be reading them already. A folder
    without meta.json is an interrupted build and is replaced."""
    for attempt in range(2):
        try:
            tmp.rename(directory)  # atomic; fails where directory exists and is not empty
            return
        except OSError:
            if (directory / "meta.json").is_file():
                return
            if attempt == 0:
                shutil.rmtree(directory, ignore_errors=True)
    raise DataError(f"cannot move the token cache into {directory}: remove that folder and run again")


class TokenData:
    """One split's token stream (memory-mapped shards read as one sequence) and its document index."""

    def __init__(self, directory: Path, split: str):
        meta = json.loads((Path(directory) / "meta.json").read_text())
        self.meta = meta[split]
        dtype = np.dtype(meta["dtype"])
        self.shards = [np.memmap(Path(directory) / name, dtype=dtype, mode="r", shape=(n,))
                       for name, n in self.meta["shards"] if n > 0]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.doc_starts = np.load(Path(directory) / f"{split}_docs.npy")
        self.doc_bytes = np.load(Path(directory) / f"{split}_bytes.npy")

    def __len__(self):
        return int(self.shard_starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start..start+length as int64, across shard boundaries."""
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        offset = start - self.shard_starts[shard]
        out = self.shards[shard][offset:offset + length]
        while len(out) < length:  # rare: the window runs into the next shard
            shard += 1
            out = np.concatenate([out, self.shards[shard][:length - len(out)]])
        return out.astype(np.int64)

    def doc_ids(self, start: int, length: int) -> np.ndarray:
        """The document index of each token start..start+length."""
        return np.searchsorted(self.doc_starts, np.arange(start, start + length), side="right") - 1


# --- batches ---

def read_windows(data: TokenData, windows, seq_len: int, with_doc_ids=False, offset: int = 0) -> dict:
    """The batch of windows number `windows` (window w = tokens offset + w*seq_len .. + seq_len + 1):
    input_ids, targets shifted by one, and the document of each input token if asked for."""
    starts = [offset + int(w) * seq_len for w in windows]
    tokens = torch.from_numpy(np.stack([data.read(start, seq_len + 1) for start in starts]))
    batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}
    if with_doc_ids:
        batch["doc_ids"] = torch.from_numpy(np.stack([data.doc_ids(start, seq_len) for start in starts]))
    return batch


class Batches:
    """Packed windows of seq_len + 1 tokens (inputs and shifted targets) over a split's token stream.

    The windows tile the stream; each epoch visits all of them once in an order seeded by
    (seed, epoch). With shift_windows, each epoch also starts the tiling at its own seeded offset in
    [0, seq_len) (the first at 0), so a text seen for several epochs is cut into different windows each
    time; every epoch then has the windows that fit at any offset. A global batch is
    world_size * grad_accum * batch_size windows; rank r's micro-batch m takes its slice
    (m * world_size + r), so every rank reads different windows and together they read exactly what
    one process with the same global batch would. `state()` / `load_state()` make the position exact
    for resume.
    """

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, seed: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, doc_ids: bool = False, shift_windows: bool = False):
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.grad_accum, self.rank, self.world_size, self.with_doc_ids = grad_accum, rank, world_size, doc_ids
        self.shift_windows = shift_windows
        # a shifted tiling must fit at any offset up to seq_len - 1
        self.n_windows = (len(data) - (seq_len if shift_windows else 1)) // seq_len
        self.global_batch = world_size * grad_accum * batch_size
        self.batches_per_epoch = self.n_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(data)} training tokens make {self.n_windows} windows of {seq_len}, fewer than one "
                            f"global batch of {self.global_batch}: "
                            f"use more data or a smaller batch_size/context_length")
        self.epoch, self.index, self._order = 0, 0, None

    def order(self) -> tuple[torch.Tensor, int]:
        """This epoch's window order and the offset of its tiling."""
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n_windows, generator=generator)
            offset = 0
            if self.shift_windows and self.epoch > 0:
                offset = int(torch.randint(self.seq_len, (1,), generator=generator))
            self._order = (self.epoch, order, offset)
        return self._order[1], self._order[2]

    def next(self) -> list[dict]:
        """This rank's grad_accum micro-batches of the next global batch."""
        order, offset = self.order()
        windows = order[self.index * self.global_batch:(self.index + 1) * self.global_batch]
        micro = [windows[(m * self.world_size + self.rank) * self.batch_size:][:self.batch_size]
                 for m in range(self.grad_accum)]
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return [read_windows(self.data, w, self.seq_len, self.with_doc_ids, offset) for w in micro]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict):
        self.epoch, self.index = state["epoch"], state["index"]


def validation_batches(data: TokenData, seq_len: int, batch_size: int, n_windows_wanted: int, with_doc_ids=False):
    """A fixed validation set: n_windows_wanted windows (or all there are) spread evenly over the split,
    in batches of batch_size."""
    n_windows = (len(data) - 1) // seq_len
    if n_windows <= 0:
        raise DataError(f"the validation split has {len(data)} tokens, too few for one window of {seq_len}: "
                        f"raise val_fraction or use more data")
    count = min(n_windows, n_windows_wanted)
    picks = np.linspace(0, n_windows - 1, count).round().astype(int)
    return [read_windows(data, picks[i:i + batch_size], seq_len, with_doc_ids) for i in range(0, count, batch_size)]
