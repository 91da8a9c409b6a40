"""Tokenizers: exact round trips, nested family members, special ids, display, compression on held-out text,
and family training from local files."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import inference
import model_comparison
import tools
import train
from config import ModelConfig
from modules.model import Model
from toolkit import checkpoint, data
from toolkit.checkpoint import MODEL_CONFIG, save_model
from toolkit.data import read_documents
from toolkit.hf import LoadError
from toolkit.tokenizer import (
    MODEL_FILE,
    TOKENIZERS_DIR,
    ByteTokenizer,
    TokenizerError,
    available_tokenizers,
    load_tokenizer,
)
from toolkit.tokenizer_training import (
    MAX_SENTENCE_BYTES,
    main,
    read_sources,
    split_last_fraction,
    split_long_document,
    train_family,
)

TRICKY = [
    "", " ", "  two leading spaces", "trailing spaces   ", " " * 300, "\n" * 300, "\n \n\t\r\n \r",
    "literal \u2581 marks\u2581\u2581 ▁x▁", "\u2581", "\x00", "nul\x00inside", "\x01\x07\x1b[31mred\x1b[0m\x7f\x9f",
    "emoji 😀👍🏽🇫🇷 👩‍👩‍👧 ✨", "中文，日本語の文、한국어 文字",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937 \u0301",
    "<s></s><unk><pad><|endoftext|> <0x41>", "\ufffd\ufeff\u200b\u2028\u2029\U0010ffff",
    "Once upon a time, there was a little cat named Tom.\n\nTom liked “curly” quotes — and dashes.",
]
SHIPPED = ["tinystories-2048", "tinystories-8192", "fineweb-edu-4096", "bytes"]
HELDOUT = "tinystories/tinystories_extra_2.txt"
# hypothesis rarely draws the characters sentencepiece treats specially, so half the examples use them
TEXTS = st.text() | st.text(alphabet="\u2581 \n\t\r\x00ab.😀\u0301中")


@pytest.fixture(scope="module")
def tokenizers():
    loaded = {spec: load_tokenizer(spec) for spec in SHIPPED}
    smallest = load_tokenizer("tinystories", size=loaded["tinystories-2048"].min_size)
    return {**loaded, "tinystories-min": smallest}


OTHER_WORDS = ("Ann", "ran", "to", "the", "old", "park", "with", "her", "green", "kite", "and", "sang")


def grammar_stories(n_docs, seed=0, words=("Tom", "Lily", "saw", "liked", "a", "big", "red", "ball", "dog", "sun")):
    """Short documents of a tiny grammar, for families trained in a second without ../shared."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.integers(5, 40))) + "." for _ in range(n_docs)]


def stories(n_bytes):
    """The first stories shipped in data/ (tinystories-sample), about n_bytes of them."""
    docs, total = [], 0
    for doc in read_documents("tinystories-sample"):
        if total >= n_bytes:
            break
        docs.append(doc)
        total += len(doc.encode())
    return docs


# --- exact round trips ---

@pytest.mark.parametrize("spec", [*SHIPPED, "tinystories-min"])
def test_tricky_strings_round_trip_exactly(tokenizers, spec):
    tokenizer = tokenizers[spec]
    for text in TRICKY:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(TRICKY)) == TRICKY
    assert tokenizer.encode("") == [] and tokenizer.encode([]) == []


@pytest.mark.parametrize("spec", ["tinystories-2048", "fineweb-edu-4096", "bytes", "tinystories-min"])
@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_any_string_round_trips(tokenizers, spec, text):
    assert tokenizers[spec].decode(tokenizers[spec].encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=8))  # decode([]) is the empty text
def test_batch_equals_one_by_one(tokenizers, texts):
    tokenizer = tokenizers["tinystories-2048"]
    batch = tokenizer.encode(texts, bos=True, eos=True)
    assert batch == [tokenizer.encode(text, bos=True, eos=True) for text in texts]
    assert tokenizer.decode(batch) == texts


@pytest.mark.parametrize("spec", ["tinystories-2048", "bytes"])
def test_lone_surrogates_are_no_unicode_text(tokenizers, spec):
    with pytest.raises(UnicodeEncodeError):
        tokenizers[spec].encode(["fine", "half a pair \ud800"])


def test_literal_space_mark_goes_through_its_bytes(tokenizers):
    tokenizer = tokenizers["tinystories-2048"]
    mark_ids = [4 + b for b in "\u2581".encode()]  # byte pieces <0xE2> <0x96> <0x81>
    assert tokenizer.encode("\u2581") == mark_ids
    assert tokenizer.encode("a\u2581b") == tokenizer.encode("a") + mark_ids + tokenizer.encode("b")


