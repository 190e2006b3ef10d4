"""Tests of data/shards.py: the llm.c byte layout, refusal of damaged files, the token range, the split guard."""

import hashlib
import struct

import numpy as np
import pytest

from data import shards
from data.loader import TokenLoader, ValidationSet
from data.shards import ShardError
from data.tokenizer import EOT


def test_shard_bytes_match_llmc_layout(tmp_path):
    toks = np.array([EOT, 1, 2, 65535, 50000], dtype=np.uint16)
    digest = shards.write_shard(tmp_path / "a.bin", toks)
    raw = (tmp_path / "a.bin").read_bytes()
    assert raw == struct.pack("<256i", 20240520, 1, 5, *[0] * 253) + struct.pack("<5H", *toks.tolist())
    assert digest == hashlib.sha256(raw).hexdigest()
    assert shards.read_header(tmp_path / "a.bin") == 5
    assert np.array_equal(shards.open_shard(tmp_path / "a.bin"), toks)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp file left behind


@pytest.mark.parametrize("damage, message", [
    (lambda raw: struct.pack("<i", 12345) + raw[4:], "bad magic 12345"),
    (lambda raw: raw[:4] + struct.pack("<i", 2) + raw[8:], "bad version 2"),
    (lambda raw: raw[:-3], "truncated"),
    (lambda raw: raw[:500], "truncated"),
    (lambda raw: raw + b"\0" * 20, "uint32"),
    (lambda raw: raw + b"\0" * 2, "size mismatch"),
    (lambda raw: struct.pack("<ii", 20240801, 7) + raw[8:], "Llama-3"),
])
def test_corrupt_shards_are_refused(tmp_path, damage, message):
    p = tmp_path / "data_train_000001.bin"
    shards.write_shard(p, np.arange(10, dtype=np.uint16))
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(ShardError, match=message) as err:
        TokenLoader(tmp_path, seq_len=4, batch_size=1)
    assert str(p) in str(err.value)


def test_token_out_of_vocab_is_refused(tmp_path):
    good = (np.arange(400) % 1000).astype(np.uint16)
    bad = good.copy()
    bad[123] = 50304
    shards.write_shard(tmp_path / "data_val_000000.bin", bad)
    shards.write_shard(tmp_path / "data_train_000001.bin", good)
    shards.write_shard(tmp_path / "data_train_000002.bin", bad)
    loader = TokenLoader(tmp_path, seq_len=8, batch_size=4, vocab_size=50304)
    with pytest.raises(ShardError, match=r"data_train_000002\.bin: token 50304 at position 123 is >= vocab_size"):
        for _ in range(2 * loader.steps_per_epoch):
            loader.next_batch()
    with pytest.raises(ShardError, match=r"data_val_000000\.bin: token 50304 at position 123"):
        ValidationSet(tmp_path, seq_len=8, num_tokens=200)
    ValidationSet(tmp_path, seq_len=8, num_tokens=120)  # the budget stops before the bad token
    TokenLoader(tmp_path / "data_train_000002.bin", seq_len=8, batch_size=1, vocab_size=50305).next_batch()


def test_validation_shard_never_used_for_training(tmp_path):
    shards.write_shard(tmp_path / "data_val_000000.bin", np.zeros(100, np.uint16))
    with pytest.raises(ShardError, match="no train shards"):
        TokenLoader(tmp_path, seq_len=8, batch_size=1)
    with pytest.raises(ShardError, match="is a val shard"):
        TokenLoader(str(tmp_path / "*.bin"), seq_len=8, batch_size=1)
