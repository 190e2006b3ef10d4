"""Document streams for the preparation script: the Hugging Face dataset, or local files.

Both kinds present the same interface, so tokenization, sharding and resume are one code path:

    source.identity()             JSON dict naming the content; a resumed run must see an equal identity
    source.batches(state, k)      yields (state_before, texts): consecutive batches of k documents, in stream order,
                                  starting at `state` (None = the beginning); the last batch may be shorter
    source.estimated_text_bytes() rough UTF-8 size of the whole stream (for the progress bar's ETA), or None

`state_before` is a small JSON-able value such that batches(state_before, k) restarts exactly at that batch. Batches
are aligned to multiples of k documents from the start of the stream, including after a restart (a restart state is
always one of the yielded ones), which keeps a resumed run's manifest byte-identical to an uninterrupted one.

Local files (`FileSource`), read in the order given, each document once:
  * .parquet                       one document per row, column `text_key` (default "text")
  * .jsonl / .jsonl.gz / .ndjson   one JSON object per non-empty line, field `text_key`
  * .txt / .txt.gz                 documents separated by one or more blank (empty or whitespace-only) lines; a
                                   document is its lines joined with "\n" (no trailing newline); universal newlines
  Text is UTF-8 (a leading byte-order mark is dropped; invalid UTF-8 is an error naming the file).
  State: {"file": i, "doc": j} = j documents of file i already yielded. Files are identified by name, size and
  sha256 (not by path), so moving the inputs does not break a resume, but changing their content does.

Hugging Face (`HFSource`): `datasets.load_dataset_builder(path, name, revision)` resolves the split's data files
(for FineWeb-Edu: the parquet files of sample/100BT/ etc., as hf://datasets/...@<commit>/... URLs, in the order
`load_dataset(..., streaming=True)` iterates them); each file is then streamed with pyarrow over fsspec, row groups
in order, only the text column. That is the dataset order of `datasets` streaming, with a canonical state
{"file": i, "doc": j} like local files: a restart skips whole row groups via the parquet metadata (ranged reads,
no re-download of the skipped part) and a network error re-opens the file at the same row (a few retries with
backoff). The identity records the resolved commit and the file names, so a resumed run provably continues the
same data. The same class reads local parquet through the `parquet` builder, which is how it is tested offline.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import struct
import sys
import time
from pathlib import Path

from errors import UserError

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
# --version -> (dataset config, nominal GPT-2 tokens; FineWeb-Edu's samples are defined by GPT-2 token counts)
FINEWEB_EDU_VERSIONS = {"10B": ("sample-10BT", 10e9), "100B": ("sample-100BT", 100e9), "350B": ("sample-350BT", 350e9)}


class SourceError(UserError, ValueError):
    """An input that cannot be read as documents (unsupported type, bad encoding, missing text field)."""


class InputNotFoundError(SourceError, FileNotFoundError):
    """An input file that does not exist."""


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "jsonl"
    if name.endswith((".txt", ".txt.gz")):
        return "txt"
    raise SourceError(f"{path}: unsupported input type (expected .parquet, .jsonl[.gz], .ndjson[.gz] or .txt[.gz])")


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    # utf-8-sig: a leading byte-order mark is dropped; invalid UTF-8 is an error, never silently replaced
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline=None)


def _lines(path: Path):
    with _open_text(path) as f:
        try:
            yield from f
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not valid UTF-8 ({e})") from e


def _read_txt(path: Path, skip: int):
    doc, count = [], 0
    for line in _lines(path):
        line = line.rstrip("\n")
        if line.strip():
            doc.append(line)
            continue
        if doc:
            if count >= skip:
                yield "\n".join(doc)
            count += 1
            doc = []
    if doc and count >= skip:
        yield "\n".join(doc)


def _read_jsonl(path: Path, skip: int, text_key: str):
    count = 0
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        if count >= skip:
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"{path}:{lineno}: expected a JSON object with a string field "
                                 f"{text_key!r} ({type(e).__name__}: {e})") from e
            if not isinstance(text, str):
                raise SourceError(f"{path}:{lineno}: field {text_key!r} is {type(text).__name__}, expected str")
            yield text
        count += 1


def _read_parquet(path, skip: int, text_key: str, fileobj=None):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fileobj if fileobj is not None else path)
    if text_key not in pf.schema_arrow.names:
        raise SourceError(f"{path}: no column {text_key!r} (columns: {pf.schema_arrow.names})")
    first, before = 0, 0  # skip whole row groups via the metadata, then rows inside the first one read
    while first < pf.num_row_groups and before + pf.metadata.row_group(first).num_rows <= skip:
        before += pf.metadata.row_group(first).num_rows
        first += 1
    drop = skip - before
    for rb in pf.iter_batches(batch_size=4096, row_groups=range(first, pf.num_row_groups), columns=[text_key]):
        texts = rb.column(0).to_pylist()
        if drop:
            texts, drop = texts[drop:], max(0, drop - len(texts))
        for t in texts:
            if not isinstance(t, str):
                raise SourceError(f"{path}: column {text_key!r} holds {type(t).__name__}, expected str")
            yield t


def _gzip_isize(path: Path) -> int:
    # The gzip trailer stores the uncompressed size mod 2**32: good enough for an ETA.
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


class _FileStream:
    """Documents of an ordered list of files; subclasses define _num_files() and _docs(file_index, skip)."""

    def batches(self, state, batch_docs: int):
        i, j = (0, 0) if state is None else (int(state["file"]), int(state["doc"]))
        batch, start = [], {"file": i, "doc": j}
        while i < self._num_files():
            for text in self._docs(i, j):
                batch.append(text)
                j += 1
                if len(batch) == batch_docs:
                    yield start, batch
                    batch = []
                    start = {"file": i, "doc": j}
            i, j = i + 1, 0
            if not batch:
                start = {"file": i, "doc": 0}
        if batch:
            yield start, batch


class FileSource(_FileStream):
    """Local parquet / jsonl(.gz) / txt(.gz) files, in the order given."""

    def __init__(self, paths, text_key: str = "text"):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise SourceError("no input files")
        for p in self.paths:
            if not p.is_file():
                raise InputNotFoundError(f"{p}: input file not found")
            _kind(p)
        names = [p.name for p in self.paths]
        if len(set(names)) != len(names):
            raise SourceError(f"input file names must be distinct (they identify the inputs in the manifest): {names}")
        self.text_key = text_key
        self._identity = None

    def identity(self) -> dict:
        if self._identity is None:
            files = []
            for p in self.paths:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while buf := f.read(1 << 22):
                        h.update(buf)
                files.append({"name": p.name, "bytes": p.stat().st_size, "sha256": h.hexdigest()})
            self._identity = {"kind": "files", "text_key": self.text_key, "files": files}
        return self._identity

    def estimated_text_bytes(self) -> int | None:
        total = 0
        for p in self.paths:
            kind = _kind(p)
            if kind == "parquet":
                import pyarrow.parquet as pq

                md = pq.ParquetFile(p).metadata
                col = md.schema.to_arrow_schema().get_field_index(self.text_key)
                total += sum(md.row_group(i).column(col).total_uncompressed_size for i in range(md.num_row_groups))
            elif p.name.lower().endswith(".gz"):
                total += _gzip_isize(p)
            else:
                total += p.stat().st_size
        return total

    def _num_files(self) -> int:
        return len(self.paths)

    def _docs(self, file_index: int, skip: int):
        p = self.paths[file_index]
        kind = _kind(p)
        if kind == "txt":
            return _read_txt(p, skip)
        if kind == "jsonl":
            return _read_jsonl(p, skip, self.text_key)
        return _read_parquet(p, skip, self.text_key)


def _transient_errors() -> tuple:
    errors = [OSError, TimeoutError]  # requests' errors are OSErrors; httpx (huggingface_hub >= 1) has its own
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


class HFSource(_FileStream):
    """A parquet-backed Hugging Face dataset (FineWeb-Edu by default), streamed file by file in dataset order."""

    RETRIES = 8

    def __init__(self, path: str = FINEWEB_EDU, name: str | None = "sample-100BT", split: str = "train",
                 text_key: str = "text", revision: str | None = None, data_files=None, nominal_tokens=None):
        self.path, self.name, self.split, self.text_key = path, name, split, text_key
        self.revision, self.data_files, self.nominal_tokens = revision, data_files, nominal_tokens
        self._files = None
        self._commit = revision

    def _resolve(self) -> list[str]:
        if self._files is None:
            from datasets import load_dataset_builder

            builder = load_dataset_builder(self.path, self.name, revision=self.revision, data_files=self.data_files)
            if self.split not in (builder.config.data_files or {}):
                raise SourceError(f"{self.path} ({self.name}): no data files for split {self.split!r}")
            files = [str(f) for f in builder.config.data_files[self.split]]
            bad = [f for f in files if not f.lower().endswith(".parquet")]
            if bad:
                raise SourceError(f"{self.path} ({self.name}): only parquet data files are supported, got {bad[:3]}")
            commits = {m.group(1) for f in files if (m := re.search(r"@([0-9a-f]{40})/", f))}
            if len(commits) == 1:
                self._commit = commits.pop()
            self._files = files
        return self._files

    def identity(self) -> dict:
        files = self._resolve()
        return {"kind": "huggingface", "path": self.path, "name": self.name, "split": self.split,
                "text_key": self.text_key, "revision": self._commit, "files": [f.rsplit("/", 1)[-1] for f in files]}

    def estimated_text_bytes(self):
        return None

    def _num_files(self) -> int:
        return len(self._resolve())

    def _docs(self, file_index: int, skip: int):
        import fsspec

        url = self._resolve()[file_index]
        transient = _transient_errors()
        for attempt in range(self.RETRIES + 1):
            try:
                with fsspec.open(url, "rb", block_size=32 << 20) as f:  # large ranged reads for remote files
                    for text in _read_parquet(url, skip, self.text_key, fileobj=f):
                        yield text
                        skip += 1
                return
            except transient as e:
                if attempt == self.RETRIES:
                    raise
                wait = min(120, 2 ** attempt)
                print(f"{url}: {type(e).__name__}: {e}; re-opening at row {skip} in {wait} s", file=sys.stderr)
                time.sleep(wait)