@pytest.mark.parametrize("spec", ["tinystories-2048", "bytes"])
def test_decode_takes_tensors_arrays_and_batches(tokenizers, spec):
    tokenizer = tokenizers[spec]
    texts = ["Once upon a time.", "The end!"]
    ids = tokenizer.encode(texts[0])
    assert tokenizer.decode(torch.tensor(ids)) == texts[0]
    assert tokenizer.decode(np.array(ids, dtype=np.int64)) == texts[0]
    assert tokenizer.decode(tuple(ids)) == texts[0]
    batch = tokenizer.encode(texts)
    assert tokenizer.decode(batch) == texts
    same_length = [ids[:4], ids[-4:]]
    assert tokenizer.decode(torch.tensor(same_length)) == [tokenizer.decode(row) for row in same_length]


# --- special ids ---

def test_family_special_ids(tokenizers):
    tokenizer = tokenizers["tinystories-2048"]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2048, 1, 2, 3)
    assert [tokenizer.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    ids = tokenizer.encode("Hi.")
    assert tokenizer.encode("Hi.", bos=True, eos=True) == [1, *ids, 2]
    assert tokenizer.encode(["Hi.", ""], bos=True) == [[1, *ids], [1]]
    assert tokenizer.decode([1, *ids, 2, 3, 3, 0]) == "Hi."  # every special id decodes to nothing


def test_byte_special_ids(tokenizers):
    tokenizer = tokenizers["bytes"]
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (259, 256, 257, 258)
    assert tokenizer.encode("aé", bos=True, eos=True) == [256, 97, 0xC3, 0xA9, 257]
    assert tokenizer.decode([256, 97, 257, 258, 258]) == "a"
    assert tokenizer.decode([0xC3]) == "\ufffd"  # half a character
    with pytest.raises(ValueError):
        tokenizer.decode([259])


# --- nesting ---

def test_family_layout_specials_bytes_characters_merges(tokenizers):
    tokenizer = tokenizers["tinystories-8192"]
    sp, min_size = tokenizer.sp, tokenizer.min_size
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert pieces[4:260] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(len(piece) == 1 for piece in pieces[260:min_size])
    assert all(len(piece) > 1 for piece in pieces[min_size:])
    merge_scores = [sp.get_score(i) for i in range(min_size, 8192)]
    assert merge_scores == sorted(merge_scores, reverse=True)  # merge order = priority order
    assert "\u2581" in pieces[260:min_size] and "\n" in pieces[260:min_size]


@pytest.mark.parametrize("family", ["tinystories", "fineweb-edu"])
def test_smaller_member_is_a_prefix_of_the_larger(family):
    small, large = load_tokenizer(f"{family}-1024"), load_tokenizer(f"{family}-4096")
    for i in range(1024):
        assert small.sp.id_to_piece(i) == large.sp.id_to_piece(i)
        assert small.sp.get_score(i) == large.sp.get_score(i)
        assert small.token_bytes(i) == large.token_bytes(i)


@pytest.mark.parametrize("size", ["min", 400, 512, 1000, 1024, 2048, 3000, 8192])
def test_member_never_emits_an_id_at_or_above_its_size(tokenizers, shared_data, size):
    size = tokenizers["tinystories-2048"].min_size if size == "min" else size
    tokenizer = load_tokenizer("tinystories", size=size)
    docs, _ = read_sources([shared_data / HELDOUT], verbose=False)
    docs += TRICKY
    encoded = tokenizer.encode(docs)
    assert max(max(ids, default=0) for ids in encoded) < size
    assert tokenizer.decode(encoded) == docs
    assert max(max(ids, default=0) for ids in encoded) >= size * 3 // 4  # it uses its own top ids


# --- loading ---

def test_names_paths_and_sizes_load_the_same_tokenizer():
    named = load_tokenizer("fineweb-edu-3000")
    assert (named.name, named.vocab_size) == ("fineweb-edu-3000", 3000)
    by_path = load_tokenizer(str(TOKENIZERS_DIR / "fineweb-edu"), 3000)
    by_path_name = load_tokenizer(f"{TOKENIZERS_DIR / 'fineweb-edu'}-3000")
    text = "The Independent Jane, 1813."
    assert named.encode(text) == by_path.encode(text) == by_path_name.encode(text)
    assert by_path.name == by_path_name.name == f"{TOKENIZERS_DIR / 'fineweb-edu'}-3000"
    assert {"tinystories-2048", "fineweb-edu-8192", "bytes"} <= set(available_tokenizers())


def test_family_names_may_contain_dashes():
    """The size follows the last dash: tinystories-sample-2048 is family tinystories-sample at 2048."""
    named = load_tokenizer("tinystories-sample-2048")
    assert (named.name, named.vocab_size) == ("tinystories-sample-2048", 2048)
    by_path = load_tokenizer(str(TOKENIZERS_DIR / "tinystories-sample"), 2048)
    assert [named.sp.id_to_piece(i) for i in range(2048)] == [by_path.sp.id_to_piece(i) for i in range(2048)]
    other = load_tokenizer("tinystories-2048")  # a family of its own, not tinystories cut somewhere
    assert [named.sp.id_to_piece(i) for i in range(2048)] != [other.sp.id_to_piece(i) for i in range(2048)]
    assert {"tinystories-sample-2048", "tinystories-2048"} <= set(available_tokenizers())


@pytest.mark.parametrize("spec, message", [
    ("tinystories", "has no size"), ("tinystories-big", "has no size"), ("nosuchfamily-1024", "unknown tokenizer"),
    ("tinystories-sample", "has no size"), ("tinystories-sample-100", "outside"),
    ("tinystories-8193", "outside"), ("tinystories-100", "outside"),
])
def test_user_errors_say_what_to_do(spec, message):
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(spec)


def test_corrupt_or_unnested_model_is_a_clear_error(tmp_path, tokenizers):
    (tmp_path / MODEL_FILE).write_bytes(b"\xff\xfe not a model")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(str(tmp_path), 512)
    # sentencepiece's own order (merges before characters) has invalid prefixes, so it is refused
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto.FromString((TOKENIZERS_DIR / "tinystories" / MODEL_FILE).read_bytes())
    pieces = list(proto.pieces)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:260] + pieces[tokenizers["tinystories-2048"].min_size:] + pieces[260:300])
    (tmp_path / MODEL_FILE).write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match="not a nested family"):
        load_tokenizer(str(tmp_path), 512)


