"""Tokenize FineWeb-Edu (or local text files) into llm.c-format GPT-2 token shards. Resumable.

    python -m data.fineweb_edu --version 10B|100B|350B [--out DIR]          # HuggingFaceFW/fineweb-edu, sample-*BT
    python -m data.fineweb_edu --input FILE... --out DIR [--shard-size N]   # local parquet / jsonl(.gz) / txt(.gz)
    python -m data.fineweb_edu --sample [--out DIR]                         # the embedded sample in data/sample/
    python -m data.fineweb_edu --sample --tokenizer bytes                   # the same as UTF-8 bytes (CPU studies)
    (from the repository root)

Algorithm (llm.c `dev/data/fineweb.py`, the script GRAPE's `data/fineweb-edu/fineweb-edu.py` follows):
  1. Documents are read in source order (dataset order for Hugging Face; file order, then in-file order, locally).
  2. Each document becomes [EOT=50256] + tiktoken GPT-2 encode_ordinary(text) (special-token text is not parsed);
     with --tokenizer bytes, [256] + its UTF-8 bytes.
  3. The token stream is the concatenation of all documents; it is cut into consecutive shards of exactly
     `shard_size` tokens (default 1e8), the last one keeping its true length. A document that does not fit is split
     across the shard boundary (head ends shard k, tail starts shard k+1), exactly as in llm.c. Shard 0 is the
     validation split, the rest is train: `{prefix}_val_000000.bin`, `{prefix}_train_000001.bin`, ...
  4. Each shard is written atomically (data/shards.py: temp file, fsync, rename) with the 1024-byte llm.c header.
Consequently, for the same token stream the shards are byte-identical to those of llm.c / GRAPE.

Parallelism: documents travel in batches of BATCH_DOCS to a pool of tokenizer processes (spawned, each building the
encoding once); results are consumed strictly in submission order with a bounded number of batches in flight, so
memory stays flat whatever the dataset size. Finished shards are written by a background thread while tokenization
continues (data/shard_writer.py).

Manifest and resume (DIR/manifest.json, format in data/manifest.py, rewritten atomically after every shard):
  * identity: output format, source, tokenizer, prefix and shard size. A directory whose manifest has a different
    identity, or that holds files but no manifest, is refused: nothing is ever silently overwritten.
  * one record per durable shard, with the stream position after it and a restart point: the source state at the
    start of the document batch in which the shard ended.
  A re-run restarts the source at the last record's restart point, re-tokenizes at most one batch and drops the
  tokens already written, so the output is byte-identical (shards and manifest) to an uninterrupted run. Records
  whose file is missing or has the wrong size are dropped first (so deleting the last shards regenerates them),
  and stray shard or temp files not covered by the manifest are removed. A lock file stops two runs on one directory.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m data.fineweb_edu ...")

from data import shards, tokenizer  # noqa: E402
from data.manifest import MANIFEST, PrepError, load_for_resume, write_manifest  # noqa: E402
from data.shard_writer import ShardWriter  # noqa: E402
from lockfile import DirectoryLock  # noqa: E402
from data.sources import FINEWEB_EDU, FINEWEB_EDU_VERSIONS, FileSource, HFSource  # noqa: E402
from errors import UserError, exit_status  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "sample"
SAMPLE_SHARD_SIZE = 131072   # sample is ~3.0M tokens: a 131k-token validation shard 0 and ~22 train shards
DEFAULT_SHARD_SIZE = 10**8   # llm.c / GRAPE
BATCH_DOCS = 256             # documents per tokenizer job; also the restart granularity (part of the manifest)
FORMAT = {"name": "llm.c token shard", "magic": shards.MAGIC, "version": shards.VERSION,
          "header_bytes": shards.HEADER_BYTES, "token_dtype": "uint16-le"}


def prepare(source, out_dir, shard_size: int = DEFAULT_SHARD_SIZE, prefix: str = "fineweb", workers: int | None = None,
            max_shards: int | None = None, progress: bool = True, batch_docs: int = BATCH_DOCS,
            tokenizer_name: str = "gpt2") -> dict:
    """Tokenize `source` (data.sources.FileSource / HFSource) into shards in `out_dir`; returns the manifest.

    tokenizer_name: "gpt2" (default) or "bytes" (data/tokenizer.py); recorded in the manifest's identity.

    workers: tokenizer processes (None = all usable CPUs, 0 = tokenize in this process). They are spawned, and
        spawned processes re-import the calling script, so a script that calls this should not import heavy
        modules (torch) at top level.
    max_shards: stop once this many shards (including shard 0) exist; a later call continues.
    """
    if not 1 <= shard_size <= shards.MAX_SHARD_TOKENS:
        raise PrepError(f"--shard-size: expected a token count in [1, {shards.MAX_SHARD_TOKENS}], got {shard_size}")
    if workers is not None and workers < 0:
        raise PrepError(f"--workers: expected 0 (tokenize in this process) or a number of processes, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(out_dir, "data preparation").acquire()
    had_manifest = (out_dir / MANIFEST).exists()
    try:
        identity = {"format": FORMAT, "source": source.identity(),
                    "tokenizer": tokenizer.tokenizer_identity(tokenizer_name),
                    "prefix": prefix, "shard_size": shard_size, "batch_docs": batch_docs}
        manifest = load_for_resume(out_dir, identity, prefix)
        if manifest["complete"]:
            _log(f"{out_dir}: already complete ({len(manifest['shards'])} shards, "
                 f"{manifest['totals']['tokens']:,} tokens)")
            return manifest
        write_manifest(out_dir / MANIFEST, manifest)  # the truncation to durable shards, before any new shard
        records = manifest["shards"]
        if records:
            _log(f"resuming after {records[-1]['file']} ({records[-1]['end_tokens']:,} tokens, "
                 f"{len(records)} shards done)")
        if max_shards is not None and len(records) >= max_shards:
            _log(f"{len(records)} shards exist, max_shards={max_shards}: nothing to do")
            return manifest
        writer = ShardWriter(out_dir, manifest, shard_size, prefix, max_shards)
        try:
            _run(source, writer, workers, batch_docs, tokenizer_name, progress)
        except EmptyInputError:
            if not had_manifest:  # leave the directory as it was found: a corrected input then starts afresh
                (out_dir / MANIFEST).unlink(missing_ok=True)
            raise
        return manifest
    finally:
        lock.release()


class EmptyInputError(PrepError):
    """The source holds no document: there is nothing to tokenize (and no manifest is marked complete)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _tokenized_batches(source, state, batch_docs, workers, stack, name):
    """Yield (start_state, tokens, doc_lengths, text_bytes) per batch, in order, with bounded work in flight.

    workers: tokenizer processes (None = all usable CPUs, 0 = this process); `stack` terminates the pool on exit."""
    batches = source.batches(state, batch_docs)
    if workers == 0:
        tokenizer.init_worker(name)
        for st, texts in batches:
            yield (st, *tokenizer.encode_batch(texts, name))
        return
    workers = _usable_cpus() if workers is None else workers
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=tokenizer.init_worker, initargs=(name,))
    stack.callback(pool.terminate)
    pending = collections.deque()
    for st, texts in batches:
        pending.append((st, pool.apply_async(tokenizer.encode_batch, (texts, name))))
        if len(pending) > 2 * workers + 1:  # bounded: never read far ahead of the tokenizers
            st0, res = pending.popleft()
            yield (st0, *res.get())
    while pending:
        st0, res = pending.popleft()
        yield (st0, *res.get())
    pool.close()
    pool.join()


