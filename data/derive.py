"""Rebuild the committed data/ files from their public sources (data/README.md says where each comes from):

    python data/derive.py SOURCES [--out FOLDER]

SOURCES is a folder with tinystories/ and tinyshakespeare/ holding the source files named below, byte for
byte as in their repositories. The outputs are byte for byte the committed ones: the gzip container is
written here with fixed header fields (no name, mtime 0), so only zlib's level-9 deflate must agree.
Needs nothing but the Python standard library.
"""
import argparse
import gzip
import hashlib
import json
import struct
import zlib
from pathlib import Path

SEPARATOR = "<|endoftext|>"
# (file, layout) in the fixed order that decides which copy of a duplicated story is kept
TINYSTORIES = [
    ("tinystories/tinystories_sample_3000.json", "json"),
    ("tinystories/TinyStories-train-first1000.txt", "lines"),
    ("tinystories/tinystories_extra_1.txt", "separated"),
    ("tinystories/tinystories_sample_cs336.txt", "separated"),
    ("tinystories/tinystories_extra_2.txt", "separated"),
]
ALWAYS_HELD_OUT = "tinystories/tinystories_extra_2.txt"  # the shipped models' held-out stories stay held out
HASH_HELD_OUT = 625  # plus the stories with the smallest sha256 of their text
SHAKESPEARE = "tinyshakespeare/input.txt"


def read_stories(path: Path, layout: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if layout == "json":
        stories = json.loads(text)["texts"]
    elif layout == "lines":
        stories = text.split("\n")
    else:  # stories separated by lines that hold only <|endoftext|>
        stories = "\n".join(SEPARATOR if line.strip() == SEPARATOR else line for line in text.split("\n"))
        stories = stories.split(f"\n{SEPARATOR}\n")
        stories[0] = stories[0].removeprefix(f"{SEPARATOR}\n")
        stories[-1] = stories[-1].removesuffix(f"\n{SEPARATOR}").removesuffix(SEPARATOR)
    return [story.strip() for story in stories if story.strip()]


def collect(sources: Path):
    """[(story, source file)] without duplicates (whitespace-normalised text, first copy kept), and per-file counts."""
    kept, seen, counts = [], set(), {}
    for name, layout in TINYSTORIES:
        stories = read_stories(sources / name, layout)
        duplicates = 0
        for story in stories:
            key = " ".join(story.split())
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append((story, name))
        counts[name] = {"stories": len(stories), "duplicates_dropped": duplicates}
    return kept, counts


def story_hash(story: str) -> str:
    return hashlib.sha256(story.encode("utf-8")).hexdigest()


def split_heldout(kept):
    """(train stories, held-out stories), both in source order."""
    candidates = sorted(story_hash(story) for story, name in kept if name != ALWAYS_HELD_OUT)
    chosen = set(candidates[:HASH_HELD_OUT])
    heldout = [story for story, name in kept if name == ALWAYS_HELD_OUT or story_hash(story) in chosen]
    train = [story for story, name in kept if name != ALWAYS_HELD_OUT and story_hash(story) not in chosen]
    return train, heldout


def v2_layout(stories) -> bytes:
    return "".join(story + f"\n{SEPARATOR}\n" for story in stories).encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed header (no file name, mtime 0, maximum compression flag, OS 255 'unknown')."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
    body = deflate.compress(data) + deflate.flush()
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x02\xff"
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip_bytes(data))
    assert gzip.decompress(path.read_bytes()) == data
    print(f"{path}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()} "
          f"(.gz {path.stat().st_size:,} bytes, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", type=Path, help="folder holding tinystories/ and tinyshakespeare/")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output folder (default: data/)")
    args = parser.parse_args()
    kept, counts = collect(args.sources)
    for name, count in counts.items():
        print(f"{name}: {count['stories']:,} stories, {count['duplicates_dropped']:,} duplicates dropped")
    train, heldout = split_heldout(kept)
    print(f"{len(kept):,} distinct stories: {len(train):,} train, {len(heldout):,} held out")
    write(args.out / "tinystories" / "train.txt.gz", v2_layout(train))
    write(args.out / "tinystories" / "heldout.txt.gz", v2_layout(heldout))
    write(args.out / "tinyshakespeare" / "input.txt.gz", (args.sources / SHAKESPEARE).read_bytes())


if __name__ == "__main__":
    main()
