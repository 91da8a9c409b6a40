"""Data: reading every source format, the texts shipped in data/, data identity and resume checks, the hub
offline, the document split, token shards and their cache, batches."""
import gzip
import hashlib
import json
import shutil
import socket
import sys
import time

import numpy as np
import pytest
import torch

from config import ConfigError, ModelConfig, TrainConfig
from conftest import ROOT
from toolkit import checkpoint, data
from toolkit.data import (
    EMBEDDED,
    Batches,
    DataError,
    TokenData,
    is_validation,
    prepare_data,
    read_documents,
    read_text,
    resolve,
    split_documents,
    validation_batches,
)
from toolkit.tokenizer import TOKENIZERS_DIR, load_tokenizer

DOCS = ["Once upon a time there was a cat.\nIt liked milk.", "A dog ran.", "Ünïcode 😀 story\n\nwith a blank line."]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")


def write_sources(folder):
    import pandas
    folder.mkdir()
    (folder / "a_separated.txt").write_text("".join(d + "\n<|endoftext|>\n" for d in DOCS))
    (folder / "b_lines.txt").write_text("\n".join(d.replace("\n", " ") for d in DOCS) + "\n\n")
    (folder / "c_records.jsonl").write_text("".join(json.dumps({"text": d, "id": k}) + "\n"
                                                    for k, d in enumerate(DOCS)))
    pandas.DataFrame({"text": DOCS, "other": [1, 2, 3]}).to_parquet(folder / "d_table.parquet")
    (folder / "e_whole.txt").write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n")
    return folder


def test_every_format_file_folder_and_glob(tmp_path):
    folder = write_sources(tmp_path / "src")
    one_line = [d.replace("\n", " ") for d in DOCS]
    assert list(read_documents(str(folder / "a_separated.txt"))) == DOCS
    assert list(read_documents(str(folder / "b_lines.txt"))) == one_line
    assert list(read_documents(str(folder / "c_records.jsonl"))) == DOCS
    assert list(read_documents(str(folder / "d_table.parquet"))) == DOCS
    assert list(read_documents(str(folder / "e_whole.txt"))) == [(folder / "e_whole.txt").read_text()]
    assert list(read_documents(str(folder / "b_lines.txt"), text_format="whole")) == [
        (folder / "b_lines.txt").read_text()]
    everything = list(read_documents(str(folder)))  # a folder: its files in name order
    assert everything[:12] == DOCS + one_line + DOCS + DOCS and len(everything) == 13
    assert list(read_documents(str(folder / "[ac]_*"))) == DOCS + DOCS  # a glob
    assert list(read_documents(f"{folder / 'c_records.jsonl'},{folder / 'a_*'}")) == DOCS + DOCS  # several
    assert list(read_documents(str(folder), max_docs=4)) == DOCS + one_line[:1]


def test_bad_sources_give_one_line_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for spec, message in [(str(tmp_path / "missing.txt"), "no data at"), (str(tmp_path / "bad.jsonl"), "'text' field"),
                          (str(tmp_path / "latin1.txt"), "not UTF-8")]:
        with pytest.raises(DataError, match=message) as error:
            list(read_documents(spec))
        assert "\n" not in str(error.value)


def test_hub_dataset_failing_names_the_shipped_alternative(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "hub_unreachable", lambda: None)  # the hub answers, then datasets fails
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"\(ConnectionError\).*--data=tinystories-sample") as error:
        list(read_documents("tinystories"))
    assert "\n" not in str(error.value)


def test_hub_text_file_is_streamed_back_into_documents(monkeypatch):
    """TinyStoriesV2 arrives as lines of one text file; its <|endoftext|> lines separate the stories."""
    import datasets
    monkeypatch.setattr(data, "hub_unreachable", lambda: None)
    lines = ["Story one.", "", "Still one.", "<|endoftext|>", "Story two.", "<|endoftext|>", "Three"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"text": line} for line in lines])
    assert list(read_documents("tinystories")) == ["Story one.\n\nStill one.", "Story two.", "Three"]
    assert list(read_documents("tinystories", max_docs=2)) == ["Story one.\n\nStill one.", "Story two."]


