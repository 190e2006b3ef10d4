"""ShardWriter: cuts a token stream into shards of a fixed size and records each one in the manifest once it is durable.

Invariants (what a crash at any instant leaves behind, and what a re-run relies on):
  * Shards are numbered consecutively, continuing after the manifest's last record. Each holds exactly `shard_size`
    tokens, except the last shard of a finished stream, which keeps its true length. A document that does not fit is
    split across the boundary (its head ends shard k, its tail starts shard k+1).
  * A shard's record is appended to the manifest, and the manifest rewritten (data/manifest.py), only after the shard
    file is durable (data/shards.py: temp file, fsync, rename). So every record names a complete file; a shard file
    without a record is a crash leftover that the next run deletes and writes again, byte for byte.
  * Records are appended in index order: one writer thread writes one shard at a time, in the order they filled.
  * Memory is two shard buffers: the one filling and the one being written. `add` waits for the write of the
    previous shard before it reuses that buffer, which also raises any error of that write in the caller's thread.
  * The stream is contiguous: a batch handed to `add` starts at (or, right after a restart, before) the writer's
    position `tokens`; tokens before that position are already stored and are dropped, so re-tokenizing from a
    record's restart point continues the stream exactly.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np

from data import shards
from data.manifest import MANIFEST, write_manifest


class ShardWriter:
    """Double-buffered, background shard writer over one output directory and its (already saved) manifest.

        with ShardWriter(out_dir, manifest, shard_size, prefix, max_shards) as writer:
            for restart, tokens, doc_lengths in batches:
                writer.add(tokens, doc_lengths, restart)
                if writer.full:
                    break
            else:
                writer.finish(documents)

    Leaving the `with` block waits for the shard being written (its record is then in the manifest); on an exception
    that write still completes, and the exception propagates.
    """

    def __init__(self, out_dir: Path, manifest: dict, shard_size: int, prefix: str, max_shards: int | None = None):
        self.out_dir, self.manifest = Path(out_dir), manifest
        self.shard_size, self.prefix, self.max_shards = shard_size, prefix, max_shards
        self.records = manifest["shards"]
        self.num_shards = len(self.records)  # shards filled so far: durable, or being written
        self.tokens = self.records[-1]["end_tokens"] if self.records else 0  # stream position of the next token
        self._buffer, self._spare = np.empty(shard_size, np.uint16), np.empty(shard_size, np.uint16)
        self._fill = 0
        self._restart = None  # restart point of the batch being stored: the record of a shard ending in it
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._writing = None  # the Future of the shard being written

    @property
    def full(self) -> bool:
        return self.max_shards is not None and self.num_shards >= self.max_shards

    def restart_point(self) -> dict:
        """Where the source restarts: the last record's restart point, or the start of the stream."""
        return self.records[-1]["resume"] if self.records else {"docs": 0, "tokens": 0, "state": None}

    def add(self, tokens, doc_lengths, restart: dict) -> None:
        """Store one batch of whole documents (`doc_lengths` tokens each, `tokens` their concatenation).

        restart: {"docs", "tokens", "state"}, the stream position of tokens[0] and the source state that yields this
        batch again; a shard that ends inside the batch records it. Stops early once the writer is `full`.
        """
        start = restart["tokens"]
        if start > self.tokens:
            raise ValueError(f"batch starts at stream token {start}, after the writer's position {self.tokens}")
        doc_starts = start + np.cumsum(doc_lengths) - doc_lengths
        self._restart = restart
        pos = min(self.tokens - start, len(tokens))
        while pos < len(tokens) and not self.full:
            n = min(len(tokens) - pos, self.shard_size - self._fill)
            self._buffer[self._fill:self._fill + n] = tokens[pos:pos + n]
            self._fill, pos, self.tokens = self._fill + n, pos + n, self.tokens + n
            if self._fill == self.shard_size:
                # documents started before the shard's end: those whose first token lies before it
                self._flush(restart["docs"] + int(np.searchsorted(doc_starts, self.tokens, side="left")))

    def finish(self, documents: int) -> None:
        """The source is exhausted after `documents` documents: write the true-length last shard (its restart point is
        the last batch's, as for any shard), wait for it, and mark the manifest complete with its totals."""
        if self._fill:
            self._flush(documents)
        self._wait()
        val_tokens = self.records[0]["tokens"] if self.records else 0
        self.manifest["complete"] = True
        self.manifest["totals"] = {"documents": documents, "tokens": self.tokens, "shards": len(self.records),
                                   "val_tokens": val_tokens, "train_tokens": self.tokens - val_tokens}
        write_manifest(self.out_dir / MANIFEST, self.manifest)

    def _flush(self, end_docs: int) -> None:
        index = self.num_shards
        record = {"index": index, "file": shards.shard_name(self.prefix, index),
                  "split": "val" if index == 0 else "train", "tokens": self._fill, "sha256": None,
                  "end_tokens": self.tokens, "end_docs": end_docs, "resume": self._restart}
        self._wait()  # the spare buffer is free again
        self._writing = self._thread.submit(self._write, self._buffer, self._fill, record)
        self._buffer, self._spare = self._spare, self._buffer
        self._fill = 0
        self.num_shards += 1

    def _write(self, buffer: np.ndarray, n: int, record: dict) -> None:  # on the writer thread
        record["sha256"] = shards.write_shard(self.out_dir / record["file"], buffer[:n])
        self.records.append(record)
        write_manifest(self.out_dir / MANIFEST, self.manifest)

    def _wait(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._wait()
        finally:
            self._thread.shutdown(wait=True)
