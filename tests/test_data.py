"""Data: reading every source format, the document split, token shards and their cache, batches."""
import json

import numpy as np
import pytest
import torch

from toolkit import data
from toolkit.data import (Batches, DataError, TokenData, is_validation, prepare_data, read_documents,
                          split_documents, validation_batches)
from toolkit.tokenizer import load_tokenizer

DOCS = ["Once upon a time there was a cat.\nIt liked milk.", "A dog ran.", "Ünïcode 😀 story\n\nwith a blank line."]


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")


def write_sources(folder):
    import pandas
    folder.mkdir()
    (folder / "a_separated.txt").write_text("".join(d + "\n<|endoftext|>\n" for d in DOCS))
    (folder / "b_lines.txt").write_text("\n".join(d.replace("\n", " ") for d in DOCS) + "\n\n")
    (folder / "c_records.jsonl").write_text("".join(json.dumps({"text": d, "id": k}) + "\n" for k, d in enumerate(DOCS)))
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
    assert list(read_documents(str(folder / "b_lines.txt"), text_format="whole")) == [(folder / "b_lines.txt").read_text()]
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


def test_hub_dataset_offline_names_the_local_alternative(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"--data=\.\./shared/data"):
        list(read_documents("tinystories"))


def test_hub_text_file_is_streamed_back_into_documents(monkeypatch):
    """TinyStoriesV2 arrives as lines of one text file; its <|endoftext|> lines separate the stories."""
    import datasets
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
    assert train.doc_starts.tolist() == [0, len(DOCS[0].encode()) + 2, len(DOCS[0].encode()) + len(DOCS[1].encode()) + 4]
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


def test_real_tinystories_tokenize_into_both_splits(shared_data):
    tokenizer = load_tokenizer("tinystories-2048")
    directory = prepare_data(str(shared_data / "tinystories" / "tinystories_extra_1.txt"), tokenizer, progress=False)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 1721
    assert 0.07 < meta["val"]["documents"] / 1721 < 0.13
    val = TokenData(directory, "val")
    first = val.read(int(val.doc_starts[0]), int(val.doc_starts[1]))
    assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
    assert len(tokenizer.decode(first).encode()) == val.doc_bytes[0]