def test_split_is_deterministic_by_document_and_whole_texts_split_at_the_end(tmp_path):
    docs = [f"story number {k}" for k in range(4000)]
    flags = [is_validation(d, 0.1) for d in docs]
    assert flags == [is_validation(d, 0.1) for d in docs] and 0.08 < np.mean(flags) < 0.12
    assert not any(is_validation(d, 0.0) for d in docs)
    text = "".join(f"line {k}\n" for k in range(1000))
    (tmp_path / "play.txt").write_text(text.replace("line 5\n", "line 5\n\n"))  # a blank line: one whole text
    (train, is_val_a), (val, is_val_b) = split_documents(str(tmp_path / "play.txt"), "auto", 0.1, None)
    assert (is_val_a, is_val_b) == (False, True) and train + val == (tmp_path / "play.txt").read_text()
    assert val.startswith("line 9") and train.endswith("\n") and abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01


def test_shards_hold_each_document_with_bos_and_eos(tmp_path):
    folder = write_sources(tmp_path / "src")
    tokenizer = load_tokenizer("bytes")
    directory = prepare_data(str(folder / "c_records.jsonl"), tokenizer, val_fraction=0.0, progress=False)
    train = TokenData(directory, "train")
    stream = train.read(0, len(train))
    expected = [t for d in DOCS for t in tokenizer.encode(d, bos=True, eos=True)]
    assert stream.tolist() == expected and train.meta["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert train.doc_starts.tolist() == [0, len(DOCS[0].encode()) + 2,
                                         len(DOCS[0].encode()) + len(DOCS[1].encode()) + 4]
    assert train.doc_ids(0, len(train)).tolist() == [k for k, d in enumerate(DOCS) for _ in range(len(d.encode()) + 2)]
    assert np.dtype(json.loads((directory / "meta.json").read_text())["dtype"]) == np.uint16


def test_windows_read_across_shard_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHARD_TOKENS", 7)
    (tmp_path / "t.txt").write_text("".join(f"doc {k} " * 3 + "\n<|endoftext|>\n" for k in range(30)))
    tokenizer = load_tokenizer("bytes")
    directory = prepare_data(str(tmp_path / "t.txt"), tokenizer, val_fraction=0.0, progress=False)
    train = TokenData(directory, "train")
    assert len(train.shards) > 10
    stream = np.concatenate([np.asarray(s) for s in train.shards]).astype(np.int64)
    for start, length in [(0, 30), (5, 9), (13, 40), (len(train) - 10, 10)]:
        assert train.read(start, length).tolist() == stream[start:start + length].tolist()


