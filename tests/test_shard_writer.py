"""Tests of data/shard_writer.py on a hand-made token stream: the shards are the stream cut every shard_size tokens,
each record states where its shard ends and where to restart, a writer restarted from any record continues the
stream byte for byte, max_shards stops mid-batch, and write errors reach the caller with the manifest consistent."""

import json

import numpy as np
import pytest

from data import shards
from data.manifest import MANIFEST
from data.shard_writer import ShardWriter
from helpers import shard_paths, shard_tokens, visible_files

SHARD_SIZE = 50
DOC_LENGTHS = [7, 30, 1, 120, 13, 13, 49, 2, 65, 8, 40, 3, 3, 77, 20]  # 451 tokens; the 120-token one spans 4 shards
DOCS_PER_BATCH = 4


def batches():
    """(restart, tokens, doc_lengths) per batch of DOCS_PER_BATCH documents; the token at stream position p is p, so
    every shard shows which part of the stream it holds. The source state of a batch is its first document's index."""
    out, tokens = [], 0
    for first in range(0, len(DOC_LENGTHS), DOCS_PER_BATCH):
        lengths = np.array(DOC_LENGTHS[first:first + DOCS_PER_BATCH], dtype=np.int64)
        stream = np.arange(tokens, tokens + int(lengths.sum()), dtype=np.uint16)
        out.append(({"docs": first, "tokens": tokens, "state": first}, stream, lengths))
        tokens += int(lengths.sum())
    return out


def fresh_manifest():
    return {"identity": {"test": True}, "shards": [], "complete": False, "totals": None}


def write(out_dir, manifest, max_shards=None):
    """Feed the batches from the writer's restart point on, as data/fineweb_edu.py does."""
    out_dir.mkdir(exist_ok=True)
    with ShardWriter(out_dir, manifest, SHARD_SIZE, "w", max_shards) as writer:
        start = writer.restart_point()["state"] or 0
        for restart, tokens, lengths in [b for b in batches() if b[0]["state"] >= start]:
            writer.add(tokens, lengths, restart)
            if writer.full:
                break
        else:
            writer.finish(documents=len(DOC_LENGTHS))
    return writer


def test_shards_and_records_follow_the_stream(tmp_path):
    manifest = fresh_manifest()
    write(tmp_path, manifest)
    total = sum(DOC_LENGTHS)
    assert shard_tokens(tmp_path).tolist() == list(range(total))
    sizes = [shards.read_header(p) for p in shard_paths(tmp_path)]
    assert sizes == [SHARD_SIZE] * (total // SHARD_SIZE) + [total % SHARD_SIZE]  # the last at its true length
    doc_starts = np.cumsum(DOC_LENGTHS) - DOC_LENGTHS
    for i, (rec, path) in enumerate(zip(manifest["shards"], shard_paths(tmp_path))):
        assert (rec["index"], rec["file"], rec["split"]) == (i, path.name, "val" if i == 0 else "train")
        assert rec["sha256"] == shards.file_sha256(path) and rec["tokens"] == sizes[i]
        assert rec["end_tokens"] == sum(sizes[:i + 1])
        assert rec["end_docs"] == int((doc_starts < rec["end_tokens"]).sum())
        restart = rec["resume"]  # the batch in which the shard ends
        batch_end = restart["tokens"] + sum(DOC_LENGTHS[restart["docs"]:restart["docs"] + DOCS_PER_BATCH])
        assert restart["tokens"] < rec["end_tokens"] <= batch_end and restart["state"] == restart["docs"]
    assert manifest["complete"] and manifest["totals"] == {"documents": len(DOC_LENGTHS), "tokens": total,
                                                           "shards": len(sizes), "val_tokens": SHARD_SIZE,
                                                           "train_tokens": total - SHARD_SIZE}
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5, 7, 9])
def test_restart_from_any_record_continues_byte_for_byte(tmp_path, stop_after):
    write(tmp_path / "ref", fresh_manifest())
    partial = fresh_manifest()
    writer = write(tmp_path / "cut", partial, max_shards=stop_after)
    assert writer.full and len(partial["shards"]) == stop_after and not partial["complete"]
    saved = json.loads((tmp_path / "cut" / MANIFEST).read_text())  # what a re-run reads
    write(tmp_path / "cut", saved)  # restarts inside the batch in which the last recorded shard ended
    assert visible_files(tmp_path / "cut") == visible_files(tmp_path / "ref")


def test_max_shards_stops_inside_a_batch(tmp_path):
    manifest = fresh_manifest()
    with ShardWriter(tmp_path, manifest, SHARD_SIZE, "w", max_shards=2) as writer:
        writer.add(np.zeros(5 * SHARD_SIZE + 3, np.uint16), np.array([5 * SHARD_SIZE + 3]),
                   {"docs": 0, "tokens": 0, "state": None})
        assert writer.full and writer.tokens == 2 * SHARD_SIZE
    assert len(shard_paths(tmp_path)) == 2 and len(manifest["shards"]) == 2


def test_a_batch_after_the_writer_position_is_refused(tmp_path):
    with ShardWriter(tmp_path, fresh_manifest(), SHARD_SIZE, "w") as writer:
        writer.add(np.zeros(10, np.uint16), np.array([10]), {"docs": 0, "tokens": 0, "state": None})
        with pytest.raises(ValueError, match="starts at stream token 11, after the writer's position 10"):
            writer.add(np.zeros(10, np.uint16), np.array([10]), {"docs": 1, "tokens": 11, "state": None})


def test_a_failed_shard_write_reaches_the_caller_and_is_not_recorded(tmp_path, monkeypatch):
    real = shards.write_shard

    def full_disk_on_second_shard(path, tokens):
        if path.name == shards.shard_name("w", 1):
            raise OSError(28, "No space left on device")
        return real(path, tokens)

    monkeypatch.setattr(shards, "write_shard", full_disk_on_second_shard)
    manifest = fresh_manifest()
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path, manifest)
    saved = json.loads((tmp_path / MANIFEST).read_text())
    assert [r["file"] for r in saved["shards"]] == [shards.shard_name("w", 0)] and not saved["complete"]
    assert [p.name for p in shard_paths(tmp_path)] == [shards.shard_name("w", 0)]