def test_tokenizers_folder_does_not_shadow_hugging_face_tokenizers():
    assert not list(TOKENIZERS_DIR.rglob("*.py"))
    found = subprocess.run([sys.executable, "-c", "import tokenizers; print(tokenizers.__file__)"],
                           cwd=TOKENIZERS_DIR.parent, capture_output=True, text=True, check=True).stdout
    assert str(TOKENIZERS_DIR) not in found and "site-packages" in found


# --- display ---

def test_segments_group_byte_pieces_into_characters(tokenizers):
    tokenizer = tokenizers["tinystories-2048"]
    text = "Tom saw 日本 and 😀!\n"
    segments = tokenizer.segments(text)
    assert "".join(piece for piece, _ in segments) == text
    assert [i for _, ids in segments for i in ids] == tokenizer.encode(text)
    assert ("日", [4 + b for b in "日".encode()]) in segments
    assert ("😀", [4 + b for b in "😀".encode()]) in segments


def test_display_html_and_terminal(tokenizers, capsys):
    tokenizer = tokenizers["tinystories-2048"]
    text = "Once upon a <time>\n&"
    ids = tokenizer.encode(text)
    page = tokenizer.display_html(text)
    assert "&lt;" in page and "&amp;" in page and "<time>" not in page
    assert f"{len(ids)} tokens" in page
    assert re.findall(r'title="(\d+)"', page) == [str(i) for i in ids]
    assert "#cfe3ff" in page and "#ffe2c2" in page

    terminal = tokenizer.display_ansi(text)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", terminal).split("\n")
    assert plain[1:] == ["Once upon a <time>↵", "&", " ".join(map(str, ids))]
    # Into a pipe or a file (capsys is neither a terminal): no colour codes, boundaries as bars.
    tokenizer.display(text)
    piped = capsys.readouterr().out
    assert piped == tokenizer.display_plain(text) + "\n" and "\x1b" not in piped
    lines = piped.split("\n")
    pieces = "\n".join(lines[1:3])[1:-1].split("|")
    assert "".join(pieces) == "Once upon a <time>↵\n&" and len(pieces) == len(tokenizer.segments(text))
    assert [int(i) for group in re.findall(r"\[([\d ]+)\]", lines[3]) for i in group.split()] == ids


# --- compression ---

def test_bytes_per_token_on_heldout_tinystories(shared_data):
    docs, _ = read_sources([shared_data / HELDOUT], verbose=False)
    assert load_tokenizer("tinystories-2048").bytes_per_token(docs) >= 3.5
    assert load_tokenizer("bytes").bytes_per_token(docs) == 1.0