def test_large_vocabularies_get_uint32(tmp_path):
    class WideTokenizer:  # ids above 65535 must survive
        name, vocab_size, bos_id, eos_id, fingerprint = "wide", 70000, 69998, 69999, "wide"

        def encode(self, texts, bos, eos):
            return [[69998] + [65536 + ord(c) % 1000 for c in t] + [69999] for t in texts]

        def token_bytes(self, i):
            return b"x"

    (tmp_path / "t.txt").write_text("abc\n<|endoftext|>\nde\n<|endoftext|>\n")
    directory = prepare_data(str(tmp_path / "t.txt"), WideTokenizer(), val_fraction=0.0, progress=False)
    assert json.loads((directory / "meta.json").read_text())["dtype"] == "uint32"
    assert TokenData(directory, "train").read(0, 3).tolist() == [69998, 65536 + ord("a"), 65536 + ord("b")]


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "t.txt"
    source.write_text("one\n<|endoftext|>\ntwo\n<|endoftext|>\n")
    tokenizer = load_tokenizer("bytes")
    first = prepare_data(str(source), tokenizer, progress=False)
    calls = []
    real_build = data.build_shards
    monkeypatch.setattr(data, "build_shards", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    assert prepare_data(str(source), tokenizer, progress=False) == first and calls == []
    assert prepare_data(str(source), load_tokenizer("tinystories-1024"), progress=False) != first  # other tokenizer
    source.write_text("three\n<|endoftext|>\n")
    changed = prepare_data(str(source), tokenizer, progress=False)
    assert changed != first and len(calls) == 2
    (changed / "meta.json").unlink()  # an interrupted build is never reused
    prepare_data(str(source), tokenizer, progress=False)
    assert len(calls) == 3


def test_a_cache_published_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two runs of a parallel experiment tokenize the same text at once: the one that finishes second
    keeps the first one's shards (which that run may already be reading) and discards its own."""
    source = tmp_path / "t.txt"
    source.write_text("one\n<|endoftext|>\ntwo\n<|endoftext|>\nthree\n<|endoftext|>\n")
    tokenizer = load_tokenizer("bytes")
    real_build, theirs = data.build_shards, {}

    def build_while_another_finishes(folder, *args, **kwargs):
        meta = real_build(folder, *args, **kwargs)
        final = folder.with_name(folder.name.rsplit(".tmp", 1)[0])
        shutil.copytree(folder, final)  # the other process's finished build, published first
        (final / "meta.json").write_text(json.dumps(meta))
        theirs["inode"] = (final / "meta.json").stat().st_ino
        theirs["reader"] = TokenData(final, "train")  # and already reading it
        return meta

    monkeypatch.setattr(data, "build_shards", build_while_another_finishes)
    directory = prepare_data(str(source), tokenizer, val_fraction=0.0, progress=False)
    assert (directory / "meta.json").stat().st_ino == theirs["inode"]  # theirs, not replaced by ours
    assert theirs["reader"].read(0, 4).tolist() == TokenData(directory, "train").read(0, 4).tolist()
    assert [p for p in directory.parent.iterdir() if ".tmp" in p.name] == []  # ours is gone


def token_data(tmp_path, n_tokens=1000):
    (tmp_path / "t.txt").write_text("x" * (n_tokens - 2))  # one document: bos + text + eos
    return TokenData(prepare_data(str(tmp_path / "t.txt"), load_tokenizer("bytes"), text_format="lines",
                                  val_fraction=0.0, progress=False), "train")


def window_starts(batch, stream):
    """Which window each row of a batch is (its inputs are stream[w*T : w*T+T])."""
    T = batch["input_ids"].shape[1]
    index = {tuple(stream[w * T:w * T + T]): w for w in range((len(stream) - 1) // T)}
    return [index[tuple(row.tolist())] for row in batch["input_ids"]]


def test_batches_draw_every_window_once_per_epoch_in_a_seeded_order(tmp_path):
    rng = np.random.default_rng(0)  # no two windows alike, so each can be recognised
    (tmp_path / "t.txt").write_text("".join(chr(c) for c in rng.integers(33, 127, 998)))
    train = TokenData(prepare_data(str(tmp_path / "t.txt"), load_tokenizer("bytes"), text_format="lines",
                                   val_fraction=0.0, progress=False), "train")
    stream = train.read(0, len(train)).tolist()
    T, B = 10, 3
    batches = Batches(train, T, B, seed=5)
    assert batches.n_windows == 99 and batches.batches_per_epoch == 33
    seen = []
    for _ in range(33):
        (batch,) = batches.next()
        assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
        seen += window_starts(batch, stream)
    assert sorted(seen) == list(range(99))  # without replacement
    assert batches.state() == {"epoch": 1, "index": 0}
    again = Batches(train, T, B, seed=5)
    assert [window_starts(again.next()[0], stream) for _ in range(33)] == [seen[i:i + 3] for i in range(0, 99, 3)]
    other = Batches(train, T, B, seed=6)
    assert [w for _ in range(33) for w in window_starts(other.next()[0], stream)] != seen
    second_epoch = [w for _ in range(33) for w in window_starts(batches.next()[0], stream)]
    assert sorted(second_epoch) == list(range(99)) and second_epoch != seen


def test_shifted_windows_cut_each_later_epoch_at_its_own_offset_and_resume_exactly(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "t.txt").write_text("".join(chr(c) for c in rng.integers(33, 127, 998)))
    train = TokenData(prepare_data(str(tmp_path / "t.txt"), load_tokenizer("bytes"), text_format="lines",
                                   val_fraction=0.0, progress=False), "train")
    stream = train.read(0, len(train)).tolist()
    T, B = 10, 3
    batches = Batches(train, T, B, seed=5, shift_windows=True)
    assert batches.n_windows == (len(stream) - T) // T  # fits at any offset below T
    offsets = []
    for epoch in range(4):
        starts = []
        for _ in range(batches.batches_per_epoch):
            (batch,) = batches.next()
            assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
            for row, target in zip(batch["input_ids"].tolist(), batch["targets"][:, -1].tolist()):
                start = next(s for s in range(len(stream) - T) if stream[s:s + T] == row)
                assert stream[start + T] == target
                starts.append(start)
        offset = starts[0] % T
        assert all(s % T == offset for s in starts)  # one tiling per epoch, each window once
        assert len(set(starts)) == len(starts) and max(starts) + T + 1 <= len(stream)
        offsets.append(offset)
    assert offsets[0] == 0 and len(set(offsets)) > 1  # the first epoch is the fixed tiling; later ones move
    fixed = Batches(train, T, B, seed=5)
    assert fixed.n_windows == (len(stream) - 1) // T  # off: the tiling of every earlier run
    straight = Batches(train, T, B, seed=5, shift_windows=True)
    expected = [straight.next()[0]["input_ids"] for _ in range(100)]
    interrupted = Batches(train, T, B, seed=5, shift_windows=True)
    for _ in range(70):
        interrupted.next()
    resumed = Batches(train, T, B, seed=5, shift_windows=True)
    resumed.load_state(interrupted.state())
    assert all(torch.equal(resumed.next()[0]["input_ids"], e) for e in expected[70:])


def test_ranks_and_accumulation_split_the_same_global_batch(tmp_path):
    train = token_data(tmp_path, 2000)
    single = Batches(train, 8, 8, seed=1)
    ranks = [Batches(train, 8, 2, seed=1, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next()[0]["input_ids"]
        parts = [rank.next() for rank in ranks]  # parts[rank][micro]
        rows = [parts[r][m]["input_ids"] for m in range(2) for r in range(2)]
        assert torch.equal(torch.cat(rows), whole)


def test_batch_position_resumes_exactly(tmp_path):
    train = token_data(tmp_path, 3000)
    straight = Batches(train, 16, 4, seed=3)
    expected = [straight.next()[0]["input_ids"] for _ in range(60)]
    interrupted = Batches(train, 16, 4, seed=3)
    for _ in range(37):
        interrupted.next()
    resumed = Batches(train, 16, 4, seed=3)
    resumed.load_state(interrupted.state())
    assert all(torch.equal(resumed.next()[0]["input_ids"], e) for e in expected[37:])


def test_document_ids_and_validation_set(tmp_path):
    (tmp_path / "t.txt").write_text("".join(f"document {k}\n<|endoftext|>\n" for k in range(40)))
    directory = prepare_data(str(tmp_path / "t.txt"), load_tokenizer("bytes"), val_fraction=0.0, progress=False)
    train = TokenData(directory, "train")
    (batch,) = Batches(train, 12, 2, seed=0, doc_ids=True).next()
    bos = load_tokenizer("bytes").bos_id
    starts = batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1]
    assert torch.equal(starts, batch["input_ids"][:, 1:] == bos)  # a new document begins at each bos
    val = validation_batches(train, 12, 4, 10)
    assert [b["input_ids"].shape[0] for b in val] == [4, 4, 2]
    assert validation_batches(train, 12, 4, 10)[0]["input_ids"].tolist() == val[0]["input_ids"].tolist()


def test_too_little_data_says_what_to_do(tmp_path):
    train = token_data(tmp_path, 50)
    with pytest.raises(DataError, match="fewer than one global batch"):
        Batches(train, 16, 8, seed=0)


def test_real_tinystories_tokenize_into_both_splits():
    tokenizer = load_tokenizer("tinystories-sample-2048")
    directory = prepare_data("tinystories-sample", tokenizer, progress=False)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == N_TRAIN
    assert 0.08 < meta["val"]["documents"] / N_TRAIN < 0.12
    val = TokenData(directory, "val")
    first = val.read(int(val.doc_starts[0]), int(val.doc_starts[1]))
    assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
    assert len(tokenizer.decode(first).encode()) == val.doc_bytes[0]


# --- the texts shipped in data/ ---

N_TRAIN, N_HELDOUT = 5099, 650  # stories in data/tinystories/{train,heldout}.txt.gz (data/README.md)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # karpathy/char-rnn's input.txt


def normalised(story):
    return " ".join(story.split())


def test_gzipped_text_and_jsonl_read_as_the_plain_files(tmp_path):
    folder = write_sources(tmp_path / "src")
    (tmp_path / "gz").mkdir()
    names = ["a_separated.txt", "b_lines.txt", "c_records.jsonl", "e_whole.txt"]
    for name in names:
        (tmp_path / "gz" / f"{name}.gz").write_bytes(gzip.compress((folder / name).read_bytes()))
        assert list(read_documents(str(tmp_path / "gz" / f"{name}.gz"))) == list(read_documents(str(folder / name)))
    assert list(read_documents(str(tmp_path / "gz"))) == [d for n in names for d in read_documents(str(folder / n))]
    assert read_text(str(tmp_path / "gz" / "e_whole.txt.gz")) == (folder / "e_whole.txt").read_text()
    tokenizer = load_tokenizer("bytes")
    plain, zipped = (TokenData(prepare_data(str(path), tokenizer, progress=False), "train")
                     for path in (folder / "a_separated.txt", tmp_path / "gz" / "a_separated.txt.gz"))
    assert plain.read(0, len(plain)).tolist() == zipped.read(0, len(zipped)).tolist()
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"story " * 1000)[:40])
    with pytest.raises(DataError, match="not a complete gzip file") as error:
        list(read_documents(str(tmp_path / "cut.txt.gz")))
    assert "\n" not in str(error.value)


def test_shipped_texts_by_name():
    train, heldout = list(read_documents("tinystories-sample")), list(read_documents("tinystories-heldout"))
    assert (len(train), len(heldout)) == (N_TRAIN, N_HELDOUT)
    assert read_text("tinystories-heldout") == "".join(story + "\n<|endoftext|>\n" for story in heldout)  # V2 layout
    assert list(read_documents("tinystories-sample,tinystories-heldout")) == train + heldout
    (play,) = read_documents("shakespeare")  # one whole text: split by position, not by document
    assert hashlib.sha256(play.encode()).hexdigest() == SHAKESPEARE_SHA256 and read_text("shakespeare") == play
    assert resolve("tinystories-heldout,shakespeare") == [EMBEDDED["tinystories-heldout"], EMBEDDED["shakespeare"]]
    assert all(path.is_relative_to(ROOT / "data") and path.suffix == ".gz" for path in EMBEDDED.values())
    with pytest.raises(DataError, match="a shipped text .*tinystories-sample"):
        resolve("tinystories-sampel")


def test_heldout_stories_are_apart_from_the_training_stories():
    train = [normalised(story) for story in read_documents("tinystories-sample")]
    heldout_stories = list(read_documents("tinystories-heldout"))
    heldout = [normalised(story) for story in heldout_stories]
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)  # duplicates were dropped
    assert not set(train) & set(heldout)
    tokens = sum(map(len, load_tokenizer("tinystories-sample-2048").encode(heldout_stories)))
    assert len(heldout) >= 500 and tokens >= 100_000


def test_the_default_tokenizer_never_saw_the_heldout_stories():
    assert (TrainConfig().data, TrainConfig().tokenizer) == ("tinystories-sample", "tinystories-sample-2048")
    family = json.loads((TOKENIZERS_DIR / "tinystories-sample" / "family.json").read_text())
    train, heldout = list(read_documents("tinystories-sample")), list(read_documents("tinystories-heldout"))
    assert [source["path"] for source in family["sources"]] == ["data/tinystories/train.txt.gz"]
    assert (family["training_documents"], family["training_bytes"]) == (len(train), sum(len(s.encode()) for s in train))
    assert (family["heldout_documents"], family["heldout_bytes"]) == (len(heldout),
                                                                      sum(len(s.encode()) for s in heldout))
    measured = {str(size): round(load_tokenizer(f"tinystories-sample-{size}").bytes_per_token(heldout), 3)
                for size in family["sizes"]}
    assert measured == family["bytes_per_token"] and list(measured.values()) == sorted(measured.values())
    readme = (TOKENIZERS_DIR / "tinystories-sample" / "README.md").read_text()
    assert all(f"| {size} | {value} |" in readme for size, value in measured.items())


def test_derive_rebuilds_the_shipped_files_byte_for_byte(shared_data, tmp_path):
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "data" / "derive.py"), str(shared_data), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for path in ("tinystories/train.txt.gz", "tinystories/heldout.txt.gz", "tinyshakespeare/input.txt.gz"):
        assert (tmp_path / path).read_bytes() == (ROOT / "data" / path).read_bytes(), path
    assert (gzip.decompress(EMBEDDED["shakespeare"].read_bytes())
            == (shared_data / "tinyshakespeare/input.txt").read_bytes())
    # every source story is in exactly one of the two files; the shipped models' held-out stories stay held out
    sources = ["tinystories_sample_3000.txt", "TinyStories-train-first1000.txt", "tinystories_extra_1.txt",
               "tinystories_sample_cs336.txt", "tinystories_extra_2.txt"]
    source_stories = {normalised(s) for name in sources
                      for s in read_documents(str(shared_data / "tinystories" / name))}
    train = {normalised(story) for story in read_documents("tinystories-sample")}
    heldout = {normalised(story) for story in read_documents("tinystories-heldout")}
    assert source_stories == train | heldout and len(train) + len(heldout) == N_TRAIN + N_HELDOUT
    assert {normalised(s) for s in read_documents(str(shared_data / "tinystories/tinystories_extra_2.txt"))} <= heldout


