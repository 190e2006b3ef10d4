"""Rebuild data/sample/, the small real-text corpus embedded in the repository.

    python -m data.build_sample --corpus DIR     # DIR holds wikipedia_106.txt.gz, brown.txt.gz, austen.txt.gz

Only this build step reads the external corpus directory; nothing at run time does. The three prose sources are
copied text-for-text (documents = blank-line-separated blocks, as in the corpus), re-compressed deterministically
(gzip level 9, mtime 0, no file name in the header) so that a rebuild is byte-identical. A number prefix fixes the
order a shell glob gives: Wikipedia first, so that the validation shard 0 (the head of the token stream) is
encyclopedic text, the closest of the three to FineWeb-Edu; the rest of Wikipedia, the Brown corpus and Austen are
train. Provenance and licences: data/sample/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
from pathlib import Path

OUT = Path(__file__).resolve().parent / "sample"
SOURCES = [("wikipedia_106.txt.gz", "1_wikipedia_106.txt.gz"),
           ("brown.txt.gz", "2_brown.txt.gz"),
           ("austen.txt.gz", "3_austen.txt.gz")]
MAX_TOTAL_BYTES = 5_000_000


def build(corpus: Path, out: Path = OUT) -> list[tuple[str, int, str]]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for src, dst in SOURCES:
        text = gzip.decompress((corpus / src).read_bytes()).decode("utf-8")  # must be valid UTF-8
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
            g.write(text.encode("utf-8"))
        data = buf.getvalue()
        (out / dst).write_bytes(data)
        rows.append((dst, len(data), hashlib.sha256(data).hexdigest()))
    total = sum(r[1] for r in rows)
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"sample is {total} bytes compressed, over the {MAX_TOTAL_BYTES}-byte budget")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="directory with the source .txt.gz files")
    args = ap.parse_args()
    for name, size, digest in build(args.corpus):
        print(f"{name:26s} {size:>10,d} bytes  sha256 {digest}")


if __name__ == "__main__":
    main()