@pytest.mark.parametrize("family", ["tinystories", "fineweb-edu"])
def test_family_readme_figures_are_measured_on_its_heldout_text(shared_data, family):
    info = json.loads((TOKENIZERS_DIR / family / "family.json").read_text())
    if family == "tinystories":
        docs, _ = read_sources([shared_data / HELDOUT], verbose=False)
    else:  # the last 10% of the file
        docs = split_last_fraction(read_sources([shared_data / "fineweb-edu"], verbose=False)[0], 0.1)[1]
    assert (len(docs), sum(len(doc.encode()) for doc in docs)) == (info["heldout_documents"], info["heldout_bytes"])
    measured = {size: load_tokenizer(f"{family}-{size}").bytes_per_token(docs) for size in info["sizes"]}
    assert list(measured.values()) == sorted(measured.values())  # a larger member compresses more
    assert {str(size): round(value, 3) for size, value in measured.items()} == info["bytes_per_token"]
    readme = (TOKENIZERS_DIR / family / "README.md").read_text()
    assert all(f"| {size} | {value} |" in readme for size, value in info["bytes_per_token"].items())


# --- training ---

def test_train_family_is_nested_and_exact(tmp_path):
    docs = stories(300_000)
    heldout, _ = read_sources(["tinystories-heldout"], verbose=False)
    family = train_family(docs, [600, 400], tmp_path / "small", heldout=heldout, verbose=False)
    assert (family["sizes"], family["max_size"], family["training_documents"]) == ([400, 600], 600, len(docs))
    assert json.loads((tmp_path / "small" / "family.json").read_text())["bytes_per_token"] == family["bytes_per_token"]
    assert "| 400 |" in (tmp_path / "small" / "README.md").read_text()
    small, large = load_tokenizer(str(tmp_path / "small"), 400), load_tokenizer(str(tmp_path / "small"), 600)
    assert [small.sp.id_to_piece(i) for i in range(400)] == [large.sp.id_to_piece(i) for i in range(400)]
    # the prefix is exactly the tokenizer that training at 400 gives
    train_family(docs, [400], tmp_path / "direct", verbose=False)
    direct = load_tokenizer(str(tmp_path / "direct"), 400)
    assert [direct.sp.id_to_piece(i) for i in range(400)] == [small.sp.id_to_piece(i) for i in range(400)]
    for tokenizer in (small, large):
        encoded = tokenizer.encode(heldout + TRICKY)
        assert max(map(max, filter(None, encoded))) < tokenizer.vocab_size
        assert tokenizer.decode(encoded) == heldout + TRICKY
    assert 1.5 < family["bytes_per_token"]["400"] < family["bytes_per_token"]["600"]


def test_training_never_learns_the_document_separator(tmp_path):
    docs = stories(200_000)
    text = "".join(doc + "\n<|endoftext|>\n" for doc in docs)
    (tmp_path / "stories.txt").write_text(text)
    assert list(read_documents(str(tmp_path / "stories.txt"))) == docs
    train_family(docs, [600], tmp_path / "fam", verbose=False)
    pieces = [load_tokenizer(str(tmp_path / "fam"), 600).sp.id_to_piece(i) for i in range(600)]
    assert not [piece for piece in pieces if "endoftext" in piece or "<|" in piece]


def test_long_documents_are_cut_at_newlines_not_dropped(tmp_path):
    doc = "\n".join(stories(300_000))  # one 300 KB document, 70 times sentencepiece's limit
    chunks = split_long_document(doc)
    assert "".join(chunks) == doc
    assert all(len(chunk.encode()) <= MAX_SENTENCE_BYTES for chunk in chunks)
    assert all(chunk.endswith("\n") for chunk in chunks[:-1]) and len(chunks) >= len(doc.encode()) // MAX_SENTENCE_BYTES
    # without newlines: cut before a space; without spaces: at a character boundary
    assert split_long_document("aaaa bbbb cc", 9) == ["aaaa", " bbbb cc"]
    assert split_long_document("日本語日本語", 7) == ["日本", "語日", "本語"]
    family = train_family([doc], [600], tmp_path / "one-doc", verbose=False)
    assert family["training_sentences"] == len(chunks) and family["training_documents"] == 1
    # it learns as much as from the same stories as separate documents
    train_family(doc.split("\n"), [600], tmp_path / "many-docs", verbose=False)
    heldout, _ = read_sources(["tinystories-heldout"], verbose=False)
    one, many = (load_tokenizer(str(tmp_path / name), 600).bytes_per_token(heldout)
                 for name in ("one-doc", "many-docs"))
    assert abs(one - many) < 0.02 * many


