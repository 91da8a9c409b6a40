"""Train a nested family of BPE tokenizers with sentencepiece: trained once at the largest size, pieces
reordered so that every prefix is a smaller tokenizer (same pieces, same ids). Writes one folder with
tokenizer.model, family.json and README.md (bytes per token on held-out text for every size).

    python -m toolkit.tokenizer_training --name tinystories --data stories/*.txt --heldout extra.txt
    python -m toolkit.tokenizer_training --name fineweb-edu --data fineweb-edu --max_docs 100000
        --heldout_fraction 0.1 --sizes 1024 4096 16384

Options are spelled as train.py's (--max_docs); dashes work too (--max-docs). An existing family is
never replaced without --overwrite: the models trained with it would no longer load. Quiet but for a
few progress lines; --verbose adds sentencepiece's own log, --quiet drops everything but the result.

Input: whatever train.py's --data takes (toolkit/data.py reads both): text files (documents separated
by <|endoftext|>, one per line, or one whole text), jsonl with a "text" field, parquet with a "text"
column, or a Hugging Face dataset (streamed).
"""
import io
import json
import shlex
import sys
import time
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from toolkit.cli import Parser
from toolkit.data import DataError, read_documents
from toolkit.tokenizer import (
    BOS_ID,
    EOS_ID,
    FAMILY_FILE,
    MODEL_FILE,
    N_BASE_PIECES,
    N_THREADS,
    PAD_ID,
    SPECIAL_PIECES,
    TOKENIZERS_DIR,
    UNK_ID,
    SentencePieceTokenizer,
    TokenizerError,
    family_min_size,
)

DEFAULT_SIZES = (512, 1024, 2048, 4096, 8192)
# sentencepiece skips longer sentences silently, so documents are cut into chunks that fit
MAX_SENTENCE_BYTES = 4192
SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe",
    # exact round trips: no normalization, spaces kept as they are, no space added in front
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    byte_fallback=True,  # characters outside the vocabulary become their UTF-8 byte pieces, never <unk>
    split_digits=True,  # numbers as single digits, as Llama does: no arbitrary number pieces
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
    unk_surface="",  # special ids decode to nothing
    max_sentence_length=MAX_SENTENCE_BYTES,
)


def read_sources(specs, max_docs=None, verbose=True) -> tuple[list[str], list[dict]]:
    """Documents of each source (local files, folders, globs, dataset names or hf:IDs, read by the same
    reader as training data) and one {"path", "bytes", "documents"} record per source."""
    from tqdm import tqdm
    documents, sources = [], []
    for spec in specs:
        docs = list(tqdm(read_documents(str(spec), max_docs=max_docs), desc=f"reading {spec}", unit=" docs",
                         disable=not verbose))
        n_bytes = sum(len(d.encode()) for d in docs)
        if n_bytes == 0:  # sentencepiece would fail with an INTERNAL error
            raise TokenizerError(f"{spec} holds no text (empty or only blank lines): give files with text")
        documents += docs
        sources.append({"path": str(spec), "bytes": n_bytes, "documents": len(docs)})
    return documents, sources


