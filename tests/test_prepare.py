"""Tests of the preparation command (data/fineweb_edu.py with data/manifest.py): the llm.c split byte for byte, the
byte tokenizer, parallel == serial, resume after every kind of interruption, refusal of foreign directories, and the
embedded sample through the CLI."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from data import fineweb_edu, shard_writer, shards, tokenizer
from data.fineweb_edu import PrepError, prepare
from data.loader import TokenLoader, ValidationSet
from data.sources import FileSource
from helpers import (DOCUMENTS, REPO, decode_documents, prepare_tiny, shard_paths, shard_tokens, visible_files,
                     write_txt)


def gpt2_stream(docs):
    """The token stream a preparation must produce: [EOT] + GPT-2 ids of each document, concatenated."""
    return [t for d in docs for t in tokenizer.encode_document(tokenizer.gpt2_encoding(), d)]


def test_prepare_txt_roundtrip_headers_and_llmc_split(tmp_path):
    src = write_txt(tmp_path / "in.txt", DOCUMENTS, sep="\n \n\n")  # blank lines may hold whitespace
    man = prepare(FileSource([src]), tmp_path / "out", shard_size=64, prefix="t", workers=0, progress=False)
    files = shard_paths(tmp_path / "out")
    assert [f.name for f in files] == ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, len(files))]
    stream = gpt2_stream(DOCUMENTS)
    # llm.c: the concatenated stream cut every shard_size tokens, last shard at its true length, byte for byte
    expected = [stream[i:i + 64] for i in range(0, len(stream), 64)]
    assert len(files) == len(expected) >= 7
    for f, chunk in zip(files, expected):
        assert f.read_bytes() == struct.pack("<256i", 20240520, 1, len(chunk), *[0] * 253) + \
            np.array(chunk, dtype="<u2").tobytes()
    assert decode_documents(shard_tokens(tmp_path / "out")) == DOCUMENTS
    assert man["complete"] and man["totals"] == {"documents": len(DOCUMENTS), "tokens": len(stream),
                                                 "shards": len(files), "val_tokens": 64,
                                                 "train_tokens": len(stream) - 64}
    assert [r["sha256"] for r in man["shards"]] == [shards.file_sha256(f) for f in files]
    assert man["identity"]["tokenizer"]["vocab_bpe_sha256"] == tokenizer.GPT2_FILES["vocab.bpe"][1]
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == man


def test_byte_tokenizer_shards_roundtrip_and_document_aligned_windows(tmp_path):
    """--tokenizer bytes: every document is [256] + its UTF-8 bytes (non-ASCII included), recorded in the manifest;
    the same shard layout; document-aligned windows start at the byte EOT (256), read from the manifest."""
    docs = DOCUMENTS + ["Ünïcode — naïve café, 東京."]
    src = write_txt(tmp_path / "in.txt", docs)
    serial = prepare(FileSource([src]), tmp_path / "out", shard_size=64, prefix="b", workers=0, progress=False,
                     tokenizer_name="bytes")
    assert serial["identity"]["tokenizer"] == {"name": "bytes", "n_vocab": 257, "eot": 256,
                                               "document_encoding": "[eot] + list(text.encode('utf-8'))"}
    stream = shard_tokens(tmp_path / "out")
    assert stream.tolist() == [t for d in docs for t in [256, *d.encode("utf-8")]]
    loader = TokenLoader(tmp_path / "out", 8, 2, document_aligned=True, vocab_size=257)
    x, _ = loader.next_batch()
    assert (x[:, 0] == 256).all()
    with pytest.raises(ValueError, match="unknown tokenizer 'chars'"):
        prepare(FileSource([src]), tmp_path / "bad", tokenizer_name="chars", workers=0, progress=False)


@pytest.mark.slow  # starts a pool of tokenizer processes
@pytest.mark.parametrize("tokenizer_name, docs, shard_size, batch_docs", [
    ("gpt2", DOCUMENTS * 40, 500, 16),
    ("bytes", DOCUMENTS + ["Ünïcode — naïve café, 東京."], 64, 256),
])
def test_parallel_workers_equal_serial(tmp_path, tokenizer_name, docs, shard_size, batch_docs):
    src = write_txt(tmp_path / "in.txt", docs)
    kw = {"shard_size": shard_size, "progress": False, "batch_docs": batch_docs, "tokenizer_name": tokenizer_name}
    serial = prepare(FileSource([src]), tmp_path / "w0", workers=0, **kw)
    parallel = prepare(FileSource([src]), tmp_path / "w2", workers=2, **kw)
    assert visible_files(tmp_path / "w0") == visible_files(tmp_path / "w2") and serial["shards"] == parallel["shards"]
    assert len(serial["shards"]) >= 3


def test_resume_after_interruption_is_byte_identical(tmp_path, monkeypatch):
    docs = [f"Document {i}: " + "lorem ipsum " * (i % 7) for i in range(60)]
    src = FileSource([write_txt(tmp_path / "in.txt", docs)])
    prepare_tiny(src, tmp_path / "ref")
    ref = visible_files(tmp_path / "ref")
    assert len(ref) > 8

    # 1) stopped after 3 shards (--max-shards), then continued
    man = prepare_tiny(src, tmp_path / "a", max_shards=3)
    assert not man["complete"] and len(shard_paths(tmp_path / "a")) == 3
    prepare_tiny(src, tmp_path / "a")
    assert visible_files(tmp_path / "a") == ref

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
        prepare_tiny(src, tmp_path / "b")
    monkeypatch.setattr(shard_writer, "write_manifest", real)
    assert len(shard_paths(tmp_path / "b")) > len(json.loads((tmp_path / "b/manifest.json").read_text())["shards"])
    prepare_tiny(src, tmp_path / "b")
    assert visible_files(tmp_path / "b") == ref

    # 3) last shards deleted from a finished run, a stale temp file and a damaged shard left around
    files = shard_paths(tmp_path / "b")
    files[-1].unlink()
    files[-2].unlink()
    (tmp_path / "b" / ".r_train_000009.bin.tmp-999").write_bytes(b"junk")
    prepare_tiny(src, tmp_path / "b")
    assert visible_files(tmp_path / "b") == ref and not list((tmp_path / "b").glob(".*tmp*"))
    files[4].write_bytes(files[4].read_bytes()[:-2])
    prepare_tiny(src, tmp_path / "b")
    assert visible_files(tmp_path / "b") == ref

    # 4) a finished directory is left alone
    before = {p: p.stat().st_mtime_ns for p in shard_paths(tmp_path / "b")}
    prepare_tiny(src, tmp_path / "b")
    assert before == {p: p.stat().st_mtime_ns for p in shard_paths(tmp_path / "b")}


def test_existing_directory_of_other_preparation_is_refused(tmp_path):
    docs = [f"doc {i} " * 5 for i in range(20)]
    src = FileSource([write_txt(tmp_path / "in.txt", docs)])
    prepare_tiny(src, tmp_path / "out")
    ref = visible_files(tmp_path / "out")
    with pytest.raises(PrepError, match="shard_size: existing 40 != requested 41"):
        prepare_tiny(src, tmp_path / "out", shard_size=41)
    other = FileSource([write_txt(tmp_path / "in.txt", docs[:-1])])  # same name, different content
    with pytest.raises(PrepError, match="sha256"):
        prepare_tiny(other, tmp_path / "out")
    assert visible_files(tmp_path / "out") == ref
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="no manifest.json"):
        prepare_tiny(src, tmp_path / "foreign")


@pytest.mark.slow  # the CLI in child processes on the whole embedded sample, with a tokenizer pool
def test_embedded_sample_prepares_with_the_cli(tmp_path):
    files = sorted((REPO / "data/sample").glob("*.txt.gz"))
    assert len(files) >= 3 and sum(f.stat().st_size for f in files) <= 5_000_000
    assert (REPO / "data/sample/README.md").is_file()
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "data.fineweb_edu", "--input", *map(str, files), "--out", str(out),
           "--shard-size", "262144", "--workers", "2", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["shards"][0]["tokens"] == 262144 and len(man["shards"]) >= 10
    r = subprocess.run([sys.executable, "-m", "data.shards", str(out), "--vocab-size", "50257", "--checksums"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = [t for _, batch in FileSource(files).batches(None, 1000) for t in batch]
    assert decode_documents(shard_tokens(out)) == docs  # every document of the sample survives the round trip
    loader = TokenLoader(out, seq_len=1024, batch_size=8)
    x, y = loader.next_batch()
    assert x.shape == (8, 1024) and int(x.max()) < 50257
    assert ValidationSet(out, seq_len=1024, num_tokens=131072).num_windows == 128
    r = subprocess.run([sys.executable, "-m", "data.fineweb_edu", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--version" in r.stdout and "--sample" in r.stdout
    # --sample: the sample's default shard size gives a 131,072-token validation shard
    argv = ["--sample", "--out", str(tmp_path / "s"), "--workers", "0", "--max-shards", "2", "--no-progress"]
    assert fineweb_edu.main(argv) == 0
    assert [(p.name, shards.read_header(p)) for p in shard_paths(tmp_path / "s")] == [
        ("sample_val_000000.bin", 131072), ("sample_train_000001.bin", 131072)]
    head = shards.open_shard(out / "data_val_000000.bin")[:131072]
    assert np.array_equal(shards.open_shard(tmp_path / "s/sample_val_000000.bin"), head)


def test_empty_input_is_an_error_and_leaves_no_manifest(tmp_path, capsys):
    empty, out = tmp_path / "empty.txt", tmp_path / "O"
    empty.write_text("")
    assert fineweb_edu.main(["--input", str(empty), "--out", str(out), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: nothing to tokenize: the input empty.txt holds no documents" in err, err
    assert "warning" not in err and not (out / "manifest.json").exists()
    write_txt(empty, ["one document"])  # the corrected input prepares into the same directory
    assert fineweb_edu.main(["--input", str(empty), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]


@pytest.mark.parametrize("flag, value", [("--workers", "-1"), ("--workers", "two"), ("--shard-size", "0"),
                                         ("--shard-size", "abc"), ("--shard-size", "1.5"), ("--max-shards", "0")])
def test_bad_prep_flags_are_named(tmp_path, capsys, flag, value):
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(SystemExit) as stop:
        fineweb_edu.main(["--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "O"), flag, value])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("python -m data.fineweb_edu: error: argument ") and flag in line and repr(value) in line
    assert not (tmp_path / "O").exists()


def test_prepare_names_a_bad_worker_count_or_shard_size(tmp_path):
    source = FileSource([write_txt(tmp_path / "a.txt", ["text"])])
    with pytest.raises(PrepError, match="--workers: expected 0 .* got -1"):
        prepare(source, tmp_path / "O", shard_size=10, workers=-1)
    with pytest.raises(PrepError, match=r"--shard-size: expected a token count in \[1, "):
        prepare(source, tmp_path / "O", shard_size=0)
    assert not (tmp_path / "O").exists()


def test_a_missing_or_unsupported_input_is_one_error_line(tmp_path, capsys):
    assert fineweb_edu.main(["--input", str(tmp_path / "none.txt"), "--out", str(tmp_path / "O")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.txt'}: input file not found\n"
    (tmp_path / "a.csv").write_text("x")
    assert fineweb_edu.main(["--input", str(tmp_path / "a.csv"), "--out", str(tmp_path / "O")]) == 2
    assert "a.csv: unsupported input type" in capsys.readouterr().err


def test_a_directory_another_preparation_holds_is_refused(tmp_path):
    from lockfile import DirectoryLock, LockError

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(DOCUMENTS) + "\n")
    with DirectoryLock(tmp_path / "out", "data preparation"):
        with pytest.raises(LockError, match=r"out is in use: data preparation by pid \d+ on host "):
            prepare_tiny(FileSource([src]), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    prepare_tiny(FileSource([src]), tmp_path / "out")  # free again
