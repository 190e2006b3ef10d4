"""The token shard format, shared by the preparation script and the loader.

Format (llm.c `dev/data/data_common.py`, GPT-2 flavour; also what GRAPE and modded-nanogpt read):

    bytes [0, 1024)       header: 256 int32, little-endian
                            [0] magic   20240520
                            [1] version 1
                            [2] number of tokens N in this file
                            [3..255] zero
    bytes [1024, 1024+2N) the tokens, uint16 little-endian, in stream order

Invariants checked by `read_header` on every open:
  * the file holds at least the 1024-byte header;
  * magic == 20240520 and version == 1 (llm.c's Llama-3 flavour, magic 20240801 / version 7 with uint32 tokens, is
    recognised and refused with a clear message);
  * file size == 1024 + 2 * N exactly (fewer bytes = truncated copy; 4 * N bytes = uint32 tokens; anything else =
    a different format).
The value range (every token < the model's vocabulary size) is not a header property: it is checked by the loader
(see data/loader.py for where and why) or by `check_token_range`.

File names follow llm.c: `{prefix}_val_000000.bin` for shard 0 (validation), `{prefix}_train_{i:06d}.bin` for i >= 1.

Writes are atomic (durable.py): the shard goes to a hidden temporary file in the same directory, is fsync'ed, then
renamed over the final name (and the directory fsync'ed), so a crash never leaves a half-written file under a shard
name.

`python -m data.shards DIR_OR_GLOB [--vocab-size V] [--checksums]` validates a directory of shards (headers, sizes,
optionally the value range and the sha256 sums recorded in DIR/manifest.json) and prints a summary.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from durable import atomic_write_bytes
from errors import UserError, exit_status

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_SHARD_TOKENS = 2**31 - 1  # the count is an int32 header field

_LLAMA3_MAGIC, _LLAMA3_VERSION = 20240801, 7  # llm.c's uint32 flavour: recognised only to explain the refusal
_SHARD_RE = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d{6})\.bin$")


class ShardError(UserError, ValueError):
    """A shard file that is malformed, truncated, or holds tokens the model cannot embed."""


def shard_name(prefix: str, index: int) -> str:
    """llm.c naming: shard 0 is the validation split, every later shard is train."""
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.bin"


def parse_shard_name(name: str) -> tuple[str, str, int] | None:
    """(prefix, split, index) for a name produced by `shard_name`, else None."""
    m = _SHARD_RE.match(name)
    return (m["prefix"], m["split"], int(m["index"])) if m else None


def encode_header(num_tokens: int) -> bytes:
    if not 0 <= num_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds 0..{MAX_SHARD_TOKENS} tokens, got {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header.tobytes()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Atomically write one shard; returns the sha256 (hex) of the complete file."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype != TOKEN_DTYPE:
        raise TypeError(f"shard tokens must be {TOKEN_DTYPE} (uint16 little-endian), got {tokens.dtype}")
    header = encode_header(tokens.size)
    body = memoryview(tokens).cast("B")
    digest = hashlib.sha256(header)
    digest.update(body)
    atomic_write_bytes(path, (header, body))
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and file size of a shard; returns its token count. Raises ShardError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e})") from e
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes, smaller than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, n = int(header[0]), int(header[1]), int(header[2])
    if magic == _LLAMA3_MAGIC and version == _LLAMA3_VERSION:
        raise ShardError(f"{path}: magic {magic} / version {version} is llm.c's Llama-3 uint32 format; "
                         f"this repo reads GPT-2 uint16 shards (magic {MAGIC}, version {VERSION})")
    if magic != MAGIC:
        raise ShardError(f"{path}: bad magic {magic}, expected {MAGIC} (not an llm.c GPT-2 token shard)")
    if version != VERSION:
        raise ShardError(f"{path}: bad version {version}, expected {VERSION}")
    if n < 0:
        raise ShardError(f"{path}: negative token count {n} in header")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * n
    if size != expected:
        if size < expected:
            problem = f"truncated: header says {n} tokens ({expected} bytes) but the file has {size} bytes"
        elif size == HEADER_BYTES + 4 * n:
            problem = (f"wrong token size: {size} bytes = header + 4 bytes x {n} tokens (uint32?), "
                       f"expected uint16 ({expected} bytes)")
        else:
            problem = f"size mismatch: header says {n} tokens ({expected} bytes) but the file has {size} bytes"
        raise ShardError(f"{path}: {problem}")
    return n


def open_shard(path: str | os.PathLike) -> np.memmap:
    """Validated, read-only memmap of a shard's tokens (uint16, shape (N,)), header excluded."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # np.memmap refuses empty maps
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def check_token_range(path, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Raise ShardError if any token >= vocab_size. Chunked so that a memmap is never copied whole."""
    for lo in range(0, tokens.size, chunk):
        part = tokens[lo:lo + chunk]
        top = int(part.max())
        if top >= vocab_size:
            where = lo + int(np.argmax(part >= vocab_size))
            raise ShardError(f"{path}: token {int(tokens[where])} at position {where} is >= vocab_size {vocab_size}")


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(block):
            h.update(buf)
    return h.hexdigest()


def find_shards(dir_or_glob, split: str) -> list[Path]:
    """Sorted shard paths of one split ('train' or 'val').

    A directory gives every `*_{split}_*.bin` in it. A glob pattern or explicit list is taken as given, but a
    validation shard among training shards (or the reverse) is refused: silently training on the validation split is
    the mistake this guards against.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(dir_or_glob, (list, tuple)):
        paths = [Path(p) for p in dir_or_glob]
    elif Path(dir_or_glob).is_dir():
        paths = [Path(p) for p in glob.glob(os.path.join(glob.escape(str(dir_or_glob)), f"*_{split}_*.bin"))]
    else:
        paths = [Path(p) for p in glob.glob(str(dir_or_glob))]
    paths = sorted(paths, key=lambda p: p.name)
    if not paths:
        raise ShardError(f"no {split} shards found at {dir_or_glob!r} (expected files named *_{split}_NNNNNN.bin)")
    for p in paths:
        parsed = parse_shard_name(p.name)
        if parsed is not None and parsed[1] != split:
            raise ShardError(f"{p}: is a {parsed[1]} shard but was given as a {split} shard")
    return paths


def _recorded_checksums(manifest: Path) -> dict:
    """{shard file name: sha256} from a preparation's manifest.json (format in data/manifest.py)."""
    import json

    if not manifest.is_file():
        raise ShardError(f"--checksums needs {manifest} (written by python -m data.fineweb_edu)")
    try:
        return {s["file"]: s["sha256"] for s in json.loads(manifest.read_text())["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e}); expected the 'shards' list "
                         f"of data/manifest.py") from None


def main(argv=None) -> int:
    """Exit status: 0 all shards valid, 1 some bad or none found, 2 an unusable argument (one error line)."""
    return exit_status(_main, argv)


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Validate llm.c-format token shards.")
    ap.add_argument("path", help="shard directory or glob")
    ap.add_argument("--vocab-size", type=int, default=None, help="also check every token < this (reads all data)")
    ap.add_argument("--checksums", action="store_true", help="compare sha256 with DIR/manifest.json")
    args = ap.parse_args(argv)
    if Path(args.path).is_dir():
        paths = sorted(Path(args.path).glob("*.bin"), key=lambda p: p.name)
    else:
        paths = sorted((Path(p) for p in glob.glob(args.path)), key=lambda p: p.name)
    recorded = {}
    manifest = Path(args.path) / "manifest.json"
    if args.checksums:
        recorded = _recorded_checksums(manifest)
    total, bad = 0, 0
    for p in paths:
        try:
            n = read_header(p)
            if args.vocab_size is not None:
                check_token_range(p, open_shard(p), args.vocab_size)
            if args.checksums and recorded.get(p.name) != file_sha256(p):
                raise ShardError(f"{p}: sha256 differs from manifest.json")
            total += n
            print(f"ok   {p.name}  {n:,} tokens")
        except ShardError as e:
            bad += 1
            print(f"BAD  {e}")
    print(f"{len(paths)} files, {bad} bad, {total:,} tokens in valid files")
    return 1 if bad or not paths else 0


if __name__ == "__main__":
    raise SystemExit(main())
