"""Tokenize FineWeb-Edu (or local text files) into llm.c-format GPT-2 token shards. Resumable.

    python data/fineweb_edu.py --version 10B|100B|350B [--out DIR]          # HuggingFaceFW/fineweb-edu, sample-*BT
    python data/fineweb_edu.py --input FILE... --out DIR [--shard-size N]   # local parquet / jsonl(.gz) / txt(.gz)
    python data/fineweb_edu.py --sample [--out DIR]                         # the embedded sample in data/sample/
    python data/fineweb_edu.py --sample --tokenizer bytes                   # the same as UTF-8 bytes (CPU studies)
    (also runnable as `python -m data.fineweb_edu ...`, from any working directory)

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
continues.

Manifest and resume (DIR/manifest.json, rewritten atomically after every shard):
  * identity: output format, source identity (dataset/config/split/revision, or input files by name+size+sha256),
    tokenizer identity (name + BPE file hashes), prefix and shard size. A directory whose manifest has a different
    identity, or that holds files but no manifest, is refused: nothing is ever silently overwritten.
  * one record per durable shard: file, split, tokens, sha256, the stream position after it (end_tokens, end_docs)
    and a restart point: the source state at the start of the document batch in which the shard ended, with the
    stream position of that batch start.
  * complete: true once the source is exhausted; totals (documents, tokens, shards).
  A re-run restarts the source at the last record's restart point, re-tokenizes at most one batch and drops the
  tokens already written, so the output is byte-identical (shards and manifest) to an uninterrupted run. Records
  whose file is missing or has the wrong size are dropped first (so deleting the last shards regenerates them),
  and stray shard or temp files not covered by the manifest are removed. A lock file stops two runs on one directory.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import fcntl
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable, then use absolute imports
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import shards, tokenizer  # noqa: E402
from data.sources import FINEWEB_EDU, FINEWEB_EDU_VERSIONS, FileSource, HFSource  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "data" / "sample"
SAMPLE_SHARD_SIZE = 131072   # sample is ~3.0M tokens: a 131k-token validation shard 0 and ~22 train shards
DEFAULT_SHARD_SIZE = 10**8   # llm.c / GRAPE
BATCH_DOCS = 256             # documents per tokenizer job; also the restart granularity (part of the manifest)
MANIFEST = "manifest.json"
FORMAT = {"name": "llm.c token shard", "magic": shards.MAGIC, "version": shards.VERSION,
          "header_bytes": shards.HEADER_BYTES, "token_dtype": "uint16-le"}


class PrepError(RuntimeError):
    """The output directory cannot be used (different identity, foreign files, locked by another run)."""


def _write_manifest(path: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    shards.atomic_write_bytes(path, [text.encode()])


def _lock(out_dir: Path):
    f = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise PrepError(f"{out_dir}: another preparation run holds {out_dir / '.lock'}") from None
    return f


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: existing {json.dumps(va)[:200]} != requested {json.dumps(vb)[:200]}")
    return out


def _load_existing(out_dir: Path, identity: dict, prefix: str) -> dict:
    """The manifest to continue from (validated, truncated to durable shards), or a fresh one."""
    path = out_dir / MANIFEST
    fresh = {"identity": identity, "shards": [], "complete": False, "totals": None}
    if not path.exists():
        foreign = [p.name for p in out_dir.iterdir() if p.name != ".lock"]
        if foreign:
            raise PrepError(f"{out_dir}: not empty and has no {MANIFEST} (found {sorted(foreign)[:5]}); "
                            "choose an empty or new directory")
        return fresh
    try:
        manifest = json.loads(path.read_text())
        existing = manifest["identity"]
    except (ValueError, KeyError) as e:
        raise PrepError(f"{path}: unreadable manifest ({e}); move the directory away or delete it") from e
    diffs = _diff(existing, identity)
    if diffs:
        raise PrepError(f"{out_dir} holds shards of a different preparation; refusing to overwrite:\n  "
                        + "\n  ".join(diffs))
    kept = []
    for rec in manifest["shards"]:
        p = out_dir / rec["file"]
        if not p.is_file() or p.stat().st_size != shards.HEADER_BYTES + 2 * rec["tokens"]:
            break  # resume from the last shard before the first missing/damaged one
        kept.append(rec)
    if len(kept) < len(manifest["shards"]):
        manifest["complete"], manifest["totals"] = False, None
    manifest["shards"] = kept
    keep = {rec["file"] for rec in kept}
    for p in out_dir.iterdir():
        parsed = shards.parse_shard_name(p.name)
        stray_shard = parsed is not None and parsed[0] == prefix and p.name not in keep
        if stray_shard or (p.name.startswith(".") and ".tmp-" in p.name):
            p.unlink()
    return manifest


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
        raise ValueError(f"shard_size must be in [1, {shards.MAX_SHARD_TOKENS}], got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)
    try:
        identity = {"format": FORMAT, "source": source.identity(),
                    "tokenizer": tokenizer.tokenizer_identity(tokenizer_name),
                    "prefix": prefix, "shard_size": shard_size, "batch_docs": batch_docs}
        manifest = _load_existing(out_dir, identity, prefix)
        if manifest["complete"]:
            _log(f"{out_dir}: already complete ({len(manifest['shards'])} shards, "
                 f"{manifest['totals']['tokens']:,} tokens)")
            return manifest
        _write_manifest(out_dir / MANIFEST, manifest)
        return _run(source, out_dir, manifest, shard_size, prefix, workers, max_shards, progress, batch_docs,
                    tokenizer_name)
    finally:
        lock.close()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tokenized_batches(source, state, batch_docs, workers, stack, name):
    """Yield (start_state, tokens, doc_lengths, text_bytes) per batch, in order, with bounded work in flight."""
    batches = source.batches(state, batch_docs)
    if workers == 0:
        tokenizer.init_worker(name)
        for st, texts in batches:
            yield (st, *tokenizer.encode_batch(texts, name))
        return
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


def _run(source, out_dir, manifest, shard_size, prefix, workers, max_shards, progress, batch_docs,
         tokenizer_name="gpt2") -> dict:
    import contextlib

    from tqdm import tqdm

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    records = manifest["shards"]
    if records:
        last = records[-1]
        state, stream_tokens, stream_docs = last["resume"]["state"], last["resume"]["tokens"], last["resume"]["docs"]
        skip = last["end_tokens"] - stream_tokens
        _log(f"resuming after {last['file']} ({last['end_tokens']:,} tokens, {len(records)} shards done)")
    else:
        state, stream_tokens, stream_docs, skip = None, 0, 0, 0
    written_tokens = stream_tokens + skip
    if max_shards is not None and len(records) >= max_shards:
        _log(f"{len(records)} shards exist, max_shards={max_shards}: nothing to do")
        return manifest

    buffers = [np.empty(shard_size, dtype=np.uint16), np.empty(shard_size, dtype=np.uint16)]
    buf, fill, shard_index = buffers[0], 0, len(records)
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    write_future = None

    def write(buffer, n, rec):  # runs on the writer thread, one shard at a time, in order
        rec["sha256"] = shards.write_shard(out_dir / rec["file"], buffer[:n])
        records.append(rec)
        _write_manifest(out_dir / MANIFEST, manifest)

    def flush(n, resume, end_docs):
        nonlocal write_future, buf, shard_index
        name = shards.shard_name(prefix, shard_index)
        rec = {"index": shard_index, "file": name, "split": "val" if shard_index == 0 else "train", "tokens": n,
               "sha256": None, "end_tokens": written_tokens, "end_docs": end_docs, "resume": resume}
        if write_future is not None:
            write_future.result()  # the other buffer is free again; also surfaces write errors
        write_future = writer.submit(write, buf, n, rec)
        buf = buffers[1] if buf is buffers[0] else buffers[0]
        shard_index += 1

    est_bytes = source.estimated_text_bytes()
    nominal = getattr(source, "nominal_tokens", None)
    bar = tqdm(total=int(nominal) if nominal else None, initial=written_tokens, unit="tok", unit_scale=True,
               disable=not progress, mininterval=0.5 if sys.stderr.isatty() else 30, smoothing=0.05,
               dynamic_ncols=True, desc="tokenizing")
    t0, seen_bytes, seen_tokens, exhausted, resume = time.time(), 0, 0, False, None
    try:
        with contextlib.ExitStack() as stack:
            for st, toks, lens, nbytes in _tokenized_batches(source, state, batch_docs, workers, stack,
                                                             tokenizer_name):
                resume = {"docs": stream_docs, "tokens": stream_tokens, "state": st}
                doc_starts = stream_tokens + np.cumsum(lens) - lens  # stream positions of this batch's EOTs
                stream_tokens += len(toks)
                stream_docs += len(lens)
                pos = min(skip, len(toks))  # tokens already in durable shards (only right after a restart)
                skip -= pos
                while pos < len(toks):
                    n = min(len(toks) - pos, shard_size - fill)
                    buf[fill:fill + n] = toks[pos:pos + n]
                    fill, pos, written_tokens = fill + n, pos + n, written_tokens + n
                    if fill == shard_size:
                        end_docs = resume["docs"] + int(np.searchsorted(doc_starts, written_tokens, side="left"))
                        flush(fill, resume, end_docs)
                        fill = 0
                        if max_shards is not None and shard_index >= max_shards:
                            break
                seen_bytes, seen_tokens = seen_bytes + nbytes, seen_tokens + len(toks)
                if est_bytes and not nominal:  # local files: scale the size estimate by the observed tokens/byte
                    bar.total = max(written_tokens, int(est_bytes * seen_tokens / max(seen_bytes, 1)))
                bar.update(written_tokens - bar.n)
                bar.set_postfix(docs=f"{stream_docs:,}", shards=shard_index, refresh=False)
                if max_shards is not None and shard_index >= max_shards:
                    break
            else:
                exhausted = True
        if exhausted and fill:  # the true-length last shard; restart point = the last batch, as for any shard
            flush(fill, resume, stream_docs)
        if write_future is not None:
            write_future.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()
    if exhausted:
        manifest["complete"] = True
        manifest["totals"] = {"documents": stream_docs, "tokens": written_tokens, "shards": len(records),
                              "val_tokens": records[0]["tokens"] if records else 0,
                              "train_tokens": written_tokens - (records[0]["tokens"] if records else 0)}
        _write_manifest(out_dir / MANIFEST, manifest)
    dt = time.time() - t0
    _log(f"{'done' if exhausted else 'stopped'}: {len(records)} shards, {written_tokens:,} tokens in {out_dir} "
         f"({dt:.1f} s this run, {seen_tokens / max(dt, 1e-9):,.0f} tok/s, {seen_bytes / max(dt, 1e-9) / 1e6:.2f} MB/s)")
    if exhausted and len(records) < 2:
        _log("warning: the whole stream fits in the validation shard 0; there are no train shards "
             "(use a smaller --shard-size)")
    return manifest


def _count(s: str) -> int:
    v = float(s)
    if v != int(v) or v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer token count, got {s}")
    return int(v)


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all usable CPUs)")
    ap.add_argument("--max-shards", type=int, default=None,
                    help="stop after this many shards exist (re-run without it to continue)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        return _prepare_from_args(ap, args)
    except (PrepError, shards.ShardError, ValueError, OSError) as e:
        hint = " (--version streams from the Hugging Face Hub, which must be reachable; a re-run resumes)" \
            if args.version and isinstance(e, OSError) else ""
        _log(f"error: {e}{hint}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