class _Progress:
    """The progress bar (tokens in shards, documents, shards, ETA) and this run's throughput; closes the bar on exit."""

    def __init__(self, source, tokens: int, enabled: bool):
        from tqdm import tqdm  # imported here: spawned tokenizer processes re-import this module and never need it

        self._est_bytes = source.estimated_text_bytes()
        self._nominal = getattr(source, "nominal_tokens", None)
        self._bar = tqdm(total=int(self._nominal) if self._nominal else None, initial=tokens, unit="tok",
                         unit_scale=True, disable=not enabled, mininterval=0.5 if sys.stderr.isatty() else 30,
                         smoothing=0.05, dynamic_ncols=True, desc="tokenizing")
        self._t0, self._bytes, self._tokens = time.time(), 0, 0

    def update(self, writer: ShardWriter, docs: int, tokens: int, text_bytes: int) -> None:
        self._bytes, self._tokens = self._bytes + text_bytes, self._tokens + tokens
        if self._est_bytes and not self._nominal:  # local files: scale the size estimate by the observed tokens/byte
            self._bar.total = max(writer.tokens, int(self._est_bytes * self._tokens / max(self._bytes, 1)))
        self._bar.update(writer.tokens - self._bar.n)
        self._bar.set_postfix(docs=f"{docs:,}", shards=writer.num_shards, refresh=False)

    def rates(self) -> str:
        dt = max(time.time() - self._t0, 1e-9)
        return f"{dt:.1f} s this run, {self._tokens / dt:,.0f} tok/s, {self._bytes / dt / 1e6:.2f} MB/s"

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def _run(source, writer: ShardWriter, workers, batch_docs, tokenizer_name, progress) -> None:
    """Tokenize `source` from the writer's restart point on and hand each batch to `writer`, until the source is
    exhausted (the writer then completes the manifest) or the writer holds max_shards shards."""
    restart = writer.restart_point()
    docs, tokens = restart["docs"], restart["tokens"]  # stream position of the next batch
    with writer, _Progress(source, writer.tokens, progress) as meter, contextlib.ExitStack() as stack:
        for state, toks, lens, nbytes in _tokenized_batches(source, restart["state"], batch_docs, workers, stack,
                                                            tokenizer_name):
            writer.add(toks, lens, {"docs": docs, "tokens": tokens, "state": state})
            docs, tokens = docs + len(lens), tokens + len(toks)
            meter.update(writer, docs, len(toks), nbytes)
            if writer.full:
                break
        else:
            if docs == 0:
                raise EmptyInputError(f"nothing to tokenize: {_describe_source(source)} holds no documents "
                                      f"(expected at least one non-empty document)")
            writer.finish(documents=docs)
    done = writer.manifest["complete"]
    _log(f"{'done' if done else 'stopped'}: {len(writer.records)} shards, {writer.tokens:,} tokens in "
         f"{writer.out_dir} ({meter.rates()})")
    if done and len(writer.records) < 2:
        _log("warning: the whole stream fits in the validation shard 0; there are no train shards "
             "(use a smaller --shard-size)")