# --- data identity: what a run records, and resume on other data ---

def test_data_hash_is_the_sha256_of_the_files_bytes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\n<|endoftext|>\n")
    b.write_text("two\n<|endoftext|>\n")
    assert data.data_sha256(str(a)) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert data.data_sha256(f"{a},{b}") == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    assert data.data_sha256("shakespeare") == hashlib.sha256(EMBEDDED["shakespeare"].read_bytes()).hexdigest()
    before = data.data_sha256(str(a))
    a.write_text("one, changed\n<|endoftext|>\n")
    assert data.data_sha256(str(a)) == hashlib.sha256(a.read_bytes()).hexdigest() != before
    # a hub dataset is identified by what it is (no network): id, config, file and max_docs
    assert len({data.data_sha256("tinystories"), data.data_sha256("tinystories", 10),
                data.data_sha256("fineweb-edu")}) == 3


def test_runs_record_data_relative_to_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "data")
    assert data.portable_spec("tinystories/train.txt.gz,tinystories-heldout") == \
        "data/tinystories/train.txt.gz,tinystories-heldout"
    assert data.portable_spec(str(tmp_path / "x.txt")) == str(tmp_path.resolve() / "x.txt")
    assert data.portable_spec("tinystories") == "tinystories" and data.portable_spec("hf:a/b:c") == "hf:a/b:c"
    monkeypatch.chdir(tmp_path)
    recorded = f"data/tinystories/train.txt.gz,shakespeare,{tmp_path / 'x.txt'}"
    assert data.absolute_spec(recorded) == f"{ROOT / 'data/tinystories/train.txt.gz'},shakespeare,{tmp_path / 'x.txt'}"
    assert data.portable_spec(data.absolute_spec(recorded)) == recorded


