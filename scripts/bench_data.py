"""Throughput of the data pipeline on this machine: tokenization (prep) and the training loader.

    python -m scripts.bench_data [--json OUT] [--batches N]

Measures, on the embedded sample (data/sample/, ~13 MB of UTF-8 text, ~3.0M GPT-2 tokens):
  * prep: `data.fineweb_edu.prepare` end to end (read gzip text, tokenize in worker processes, write shards and
    manifest), with 1 and 2 worker processes; wall time includes starting the pool. Also the bare single-thread
    tiktoken encode_ordinary rate on the same documents (the ceiling per worker) and the rate at which the main
    process alone reads and batches documents from txt.gz and from parquet (how many workers it can feed).
  * loader: TokenLoader.next_batch() tokens/s at T=1024, B=8 on CPU, with and without the prefetch thread, plain
    and document-aligned windows (plus the start-up cost of the EOT scan that document alignment needs); and the
    time a trainer actually waits inside next_batch() when each step takes 3 ms (simulated by a sleep, like a GPU
    step the host waits on), which is what prefetching is for.
  * the token-range check: per-batch max over B*(T+1) tokens vs a full scan of a 1e8-token shard (from page cache),
    which is the measurement behind the loader's choice of checking per batch; and the start-up cost per 1e8-token
    shard of the document-aligned window index.
Benchmarks only print numbers; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.bench_data ...")

from data import shards  # noqa: E402
from data.fineweb_edu import SAMPLE_DIR, SAMPLE_SHARD_SIZE, prepare  # noqa: E402
from data.sources import FileSource  # noqa: E402
from data.tokenizer import EOT, gpt2_encoding  # noqa: E402


def bench_prep(tmp: Path, files, repeat: int) -> list[dict]:
    docs = [t for _, b in FileSource(files).batches(None, 4096) for t in b]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    enc = gpt2_encoding()
    dts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ntok = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
        dts.append(time.perf_counter() - t0)
    dt = min(dts)
    rows = [{"what": "tiktoken encode_ordinary, 1 thread, no I/O", "seconds": dt, "MB_per_s": nbytes / dt / 1e6,
             "tokens_per_s": ntok / dt}]
    # the main process alone: read + split documents, no tokenization (bounds how many workers it can feed)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp / "sample.parquet", row_group_size=1000)
    for label, src in (("reader only, txt.gz", FileSource(files)),
                       ("reader only, parquet", FileSource([tmp / "sample.parquet"]))):
        t0 = time.perf_counter()
        for _ in src.batches(None, 256):
            pass
        dt = time.perf_counter() - t0
        rows.append({"what": label, "seconds": dt, "MB_per_s": nbytes / dt / 1e6, "tokens_per_s": ntok / dt})
    for workers in (1, 2):
        times = []
        for k in range(repeat):  # the best of `repeat` runs: shared machines are noisy
            out = tmp / f"prep{workers}_{k}"
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # prepare's own summary line
                man = prepare(FileSource(files), out, shard_size=SAMPLE_SHARD_SIZE, prefix="sample",
                              workers=workers, progress=False)
            times.append(time.perf_counter() - t0)
            assert man["totals"]["tokens"] == ntok
        dt = min(times)
        rows.append({"what": f"prepare, {workers} worker{'s' if workers > 1 else ''}", "seconds": dt,
                     "MB_per_s": nbytes / dt / 1e6, "tokens_per_s": ntok / dt})
    return rows, nbytes, ntok


def bench_loader(shard_dir: Path, n: int) -> list[dict]:
    from data.loader import TokenLoader  # imported here: prep's spawned workers re-import this script

    rows = []
    for aligned in (False, True):
        for prefetch in (True, False):
            t0 = time.perf_counter()
            loader = TokenLoader(shard_dir, seq_len=1024, batch_size=8, document_aligned=aligned, prefetch=prefetch)
            startup = time.perf_counter() - t0
            loader.next_batch()
            t0 = time.perf_counter()
            for _ in range(n):
                x, y = loader.next_batch()
            dt = time.perf_counter() - t0
            waited = 0.0
            for _ in range(200):
                time.sleep(0.003)  # the training step
                t1 = time.perf_counter()
                loader.next_batch()
                waited += time.perf_counter() - t1
            loader.close()
            rows.append({"what": f"{'document-aligned' if aligned else 'plain'} windows, prefetch "
                                 f"{'on' if prefetch else 'off'}", "batches": n, "seconds": dt,
                         "tokens_per_s": n * 8 * 1024 / dt, "us_per_batch": dt / n * 1e6, "startup_s": startup,
                         "wait_us_per_step": waited / 200 * 1e6})
    return rows


def bench_range_check(tmp: Path) -> dict:
    from data.loader import _document_starts

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 50257, (8, 1025)).astype(np.uint16)
    t0 = time.perf_counter()
    for _ in range(10000):
        int(batch.max())
    per_batch = (time.perf_counter() - t0) / 10000
    path = tmp / "big_train_000001.bin"
    toks = rng.integers(0, 50256, 10**8).astype(np.uint16)
    toks[rng.integers(0, 10**8, 10**5)] = EOT  # ~1,000-token documents, like FineWeb-Edu
    shards.write_shard(path, toks)
    del toks
    mm = shards.open_shard(path)
    shards.check_token_range(path, mm, 50304)  # warm the page cache
    t0 = time.perf_counter()
    shards.check_token_range(path, mm, 50304)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_aligned = _document_starts(mm, 1024).size
    aligned = time.perf_counter() - t0
    del mm
    path.unlink()
    return {"per_batch_max_us": per_batch * 1e6, "full_scan_1e8_tokens_s": full, "full_scan_GB_per_s": 2e8 / full / 1e9,
            "document_aligned_index_1e8_tokens_s": aligned, "document_aligned_windows_per_1e8_tokens": n_aligned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="OUT", help="also write the numbers as JSON")
    ap.add_argument("--batches", type=int, default=2000, help="loader batches per configuration")
    ap.add_argument("--repeat", type=int, default=3, help="tokenization runs per configuration (best is reported)")
    args = ap.parse_args()
    files = sorted(SAMPLE_DIR.glob("*.txt.gz"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prep, nbytes, ntok = bench_prep(tmp, files, args.repeat)
        loader = bench_loader(tmp / "prep2_0", args.batches)
        check = bench_range_check(tmp)
    info = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores "
            f"({platform.processor() or platform.platform()})", "python": platform.python_version(),
            "sample_MB": nbytes / 1e6, "sample_tokens": ntok, "load_average_1min_at_end": os.getloadavg()[0]}
    print(f"data pipeline throughput, {info['date']}, {info['machine']}, "
          f"load average {info['load_average_1min_at_end']:.2f} (1 min)")
    print(f"\ntokenization of the embedded sample ({nbytes / 1e6:.2f} MB UTF-8, {ntok:,} tokens; "
          f"best of {args.repeat})")
    print(f"  {'':46s} {'seconds':>8s} {'MB/s':>7s} {'tokens/s':>11s}")
    for r in prep:
        print(f"  {r['what']:46s} {r['seconds']:8.2f} {r['MB_per_s']:7.2f} {r['tokens_per_s']:11,.0f}")
    print(f"\nloader, T=1024, B=8, CPU ({args.batches} batches each)")
    print(f"  {'':40s} {'tokens/s':>12s} {'us/batch':>9s} {'start-up s':>10s} {'wait us/step':>12s}")
    for r in loader:
        print(f"  {r['what']:40s} {r['tokens_per_s']:12,.0f} {r['us_per_batch']:9.0f} {r['startup_s']:10.3f} "
              f"{r['wait_us_per_step']:12.0f}")
    print(f"\ntoken-range check: per batch (8x1025 max) {check['per_batch_max_us']:.1f} us; full scan of a 1e8-token "
          f"shard {check['full_scan_1e8_tokens_s']:.3f} s ({check['full_scan_GB_per_s']:.2f} GB/s from page cache)")
    print(f"document-aligned index of a 1e8-token shard (1,000-token documents, T=1024): "
          f"{check['document_aligned_index_1e8_tokens_s']:.3f} s, "
          f"{check['document_aligned_windows_per_1e8_tokens']:,} windows")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "prep": prep, "loader": loader, "range_check": check},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
