"""Tests of data/sources.py: txt / jsonl.gz / parquet documents and restart states, and the Hugging Face path
(datasets streaming, run offline on local parquet) giving the same shards as local files."""

import gzip
import json

from data.fineweb_edu import prepare
from data.sources import FileSource, HFSource
from helpers import DOCUMENTS, decode_documents, prepare_tiny, shard_tokens, visible_files, write_txt


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


def test_txt_crlf_and_gzip_give_same_documents(tmp_path):
    a = write_txt(tmp_path / "a.txt.gz", DOCUMENTS, gz=True)
    b = tmp_path / "b.txt"
    b.write_bytes(("\r\n\r\n\r\n".join(DOCUMENTS) + "\r\n").encode())
    for s in (a, b):
        assert [t for _, batch in FileSource([s]).batches(None, 3) for t in batch] == DOCUMENTS


def test_jsonl_and_parquet_inputs(tmp_path):
    j = write_jsonl_gz(tmp_path / "d.jsonl.gz", DOCUMENTS)
    q = write_parquet(tmp_path / "d.parquet", DOCUMENTS)
    prepare(FileSource([j]), tmp_path / "j", shard_size=50, workers=0, progress=False)
    prepare(FileSource([q]), tmp_path / "q", shard_size=50, workers=0, progress=False)
    assert decode_documents(shard_tokens(tmp_path / "j")) == DOCUMENTS
    assert visible_files(tmp_path / "j").keys() == visible_files(tmp_path / "q").keys()
    for name, data in visible_files(tmp_path / "j").items():
        if name.endswith(".bin"):
            assert data == (tmp_path / "q" / name).read_bytes()
    # several files in order; resume states inside a parquet file skip row groups correctly
    src = FileSource([q, j])
    every = [t for _, batch in src.batches(None, 3) for t in batch]
    assert every == DOCUMENTS + DOCUMENTS
    for state, batch in src.batches(None, 3):
        assert next(src.batches(state, 3))[1] == batch


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
    prepare_tiny(hf, tmp_path / "hf", batch_docs=8)
    prepare_tiny(FileSource(files), tmp_path / "local", batch_docs=8)
    bins = {k: v for k, v in visible_files(tmp_path / "hf").items() if k.endswith(".bin")}
    assert bins == {k: v for k, v in visible_files(tmp_path / "local").items() if k.endswith(".bin")}
    assert decode_documents(shard_tokens(tmp_path / "hf")) == docs
    prepare_tiny(hf, tmp_path / "hf2", batch_docs=8, max_shards=4)
    prepare_tiny(HFSource("parquet", name=None, data_files=files), tmp_path / "hf2", batch_docs=8)
    assert visible_files(tmp_path / "hf2") == visible_files(tmp_path / "hf")

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