def _describe_source(source) -> str:
    """The input files of a source, or its dataset name, for messages."""
    identity = source.identity()
    files = [f.get("name", "?") if isinstance(f, dict) else str(f) for f in identity.get("files", [])]
    return f"the input {', '.join(files)}" if files else f"the dataset {identity.get('path', identity)}"


def _count(s: str) -> int:
    try:
        v = float(s)
    except ValueError:
        v = 0.0
    if not math.isfinite(v) or v != int(v) or v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer token count, got {s!r}")
    return int(v)


def _workers(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (tokenize in this process) or a positive number of "
                                         f"processes, got {s!r}")
    return v


def _max_shards(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of shards, got {s!r}")
    return v


def _recorded_revision(out_dir: Path) -> str | None:
    """The dataset commit an earlier run resolved: a resume must not silently move to a newer dataset version."""
    try:
        src = json.loads((out_dir / MANIFEST).read_text())["identity"]["source"]
    except (OSError, ValueError, KeyError):
        return None
    return src.get("revision") if src.get("kind") == "huggingface" else None


def _prepare_from_args(ap, args) -> int:
    if args.version:
        config, nominal = FINEWEB_EDU_VERSIONS[args.version]
        out, prefix = REPO / "data" / "shards" / f"fineweb-edu{args.version}", "fineweb"
        revision = args.revision or _recorded_revision(Path(args.out) if args.out else out)
        if revision and not args.revision:
            _log(f"continuing with the dataset commit recorded in the manifest: {revision}")
        source = HFSource(FINEWEB_EDU, name=config, split="train", text_key=args.text_key, revision=revision,
                          nominal_tokens=nominal)
    elif args.sample:
        files = sorted(SAMPLE_DIR.glob("*.txt.gz"))
        if not files:
            ap.error(f"no *.txt.gz in {SAMPLE_DIR}")
        name = "sample" if args.tokenizer == "gpt2" else f"sample_{args.tokenizer}"
        source, out, prefix = FileSource(files), REPO / "data" / "shards" / name, "sample"
    else:
        if args.out is None:
            ap.error("--out is required with --input")
        source, out, prefix = FileSource(args.input, text_key=args.text_key), None, "data"
    shard_size = args.shard_size or (SAMPLE_SHARD_SIZE if args.sample else DEFAULT_SHARD_SIZE)
    prepare(source, Path(args.out) if args.out else out, shard_size=shard_size, prefix=args.prefix or prefix,
            workers=args.workers, max_shards=args.max_shards, progress=not args.no_progress,
            tokenizer_name=args.tokenizer)
    return 0


def main(argv=None) -> int:
    """Exit status 0, or 2 with one `error: ...` line for an unusable input, flag or output directory."""
    return exit_status(_main, argv)


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.fineweb_edu", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Shard format: data/shards.py. Loader: data/loader.py. Docs: data/README.md.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("-v", "--version", choices=sorted(FINEWEB_EDU_VERSIONS),
                     help="stream HuggingFaceFW/fineweb-edu config sample-{10BT,100BT,350BT}, split train")
    src.add_argument("--input", nargs="+", metavar="PATH", help="local .parquet, .jsonl[.gz] or .txt[.gz] files")
    src.add_argument("--sample", action="store_true", help=f"the embedded sample ({SAMPLE_DIR.relative_to(REPO)})")
    ap.add_argument("--out", help="output directory (default: data/shards/fineweb-edu{VERSION} or data/shards/sample "
                                  "under the repository; required with --input)")
    ap.add_argument("-s", "--shard-size", type=_count, default=None,
                    help=f"tokens per shard (default {DEFAULT_SHARD_SIZE:.0e}; {SAMPLE_SHARD_SIZE} with --sample)")
    ap.add_argument("--prefix", default=None,
                    help="shard file prefix (default: fineweb with --version, sample with --sample, data otherwise)")
    ap.add_argument("--text-key", default="text", help="text column/field of parquet and jsonl inputs")
    ap.add_argument("--tokenizer", choices=tokenizer.TOKENIZERS, default="gpt2",
                    help="gpt2 (default) or bytes: ids 0..255 = UTF-8 bytes, EOT 256, for CPU-scale studies "
                         "(model vocab_size 320); --sample then writes data/shards/sample_bytes")
    ap.add_argument("--revision", default=None,
                    help="Hugging Face dataset revision to use (default: main on a first run; a re-run continues with "
                         "the commit recorded in the manifest)")
    ap.add_argument("--workers", type=_workers, default=None,
                    help="tokenizer processes (default: all usable CPUs; 0: in this process)")
    ap.add_argument("--max-shards", type=_max_shards, default=None,
                    help="stop after this many shards exist (re-run without it to continue)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        return _prepare_from_args(ap, args)
    except UserError:
        raise
    except OSError as e:  # the environment (a full disk, permissions, the network), not a bug: no traceback
        hint = " (--version streams from the Hugging Face Hub, which must be reachable; a re-run resumes)" \
            if args.version else ""
        raise PrepError(f"{e}{hint}") from None


if __name__ == "__main__":
    raise SystemExit(main())