def test_read_sources_reads_every_source_with_the_data_reader(tmp_path):
    docs = stories(20_000)
    (tmp_path / "separated.txt").write_text("\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n")
    (tmp_path / "records.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    read, sources = read_sources([tmp_path / "separated.txt", tmp_path / "records.jsonl"], verbose=False)
    assert read == docs + docs
    assert [s["documents"] for s in sources] == [len(docs), len(docs)]
    assert sources[0]["bytes"] == sum(len(doc.encode()) for doc in docs)


def test_command_line_trains_with_a_heldout_fraction(tmp_path, capsys):
    (tmp_path / "stories.txt").write_text("\n<|endoftext|>\n".join(stories(200_000)))
    main(["--name", "mini", "--data", str(tmp_path / "stories.txt"), "--sizes", "500", "600",
          "--heldout-fraction", "0.1", "--out", str(tmp_path / "mini"), "--quiet"])
    family = json.loads((tmp_path / "mini" / "family.json").read_text())
    assert family["sizes"] == [500, 600] and set(family["bytes_per_token"]) == {"500", "600"}
    assert 0.08 < family["heldout_bytes"] / (family["heldout_bytes"] + family["training_bytes"]) < 0.12
    assert family["command"].startswith("python -m toolkit.tokenizer_training --name mini")
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--data", "no/such/file.txt"], "error: no data at"),
    (["--data", "{data}", "--sizes", "300", "400"], "error: size 300 is below"),
    (["--data", "{data}", "--sizes", "300"], "error: sentencepiece training failed: Vocabulary size is smaller"),
    (["--data", "{data}", "--sizes", "5000"], "error: sentencepiece training failed: Vocabulary size too high"),
    (["--data", "{data}", "--heldout-fraction", "1.5"], "error: --heldout_fraction"),
])
def test_command_line_errors_are_one_line(tmp_path, args, message):
    data = str(tmp_path / "five_stories.txt")
    five = list(read_documents("tinystories-sample", max_docs=5))
    (tmp_path / "five_stories.txt").write_text("".join(story + "\n<|endoftext|>\n" for story in five))
    args = [arg.replace("{data}", data) for arg in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "x", "--out", str(tmp_path / "x"), "--quiet", *args])
    assert str(exit_info.value.code).startswith(message) and "\n" not in str(exit_info.value.code)


def test_dataset_names_fail_offline_with_the_local_alternative(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "x", "--out", str(tmp_path / "x"), "--quiet", "--data", "tinystories", "--max-docs", "10"])
    assert "train on local files" in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


# --- Hugging Face tokenizers ---

