"""Tokenizers: exact round trips, nested family members, special ids, display, compression on held-out text,
and family training from local files."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.tokenizer import (MODEL_FILE, TOKENIZERS_DIR, TokenizerError, available_tokenizers, load_tokenizer)
from toolkit.data import read_documents
from toolkit.tokenizer_training import (MAX_SENTENCE_BYTES, main, read_sources, split_last_fraction,
                                        split_long_document, train_family)

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
    tokenizer.display(text)
    assert capsys.readouterr().out == terminal + "\n"


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
    (["--data", "{data}", "--heldout-fraction", "1.5"], "error: --heldout-fraction"),
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