def split_long_document(doc: str, max_bytes: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Chunks of at most max_bytes UTF-8 bytes that join back to doc: cut after the last newline that fits,
    else before the last space, else at the last character boundary."""
    data, chunks, start = doc.encode(), [], 0
    while len(data) - start > max_bytes:
        window = data[start:start + max_bytes]
        cut = window.rfind(b"\n") + 1 or max(window.rfind(b" "), 0)
        if cut == 0:
            cut = max_bytes
            while data[start + cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back off to the character start
                cut -= 1
        chunks.append(data[start:start + cut].decode())
        start += cut
    return chunks + [data[start:].decode()]


def split_last_fraction(documents, fraction):
    """(first documents, last documents) where the last ones hold about `fraction` of the bytes."""
    if not 0 < fraction < 1:
        raise TokenizerError(f"--heldout_fraction must be between 0 and 1, not {fraction}")
    sizes = [len(doc.encode()) for doc in documents]
    budget, cut = (1 - fraction) * sum(sizes), 0
    while cut < len(documents) and budget > 0:
        budget -= sizes[cut]
        cut += 1
    return documents[:cut], documents[cut:]


def check_free(out_dir: Path, overwrite: bool):
    """Refuse to replace a trained family: models trained with it would no longer load."""
    if (Path(out_dir) / MODEL_FILE).is_file() and not overwrite:
        raise TokenizerError(f"{out_dir} already holds a tokenizer family, and models trained with it would no "
                             f"longer load if it changed: pick another --name (or --out), or pass --overwrite")


def train_family(documents, sizes, out_dir, heldout=None, character_coverage=0.9995, verbose=True,
                 description=None, overwrite=False, sentencepiece_log=False) -> dict:
    """Train at max(sizes), write the nested model, check every size, measure bytes per token on the held-out
    documents and write family.json and README.md. `description` (a dict) adds to family.json. An existing
    family in out_dir is only replaced with `overwrite`; `sentencepiece_log` shows sentencepiece's own log."""
    sizes = sorted(set(sizes))
    out_dir = Path(out_dir)
    check_free(out_dir, overwrite)
    n_bytes = sum(len(doc.encode()) for doc in documents)
    if n_bytes == 0:
        raise TokenizerError("no text to train on: the documents are empty")
    sentences = [chunk for doc in documents for chunk in split_long_document(doc)]
    _log(verbose, f"training BPE at {sizes[-1]} on {len(documents):,} documents ({n_bytes / 1e6:.1f} MB, "
                  f"{len(sentences):,} sentences) with sentencepiece")
    start = time.perf_counter()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=sizes[-1],
                                       character_coverage=character_coverage, num_threads=N_THREADS,
                                       minloglevel=0 if sentencepiece_log else 2, **SENTENCEPIECE_OPTIONS)
    except RuntimeError as e:  # sentencepiece reports bad input (too little text for the size) this way
        reason = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # without its source location
        raise TokenizerError(f"sentencepiece training failed: {reason} (--sizes sets vocab_size)") from e
    seconds = time.perf_counter() - start
    _log(verbose, f"trained in {seconds:.1f} s")

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    nested = nest_pieces(proto)
    min_size = family_min_size(nested, "the trained model")
    if sizes[0] < min_size:
        raise TokenizerError(f"size {sizes[0]} is below this family's minimum {min_size} (4 specials, 256 bytes, "
                             f"{min_size - N_BASE_PIECES} characters); ask for larger sizes or a lower "
                             f"--character_coverage")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(nested.SerializeToString())
    tokenizers = [SentencePieceTokenizer(out_dir / MODEL_FILE, size, name=f"{out_dir.name}-{size}") for size in sizes]
    for tokenizer in tokenizers:
        _check_member(tokenizer, nested, heldout or documents[:200])
    bytes_per_token = {str(t.vocab_size): round(t.bytes_per_token(heldout), 3) for t in tokenizers} if heldout else {}
    family = {
        "name": out_dir.name, "model_file": MODEL_FILE, "sizes": sizes, "min_size": min_size,
        "max_size": sizes[-1], "special_ids": dict(zip(("unk", "bos", "eos", "pad"), range(len(SPECIAL_PIECES)))),
        **(description or {}),
        "training_documents": len(documents), "training_bytes": n_bytes, "training_sentences": len(sentences),
        "heldout_documents": len(heldout or []), "heldout_bytes": sum(len(doc.encode()) for doc in heldout or []),
        "bytes_per_token": bytes_per_token,
        "training_seconds": round(seconds, 1),
        "sentencepiece": {**SENTENCEPIECE_OPTIONS, "vocab_size": sizes[-1], "character_coverage": character_coverage},
    }
    (out_dir / FAMILY_FILE).write_text(json.dumps(family, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(family_readme(family))
    return family


def nest_pieces(proto):
    """The model with pieces as [specials, 256 bytes, characters, merges in merge order], so that every prefix
    is a valid smaller BPE model. sentencepiece's BPE trainer puts merges (score -k for the k-th merge) before
    the single characters; scores stay, since they are the merge priorities."""
    rest = proto.pieces[N_BASE_PIECES:]
    characters = [piece for piece in rest if len(piece.piece) == 1]
    merges = sorted((piece for piece in rest if len(piece.piece) > 1), key=lambda piece: -piece.score)
    nested = sentencepiece_model_pb2.ModelProto()
    nested.CopyFrom(proto)
    del nested.pieces[:]
    nested.pieces.extend([*proto.pieces[:N_BASE_PIECES], *characters, *merges])
    return nested


def family_readme(family: dict) -> str:
    rows = "\n".join(f"| {size} | {family['bytes_per_token'].get(str(size), '–')} |" for size in family["sizes"])
    sources = "\n".join(f"- `{s['path']}`: {s['bytes']:,} bytes, {s['documents']:,} documents"
                        for s in family.get("sources", []))
    command = family.get("command", "").replace(" --", " \\\n    --")
    return f"""# {family['name']}: nested BPE tokenizers

{family.get('about', '')}

Load a member with `load_tokenizer("{family['name']}-<size>")` (from `toolkit.tokenizer`); any size from
{family['min_size']} to {family['max_size']} works, not only the listed ones. All sizes live in the one
`{family['model_file']}`: its first N pieces are the size-N tokenizer, so members share their first ids.

## Data

{sources}

Trained on {family['training_documents']:,} documents ({family['training_bytes']:,} bytes of UTF-8, cut into
{family['training_sentences']:,} sentencepiece sentences of at most {MAX_SENTENCE_BYTES} bytes).
{family.get('heldout', '')} Held out: {family['heldout_documents']:,} documents, {family['heldout_bytes']:,} bytes.

## Bytes per token on the held-out text

UTF-8 bytes of the held-out documents divided by the number of their tokens (no bos/eos); the byte
tokenizer gets 1.0.

| size | bytes/token |
|---|---|
{rows}

## Layout and settings

ids 0..3 are `<unk>` `<s>` (bos) `</s>` (eos) `<pad>`; 4..259 are the byte-fallback pieces `<0x00>`..`<0xFF>`;
then the {family['min_size'] - N_BASE_PIECES} characters kept by character coverage
{family['sentencepiece']['character_coverage']}; then merged pieces in merge order. No normalization, byte
fallback on, digits split: decoding gives back the exact text. Settings are in `family.json`. Training took
{family['training_seconds']} s.

Trained from the repository root with:

```
{command}
```
"""


def _check_member(tokenizer, nested, documents):
    """A family member is the prefix of the trained model and encodes text exactly within its ids."""
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert pieces == [piece.piece for piece in nested.pieces[:tokenizer.vocab_size]]
    encoded = tokenizer.encode(documents)
    assert max(max(ids, default=0) for ids in encoded) < tokenizer.vocab_size
    assert tokenizer.decode(encoded) == documents


def _log(verbose, message):
    if verbose:
        print(message, file=sys.stderr, flush=True)


def option(parser, name, **kwargs):
    """--name as train.py spells it (underscores), and with dashes."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    return parser.add_argument(*spellings, dest=name, **kwargs)


def parse_args(argv):
    parser = Parser("python -m toolkit.tokenizer_training", description=__doc__)
    option(parser, "name", required=True, help="family name; the folder is tokenizers/<name> unless --out")
    option(parser, "data", nargs="+", required=True,
           help="text files, folders or globs (.txt, .jsonl, .parquet), dataset names "
                "(tinystories, fineweb-edu) or hf:owner/name[:config], as train.py's --data")
    option(parser, "max_docs", type=int, help="read at most this many documents of each source")
    option(parser, "sizes", type=int, nargs="+", default=DEFAULT_SIZES,
           help="vocabulary sizes, special tokens included; trained once at the largest")
    heldout = parser.add_mutually_exclusive_group()
    option(heldout, "heldout", nargs="+", help="held-out files for bytes per token (not trained on)")
    option(heldout, "heldout_fraction", type=float,
           help="hold out this last fraction of the documents (by bytes) instead of training on it")
    option(parser, "character_coverage", type=float, default=0.9995,
           help="share of characters that get their own piece; rarer ones use byte pieces")
    option(parser, "about", default="", help="a sentence for the README about what the family is for")
    option(parser, "out", help="output folder (default tokenizers/<name>)")
    option(parser, "overwrite", action="store_true", help="replace an existing family of that name")
    option(parser, "verbose", action="store_true", help="show sentencepiece's log too")
    option(parser, "quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir, verbose = Path(args.out or TOKENIZERS_DIR / args.name), not args.quiet
    try:
        check_free(out_dir, args.overwrite)  # before reading, which can take long
        documents, sources = read_sources(args.data, args.max_docs, verbose)
        heldout_docs, heldout_note = None, ""
        if args.heldout:
            heldout_docs, heldout_sources = read_sources(args.heldout, verbose=verbose)
            heldout_note = "Held-out files: " + ", ".join(f"`{s['path']}`" for s in heldout_sources) + "."
        elif args.heldout_fraction is not None:
            documents, heldout_docs = split_last_fraction(documents, args.heldout_fraction)
            heldout_note = f"The last {args.heldout_fraction:.0%} of these documents (by bytes) are held out."
        command = "python -m toolkit.tokenizer_training " + shlex.join(sys.argv[1:] if argv is None else argv)
        description = {"about": args.about, "sources": sources, "heldout": heldout_note, "command": command}
        family = train_family(documents, args.sizes, out_dir, heldout_docs, args.character_coverage, verbose,
                              description, overwrite=args.overwrite, sentencepiece_log=args.verbose)
    except (DataError, TokenizerError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out_dir}: sizes {family['sizes']}, bytes/token {family['bytes_per_token']}")


if __name__ == "__main__":
    main()
