"""DIR/manifest.json: what a preparation run has written to DIR, and where a re-run continues.

Format (JSON, indented by one space, keys sorted, newline-terminated; rewritten atomically by `write_manifest`):
  identity   output format, source identity (dataset/config/split/revision, or input files by name+size+sha256),
             tokenizer identity (name + BPE file hashes), prefix, shard size and documents per batch. Two runs with
             equal identities produce the same token stream and the same shards.
  shards     one record per durable shard, in index order (data/shard_writer.py appends them):
               index, file, split ("val" for shard 0, else "train"), tokens, sha256 of the whole file,
               end_tokens / end_docs   the stream position right after the shard (tokens, documents started),
               resume                  the restart point: {"state", "tokens", "docs"}, the source state at the
                                       start of the document batch in which the shard ended and the stream position
                                       of that batch start (resume.tokens <= end_tokens).
  complete   true once the source is exhausted; then
  totals     {documents, tokens, shards, val_tokens, train_tokens}, else null.

Resume (`load_for_resume`): a directory whose manifest has a different identity, or that holds files but no manifest,
is refused with PrepError: nothing is ever silently overwritten. Records are kept up to the first one whose file is
missing or has the wrong size (so deleting the last shards regenerates them), and shard or temporary files that no
kept record covers are deleted: they are leftovers of a crash between a shard's rename and its record. A run holds
DIR/.lock (lockfile.DirectoryLock) for as long as it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from data import shards
from durable import atomic_write_text, is_temp_file
from errors import UserError
from lockfile import LOCK_NAME

MANIFEST = "manifest.json"


class PrepError(UserError, RuntimeError):
    """The output directory cannot be used (different identity, foreign files, locked by another run)."""


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """One line per differing leaf of two nested dicts, named by its dotted key."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: existing {json.dumps(va)[:200]} != requested {json.dumps(vb)[:200]}")
    return out


def load_for_resume(out_dir: Path, identity: dict, prefix: str) -> dict:
    """The manifest to continue from (validated, truncated to durable shards, strays deleted), or a fresh one."""
    path = out_dir / MANIFEST
    fresh = {"identity": identity, "shards": [], "complete": False, "totals": None}
    if not path.exists():
        foreign = [p.name for p in out_dir.iterdir() if p.name != LOCK_NAME]
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
        if stray_shard or is_temp_file(p.name):
            p.unlink()
    return manifest