def tiny_run(spec, resume=False, stop_at=None, **overrides):
    model_cfg = ModelConfig.preset("llama3-1m", vocab_size=259, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                   context_length=32)
    values = dict(name="run", data=spec, tokenizer="bytes", device="cpu", batch_size=2, max_steps=4, warmup_steps=1,
                  log_every=1, eval_every=2, eval_batches=1, save_every=2)
    return train_run(model_cfg, TrainConfig(**{**values, **overrides}), resume=resume, stop_at=stop_at)


def train_run(model_cfg, train_cfg, resume=False, stop_at=None):
    from toolkit.trainer import train
    return train(model_cfg, train_cfg, resume=resume, stop_at=stop_at, progress_bar=False)


@pytest.fixture
def runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")


def test_resume_from_another_folder_finds_data_recorded_relative_to_the_project(runs_in_tmp, tmp_path, monkeypatch):
    from train import configs
    monkeypatch.chdir(ROOT)
    out = tiny_run("data/tinyshakespeare/input.txt.gz", stop_at=2)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["data"] == "data/tinyshakespeare/input.txt.gz"
    assert saved["data_sha256"] == hashlib.sha256(EMBEDDED["shakespeare"].read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    model_cfg, train_cfg, _, _ = configs(["--resume", "--name=run"])
    assert train_cfg.data == str(EMBEDDED["shakespeare"])
    train_run(model_cfg, train_cfg, resume=True)
    assert (out / "log_data.csv").read_text().splitlines()[-1].startswith("4,")
    assert json.loads((out / "train_config.json").read_text()) == saved


def test_resume_refuses_other_or_changed_data(runs_in_tmp, tmp_path):
    source, other = tmp_path / "stories.txt", tmp_path / "other.txt"
    text = "".join(f"Story {k} about a cat.\n<|endoftext|>\n" for k in range(300))
    source.write_text(text)
    other.write_text(text.replace("cat", "dog"))
    tiny_run(str(source), stop_at=2)
    for spec, overrides, message in [
            (str(other), {}, f"it was trained on '{source}', not '{other}'; drop --data or start a new --name"),
            (str(source), {"val_fraction": 0.2}, "val_fraction was 0.1, now 0.2"),
            (str(source), {"max_docs": 100}, "max_docs was None, now 100")]:
        with pytest.raises(DataError) as error:
            tiny_run(spec, resume=True, **overrides)
        assert message in str(error.value) and "\n" not in str(error.value)
    source.write_text(text + "One more story.\n<|endoftext|>\n")
    with pytest.raises(DataError, match=r"--resume needs the run's data as it was: '.*stories.txt' has changed since"):
        tiny_run(str(source), resume=True)
    source.write_text(text)  # the same bytes again: the run goes on
    out = tiny_run(str(source), resume=True)
    assert (out / "log_data.csv").read_text().splitlines()[-1].startswith("4,")


# --- the hub without a network ---

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("setting, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_DATASETS_OFFLINE": "true"}, "HF_DATASETS_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{port}"}, "127.0.0.1:{port}: Connection refused"),
])
def test_hub_datasets_fail_at_once_in_one_line_without_network(monkeypatch, tmp_path, setting, reason):
    from toolkit.tokenizer_training import main
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "NO_PROXY", "no_proxy",
                 *(f"{scheme}_PROXY" for scheme in ("HTTP", "HTTPS", "ALL")),
                 *(f"{scheme}_proxy" for scheme in ("http", "https", "all"))):
        monkeypatch.delenv(name, raising=False)
    port = closed_port()
    for name, value in setting.items():
        monkeypatch.setenv(name, value.format(port=port))
    for attempt in (lambda: list(read_documents("tinystories", max_docs=5)),
                    lambda: list(read_documents("hf:owner/name:config")),
                    lambda: main(["--name=x", f"--out={tmp_path / 'x'}", "--quiet", "--data", "fineweb-edu"])):
        start = time.perf_counter()
        with pytest.raises((DataError, SystemExit)) as error:
            attempt()
        message = str(error.value.code if isinstance(error.value, SystemExit) else error.value)
        assert time.perf_counter() - start < 5
        assert reason.format(port=port) in message and "--data=tinystories-sample" in message and "\n" not in message