@pytest.fixture(scope="module")
def local_hf_tokenizer(tmp_path_factory):
    """A small byte-level BPE (GPT-2's kind) saved as a Hugging Face tokenizer folder: no network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRICKY * 20, trainer)
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(folder)
    return load_tokenizer(f"hf:{folder}")


def test_hugging_face_tokenizer_round_trips_and_displays(local_hf_tokenizer):
    tokenizer = local_hf_tokenizer
    eot = tokenizer.eos_id
    assert tokenizer.bos_id == tokenizer.pad_id == eot  # no bos or pad of its own: eos stands in, as in GPT-2
    for text in TRICKY:
        assert tokenizer.decode(tokenizer.encode(text)) == text  # special-token text stays text
    assert eot not in tokenizer.encode("<|endoftext|>")
    assert tokenizer.encode("Hi", bos=True, eos=True)[::len(tokenizer.encode("Hi")) + 1] == [eot, eot]
    segments = tokenizer.segments("x 𝄞")  # a character it never saw: four byte tokens, one segment
    assert "".join(piece for piece, _ in segments) == "x 𝄞" and segments[-1][0] == "𝄞"
    assert len(segments[-1][1]) == 4 and [i for _, ids in segments for i in ids] == tokenizer.encode("x 𝄞")


def test_gpt2_is_loaded_from_cache_or_says_what_to_do(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        tokenizer = load_tokenizer("gpt2")
    except TokenizerError as e:
        assert "hf:/path/to/folder" in str(e) and "\n" not in str(e)
        return
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (50257, 50256)
    assert tokenizer.decode(tokenizer.encode(TRICKY)) == TRICKY


def test_an_uncached_hub_tokenizer_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    import transformers

    from toolkit import tokenizer as tokenizer_module
    asked = []

    def from_pretrained(name, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        raise OSError(f"{name} is not cached")  # what transformers says when the files are not on disk
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(tokenizer_module, "hub_unreachable", lambda: "huggingface.co:443: no answer in 3 s")
    with pytest.raises(TokenizerError) as error:
        load_tokenizer("hf:nobody/no-such-tokenizer")
    assert asked == [True]  # the cache only: never the hub's minute of retries
    assert str(error.value) == ("cannot load Hugging Face tokenizer 'nobody/no-such-tokenizer': it is not cached and "
                                "the hub cannot be reached (huggingface.co:443: no answer in 3 s); run once online "
                                "to cache it, or pass a local folder as 'hf:/path/to/folder'")
    monkeypatch.setattr(tokenizer_module, "hub_unreachable", lambda: None)  # online: the hub is asked
    with pytest.raises(TokenizerError, match="is not cached"):
        load_tokenizer("hf:nobody/no-such-tokenizer")
    assert asked == [True, True, False]


# --- training: the command line ---

@pytest.fixture
def grammar_file(tmp_path):
    path = tmp_path / "grammar.txt"
    path.write_text("".join(doc + "\n<|endoftext|>\n" for doc in grammar_stories(300)))
    return path


def test_existing_family_is_not_replaced_without_overwrite(grammar_file, tmp_path, capsys):
    out = tmp_path / "fam"
    main(["--name", "fam", "--data", str(grammar_file), "--sizes", "320", "--out", str(out), "--quiet"])
    trained = (out / MODEL_FILE).read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("\n".join(grammar_stories(300, seed=1, words=OTHER_WORDS)))
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "fam", "--data", str(other), "--sizes", "320", "--out", str(out), "--quiet"])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: {out} already holds a tokenizer family") and "--overwrite" in message
    assert "\n" not in message and (out / MODEL_FILE).read_bytes() == trained
    with pytest.raises(TokenizerError, match="already holds"):  # the same rule for code
        train_family(grammar_stories(100), [320], out, verbose=False)
    main(["--name", "fam", "--data", str(other), "--sizes", "320", "--out", str(out), "--quiet", "--overwrite"])
    assert (out / MODEL_FILE).read_bytes() != trained
    assert load_tokenizer(str(out), 320).encode("Ann ran") != load_tokenizer(str(out), 320).encode("Ann rat")


def test_options_take_train_py_spellings_and_dashes(grammar_file, tmp_path, capsys):
    for spelling in ("_", "-"):
        out = tmp_path / f"fam{spelling}"
        main(["--name", "fam", "--data", str(grammar_file), "--sizes", "320", "--out", str(out), "--quiet",
              f"--max{spelling}docs", "100", f"--heldout{spelling}fraction", "0.2",
              f"--character{spelling}coverage", "1.0"])
        family = json.loads((out / "family.json").read_text())
        assert family["training_documents"] + family["heldout_documents"] == 100
        assert family["sentencepiece"]["character_coverage"] == 1.0


@pytest.mark.parametrize("typed, hint", [
    ("--character_coverag=0.99", "unknown setting --character_coverag (did you mean character_coverage?)"),
    ("--max-doc", "unknown setting --max-doc (did you mean max_docs?)"),
    ("--character", "unknown setting --character (did you mean character_coverage?)"),  # no silent abbreviations
    ("--verbos", "unknown setting --verbos (did you mean verbose?)"),
])
def test_unknown_options_get_a_hint_in_one_line(grammar_file, tmp_path, capsys, typed, hint):
    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "x", "--data", str(grammar_file), "--out", str(tmp_path / "x"), typed, "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(f"error: {hint}") and error.count("\n") == 1
    assert error.endswith("; see python -m toolkit.tokenizer_training --help\n")
    assert not (tmp_path / "x").exists()


def test_empty_input_is_one_line_not_sentencepiece_internal_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--name", "x", "--data", str(tmp_path / name), "--out", str(tmp_path / "x"), "--quiet"])
        assert str(exit_info.value.code) == (f"error: {tmp_path / name} holds no text (empty or only blank lines): "
                                             f"give files with text")
    with pytest.raises(TokenizerError, match="no text to train on"):
        train_family(["", ""], [300], tmp_path / "y", verbose=False)


def test_training_is_quiet_by_default_and_verbose_shows_sentencepiece_log(grammar_file, tmp_path, capfd):
    def run(*flags):
        main(["--name", "x", "--data", str(grammar_file), "--sizes", "320", "--out", str(tmp_path / "x"),
              "--overwrite", *flags])
        return capfd.readouterr().err

    sentencepiece_lines = [line for line in run().splitlines() if "trainer_interface" in line or ".cc(" in line]
    assert sentencepiece_lines == []
    assert sum("trainer_interface" in line for line in run("--verbose").splitlines()) >= 10
    assert run("--quiet") == ""


# --- fingerprints: a model's tokenizer ---

def test_fingerprint_is_what_decides_the_ids(tmp_path):
    named, by_path = load_tokenizer("tinystories-2048"), load_tokenizer(str(TOKENIZERS_DIR / "tinystories"), 2048)
    assert named.name != by_path.name and named.fingerprint == by_path.fingerprint
    assert named.fingerprint == hashlib.sha256(named.sp.serialized_model_proto()).hexdigest()
    others = [load_tokenizer("tinystories-2047"), load_tokenizer("tinystories-4096"),
              load_tokenizer("fineweb-edu-2048"), load_tokenizer("bytes")]
    assert len({named.fingerprint, *(t.fingerprint for t in others)}) == 5
    assert load_tokenizer("bytes").fingerprint == ByteTokenizer().fingerprint
    assert data.tokenizer_fingerprint(named) == named.fingerprint  # the token cache is keyed by the same one
    # a family trained again on other text is another tokenizer under the same name
    train_family(grammar_stories(200), [320], tmp_path / "fam", verbose=False)
    first = load_tokenizer(str(tmp_path / "fam"), 320)
    train_family(grammar_stories(200, seed=1), [320], tmp_path / "fam", verbose=False, overwrite=True)
    again = load_tokenizer(str(tmp_path / "fam"), 320)
    assert again.name == first.name and again.fingerprint != first.fingerprint


@pytest.fixture
def family_model(tmp_path, monkeypatch):
    """A model saved with a tokenizer of a family trained here, in a trained/ of its own: (name, model, tokenizer)."""
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    train_family(grammar_stories(300), [320], tmp_path / "fam", verbose=False)
    tokenizer = load_tokenizer(str(tmp_path / "fam"), 320)
    torch.manual_seed(0)
    model = Model(ModelConfig.preset("llama3-1m", vocab_size=320, dim=32, n_layers=1, n_heads=2, context_length=64))
    save_model(model, checkpoint.TRAINED / "fam_model", train_config={"tokenizer": tokenizer.name}, tokenizer=tokenizer)
    return "fam_model", model.eval(), tokenizer


def test_a_saved_model_records_its_tokenizer(family_model):
    name, model, tokenizer = family_model
    saved = json.loads((checkpoint.TRAINED / name / MODEL_CONFIG).read_text())
    assert saved["tokenizer"] == {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint}
    save_model(model, checkpoint.TRAINED / name)  # a run's later saves keep the record
    assert json.loads((checkpoint.TRAINED / name / MODEL_CONFIG).read_text())["tokenizer"] == saved["tokenizer"]
    loaded, loaded_tokenizer = tools.load_model(name)
    ids = torch.tensor([loaded_tokenizer.encode("Tom saw a big red ball.", bos=True)])
    assert loaded_tokenizer.fingerprint == tokenizer.fingerprint
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_training_records_the_tokenizer_through_every_save(tmp_path, monkeypatch):
    from config import TrainConfig
    from toolkit.trainer import train as train_run
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    (tmp_path / "text.txt").write_text("".join(doc + "\n<|endoftext|>\n" for doc in grammar_stories(100)))
    model_cfg = ModelConfig.preset("llama3-1m", vocab_size=259, dim=32, n_layers=1, n_heads=2, context_length=32)
    train_cfg = TrainConfig(name="run", data=str(tmp_path / "text.txt"), tokenizer="bytes", device="cpu", batch_size=2,
                            max_steps=4, save_every=2, eval_every=2, eval_batches=1, log_every=2, warmup_steps=1)
    out = train_run(model_cfg, train_cfg, progress_bar=False)
    record = json.loads((out / MODEL_CONFIG).read_text())["tokenizer"]
    assert record == {"name": "bytes", "fingerprint": ByteTokenizer().fingerprint}


def test_a_model_whose_tokenizer_changed_is_refused_in_one_line(family_model, tmp_path, capsys):
    name, _, tokenizer = family_model
    train_family(grammar_stories(300, seed=1, words=OTHER_WORDS), [320],
                 tmp_path / "fam", verbose=False, overwrite=True)
    expected = (f"{checkpoint.TRAINED / name} was trained with tokenizer {tokenizer.name} (fingerprint "
                f"{tokenizer.fingerprint[:12]}), which has changed since")
    with pytest.raises(LoadError) as error:
        tools.load_model(name)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value) and "retrain" in str(error.value)
    for script in (lambda: inference.main([name, "Tom"]),
                   lambda: model_comparison.main([name, "--data", str(tmp_path / "fam" / "README.md")])):
        with pytest.raises(SystemExit) as exit_info:
            script()
        # inference exits with the line; the comparison prints it (naming the model) and exits 1
        message = str(exit_info.value.code) if exit_info.value.code != 1 else capsys.readouterr().err.strip()
        assert message.startswith("error: ") and expected in message and "\n" not in message
    (checkpoint.TRAINED / name / "training_state.pt").touch()  # a checkpoint to resume (never read: refused first)
    with pytest.raises(LoadError, match="which has changed since"):  # train.py --resume reads it too
        train.configs([f"--name={name}", "--resume"])


def test_resuming_with_another_tokenizer_is_refused(family_model):
    name, _, tokenizer = family_model
    (checkpoint.TRAINED / name / "training_state.pt").touch()  # a checkpoint to resume (never read: refused first)
    with pytest.raises(LoadError) as error:
        train.configs([f"--name={name}", "--resume", "--tokenizer=bytes"])
    assert str(error.value) == (f"trained/{name} was trained with tokenizer {tokenizer.name} (fingerprint "
                                f"{tokenizer.fingerprint[:12]}), not bytes ({ByteTokenizer().fingerprint[:12]}): "
                                f"use {tokenizer.name}")


def test_models_saved_before_the_record_load_as_before(tmp_path, monkeypatch):
    # A model saved before tokenizer records existed (tests/fixtures: written by the code of commit fefa8d7),
    # its tokenizer named only by train_config.json, as the first shipped models were.
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path)
    folder = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "format1" / "llama3_format1", folder)
    (folder / "train_config.json").write_text(json.dumps({"tokenizer": "tinystories-2048"}))
    saved = json.loads((folder / MODEL_CONFIG).read_text())
    assert "tokenizer" not in saved
    model, tokenizer = tools.load_model("old")
    assert (tokenizer.name, tokenizer.fingerprint) == ("tinystories-2048",
                                                       load_tokenizer("tinystories-2048").fingerprint)
    direct = Model(ModelConfig.from_dict(saved))
    weights, _ = checkpoint.load_state_dict_file(folder / checkpoint.WEIGHTS)
    direct.load_state_dict(weights)
    ids = torch.arange(1, 33)[None] * 7 % 256
    assert torch.equal(model(ids)[0], direct.eval()(ids)[0])


# --- as Hugging Face tokenizers ---

def same_ids_through_transformers(tokenizer, texts, tmp_path):
    """(ids here, ids of transformers.AutoTokenizer on the saved to_hf(), its default encoding, its decoding)."""
    from transformers import AutoTokenizer
    tokenizer.to_hf(model_max_length=256).save_pretrained(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    theirs = hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return (tokenizer.encode(texts), theirs, hf(texts, split_special_tokens=True)["input_ids"],
            hf.batch_decode(theirs, skip_special_tokens=True))


@pytest.mark.parametrize("spec", ["tinystories-2048", "tinystories-min", "fineweb-edu-8192", "bytes"])
def test_to_hf_encodes_the_same_ids_in_transformers(tokenizers, spec, tmp_path):
    tokenizer = tokenizers.get(spec) or load_tokenizer(spec)
    texts = TRICKY + grammar_stories(200) + ["Tim's 12 dogs ran 3.5 km—fast! Ça va? 東京 😀"]
    ours, theirs, with_bos, decoded = same_ids_through_transformers(tokenizer, texts, tmp_path)
    assert theirs == ours and decoded == texts
    assert with_bos == tokenizer.encode(texts, bos=True)  # by default bos in front, as in training


def test_to_hf_encodes_the_same_ids_on_real_stories(tmp_path):
    docs = stories(400_000)
    assert len(docs) >= 300
    for spec in ("tinystories-2048", "tinystories-8192", "fineweb-edu-4096"):
        ours, theirs, _, decoded = same_ids_through_transformers(load_tokenizer(spec), docs, tmp_path / spec)
        assert theirs == ours and decoded == docs


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_to_hf_encodes_any_text_the_same(exported_family, texts):
    tokenizer, hf = exported_family
    assert hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tokenizer.encode(texts)


@pytest.fixture(scope="module")
def exported_family(tmp_path_factory):
    from transformers import AutoTokenizer
    tokenizer = load_tokenizer("tinystories-1024")
    folder = tmp_path_factory.mktemp("exported")
    tokenizer.to_hf().save_pretrained(folder)
    return tokenizer, AutoTokenizer.from_pretrained(folder)


def test_hugging_face_tokenizer_keeps_its_ids_and_fingerprint(local_hf_tokenizer, tmp_path):
    texts = TRICKY + grammar_stories(50)
    ours, theirs, _, decoded = same_ids_through_transformers(local_hf_tokenizer, texts, tmp_path)
    assert theirs == ours and decoded == texts
    assert load_tokenizer(f"hf:{tmp_path / 'hf'}").fingerprint == local_hf_tokenizer.fingerprint


def test_exported_family_read_back_as_hugging_face_gives_the_same_bytes(exported_family, tmp_path):
    tokenizer, _ = exported_family
    tokenizer.to_hf().save_pretrained(tmp_path)
    back = load_tokenizer(f"hf:{tmp_path}")
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id) == (1024, 1, 2, 3)
    assert [back.token_bytes(i) for i in range(1024)] == [tokenizer.token_bytes(i) for i in range(1024)]
    assert back.encode(TRICKY) == tokenizer.encode(TRICKY) and back.decode(back.encode(TRICKY)) == TRICKY


def test_hugging_face_folder_without_tokenizer_files_is_one_line(tmp_path):
    import transformers
    transformers.GPT2Config(vocab_size=50).save_pretrained(tmp_path)  # what a model-only folder holds
    with pytest.raises(TokenizerError) as error:
        load_tokenizer(f"hf:{tmp_path}")
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