def test_train_script_offline_says_so_in_one_line(tmp_path):
    import os
    import subprocess
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAINED_DIR": str(tmp_path / "trained"),
           "DATA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "train.py", "--data=tinystories", "--name=offline"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: cannot stream 'tinystories'")
    assert len(done.stderr.strip().splitlines()) == 1 and "HF_HUB_OFFLINE is set" in done.stderr


# --- validation needs data ---

def test_a_validation_split_of_nothing_is_refused(tmp_path):
    for value in (0, 0.0, 1.0, -0.1):
        with pytest.raises(ConfigError) as error:
            TrainConfig(val_fraction=value)
        assert "must be in (0, 1): validation needs data" in str(error.value) and "\n" not in str(error.value)
    from train import configs
    with pytest.raises(ConfigError, match=r"val_fraction=0.0 is not valid: must be in \(0, 1\)"):
        configs(["--val_fraction=0"])
    # prepare_data itself allows val_fraction 0 (the tests use it); an empty split is then one line, not a traceback
    (tmp_path / "t.txt").write_text("".join(f"doc {k}\n<|endoftext|>\n" for k in range(20)))
    directory = prepare_data(str(tmp_path / "t.txt"), load_tokenizer("bytes"), val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="the validation split has 0 tokens"):
        validation_batches(TokenData(directory, "val"), 8, 2, 4)
