"""Training and validation batches from llm.c-format token shards (data/shards.py), deterministic and resumable.

Training windows (TokenLoader)
  * Every `*_train_*.bin` shard is opened once as a validated np.memmap (header magic, version, token count against
    file size; data/shards.py). Validation shards are never used for training.
  * A window is T+1 consecutive tokens inside one shard (x = w[:-1], y = w[1:]); windows never cross shards.
    Default, "plain": starts 0, T, 2T, ... while the window fits, ignoring document boundaries (like the GRAPE /
    nanoGPT loaders, but without replacement). document_aligned=True: starts only at EOT tokens, chosen greedily left
    to right so that the inputs of two windows never overlap (start >= previous start + T); tokens between the end of
    one window and the next EOT are skipped. That needs one scan of every shard for EOTs at start-up (reported in
    data/README.md) and 4 bytes of memory per window.
  * The windows are numbered g = 0..N-1 (shard by shard, in sorted file-name order) and an epoch visits them in the
    order perm_epoch(0), perm_epoch(1), ..., a seeded pseudo-random permutation of (seed, epoch) (data/permutation.py:
    O(1) memory, numpy-version independent).
  * State = (epoch, position): position = number of windows of this epoch's order consumed by all ranks together.
    One `next_batch()` is one micro-step across all ranks: rank r receives the windows at order positions
    [position + r*B, position + (r+1)*B) and every rank advances position by world_size*B. Ranks never share a window
    within an epoch and need no communication. Gradient accumulation needs nothing special either: 1 rank x 2 micro-
    steps and 2 ranks x 1 micro-step consume exactly the same windows per optimizer step (within an epoch).
  * Epoch rollover: when fewer than world_size*B windows remain, they are skipped (at most world_size*B - 1 windows
    per epoch) and the next batch starts the next epoch at position 0 with a new permutation.
  * Resume: state_dict() = {epoch, position, seed, seq_len, document_aligned, num_windows, shards fingerprint, ...},
    a few JSON-able ints/strings describing the *next* batch the caller will receive (prefetched batches are not
    counted as consumed). load_state_dict() reproduces the exact remaining stream. The order is global, so resuming
    with a different world_size or batch_size continues the same sequence of windows from the same position (no
    window repeated or skipped); only where an epoch ends may differ, since that depends on world_size*B. Seed,
    seq_len, window mode and the shard set must match (checked; an error names the key and both values).
  * Token ids >= vocab_size raise ShardError naming the shard and position. The check runs on every batch (a max over
    B*(T+1) uint16: a few us) rather than as a scan of all shards at open: the scan itself is fast from page cache
    (~0.01-0.03 s per 1e8-token shard) but must read the whole dataset (200 GB for 100B tokens) at every start and
    resume of every node, and the per-batch check covers exactly the tokens that are used. scripts/bench_data.py
    measures both; `python -m data.shards DIR --vocab-size V` is the one-off full scan of a prepared dataset.
  * x, y: int64 tensors (B, T) on `device`. On CUDA the host tensors are pinned and copied with non_blocking=True.
    With prefetch=True a background thread assembles the next batch while the caller trains on the current one.

Validation (ValidationSet)
  The first num_tokens target tokens of the validation shard (shard 0): windows k = 0..K-1 with K = num_tokens // T
  start at k*T (K*T + 1 tokens are read once into memory and range-checked). The window set depends only on
  (shard, T, num_tokens), never on batch size, rank or world size, so every evaluation sees the same tokens.
  batches(B, rank, world_size) splits the windows into consecutive global batches of B (the last may be shorter) and
  gives batch k to rank k % world_size. Exact multi-rank mean: each rank sums its per-token losses and counts its
  target tokens; all-reduce both sums; divide. That is the single-process mean over all K*T tokens (up to the order
  of floating-point summation).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from data import shards
from data.permutation import Permutation
from data.shards import ShardError
from data.tokenizer import EOT
from errors import UserError

IGNORE_INDEX = -1      # target value of padding rows in ValidationSet.batches(pad=True)
_ORDER_CHUNK = 1 << 16  # permutation values computed per vectorised call and cached
STATE_VERSION = 1


class LoaderStateError(UserError, ValueError):
    """A saved loader state that does not fit this loader (different data, seed, sequence length, ...)."""


def _as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _to_xy(buf: np.ndarray, device: torch.device):
    """(B, T+1) uint16 windows -> x, y int64 (B, T) on device (pinned host memory + non_blocking copy on CUDA)."""
    b, t1 = buf.shape
    pin = device.type == "cuda"
    x = torch.empty((b, t1 - 1), dtype=torch.int64, pin_memory=pin)
    y = torch.empty((b, t1 - 1), dtype=torch.int64, pin_memory=pin)
    x.numpy()[:] = buf[:, :-1]
    y.numpy()[:] = buf[:, 1:]
    return x, y


def _move(x, y, device: torch.device):
    if device.type == "cpu":
        return x, y
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _eot_of(paths) -> int:
    """The shards' document delimiter: the tokenizer EOT their manifest records (data/fineweb_edu.py writes it),
    else GPT-2's (shards written by llm.c or the GRAPE scripts have no manifest)."""
    try:
        return int(json.loads((Path(paths[0]).parent / "manifest.json").read_text())["identity"]["tokenizer"]["eot"])
    except (OSError, ValueError, KeyError, TypeError):
        return EOT


def _document_starts(tokens: np.ndarray, seq_len: int, eot: int = EOT, chunk: int = 1 << 24) -> np.ndarray:
    """Greedy non-overlapping window starts at EOT positions (start >= previous start + T, window fits)."""
    n = tokens.size
    eots = np.concatenate([np.flatnonzero(tokens[lo:lo + chunk] == eot) + lo for lo in range(0, n, chunk)]
                          or [np.zeros(0, np.int64)])
    eots = eots[eots + seq_len + 1 <= n]
    # successor of candidate i = the first candidate at or after eots[i] + T (vectorised); the greedy choice is the
    # chain 0 -> succ[0] -> ..., so only the pointer chase is a Python loop (one step per selected window)
    succ = np.searchsorted(eots, eots + seq_len, side="left").tolist()
    chain, i, m = [], 0, eots.size
    while i < m:
        chain.append(i)
        i = succ[i]
    return eots[chain].astype(np.uint32)


class TokenLoader:
    """Deterministic, rank-disjoint, resumable training batches. See the module docstring for the algorithm."""

    def __init__(self, shard_dir_or_glob, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, vocab_size: int = 50304, document_aligned: bool = False, device="cpu",
                 prefetch: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.seq_len, self.batch_size, self.rank, self.world_size = int(seq_len), int(batch_size), rank, world_size
        self.seed, self.vocab_size, self.document_aligned = int(seed), int(vocab_size), bool(document_aligned)
        self.device = _as_device(device)
        self.paths = shards.find_shards(shard_dir_or_glob, "train")
        _warn_if_incomplete(self.paths)
        # plain ndarray views of the memmaps: same pages, without np.memmap's per-slice Python overhead
        self._maps = [shards.open_shard(p).view(np.ndarray) for p in self.paths]
        T = self.seq_len
        if self.document_aligned:
            eot = _eot_of(self.paths)
            self._starts = [_document_starts(m, T, eot) for m in self._maps]
            counts = np.array([s.size for s in self._starts], dtype=np.int64)
        else:
            self._starts = None
            counts = np.array([max(0, (m.size - 1) // T) for m in self._maps], dtype=np.int64)
        self._counts, self._ends = counts, np.cumsum(counts)
        self.num_windows = int(self._ends[-1])
        if self.num_windows < world_size * batch_size:
            raise ShardError(f"{shard_dir_or_glob}: {self.num_windows} training windows of {T}+1 tokens, fewer than "
                             f"one micro-step needs (world_size*batch_size = {world_size * batch_size})")
        h = hashlib.sha256("".join(f"{p.name}:{m.size}\n" for p, m in zip(self.paths, self._maps)).encode())
        self.shards_fingerprint = h.hexdigest()[:16]
        self.epoch, self.position = 0, 0
        self._order_cache: dict = {}
        self._order_lock = threading.Lock()  # the prefetch thread and the caller may both fill the cache
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "token-prefetch") if prefetch else None
        self._pending = None  # ((epoch, position), future) of the batch after the current state

    # ---- sizes ------------------------------------------------------------------------------------------------------
    @property
    def tokens_per_micro_step(self) -> int:
        """Target tokens consumed by one next_batch() call across all ranks (world_size * B * T); per rank: B * T."""
        return self.world_size * self.batch_size * self.seq_len

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps (next_batch calls) per epoch at this world size and batch size."""
        return self.num_windows // (self.world_size * self.batch_size)

    # ---- order and windows ------------------------------------------------------------------------------------------
    def _order_block(self, epoch: int, c: int) -> np.ndarray:
        key = (epoch, c)
        with self._order_lock:
            block = self._order_cache.get(key)
            if block is None:
                lo = c * _ORDER_CHUNK
                block = Permutation(self.num_windows, self.seed, epoch)(
                    np.arange(lo, min(lo + _ORDER_CHUNK, self.num_windows)))
                if len(self._order_cache) >= 4:  # keep a few chunks: ranks and rollovers touch neighbours
                    self._order_cache.pop(next(iter(self._order_cache)))
                self._order_cache[key] = block
        return block

    def _order(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """perm_epoch(positions), computed _ORDER_CHUNK values at a time and cached."""
        chunks = positions // _ORDER_CHUNK
        c0 = int(chunks[0])
        if (chunks == c0).all():  # the usual case: one batch lies inside one chunk
            return self._order_block(epoch, c0)[positions - c0 * _ORDER_CHUNK]
        return np.array([self._order_block(epoch, int(c))[p - int(c) * _ORDER_CHUNK]
                         for p, c in zip(positions, chunks)], dtype=np.int64)

    def window_location(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global window ids -> (shard index, start token offset in that shard)."""
        g = np.asarray(g, dtype=np.int64)
        shard = np.searchsorted(self._ends, g, side="right")
        local = g - (self._ends[shard] - self._counts[shard])
        if self._starts is None:
            return shard, local * self.seq_len
        return shard, np.array([self._starts[s][i] for s, i in zip(shard, local)], dtype=np.int64)

    def windows_for(self, epoch: int, position: int, rank: int | None = None) -> np.ndarray:
        """Global window ids that `rank` receives in the micro-step starting at (epoch, position)."""
        rank = self.rank if rank is None else rank
        lo = position + rank * self.batch_size
        return self._order(epoch, np.arange(lo, lo + self.batch_size, dtype=np.int64))

    def _next_start(self, epoch: int, position: int) -> tuple[int, int]:
        if position + self.world_size * self.batch_size > self.num_windows:
            return epoch + 1, 0  # rollover: the remainder cannot fill a micro-step
        return epoch, position

    def _host_batch(self, epoch: int, position: int):
        shard, start = self.window_location(self.windows_for(epoch, position))
        T1 = self.seq_len + 1
        buf = np.empty((self.batch_size, T1), dtype=np.uint16)
        for i, (s, st) in enumerate(zip(shard, start)):
            buf[i] = self._maps[s][st:st + T1]
        if int(buf.max()) >= self.vocab_size:
            i, j = np.argwhere(buf >= self.vocab_size)[0]
            raise ShardError(f"{self.paths[shard[i]]}: token {int(buf[i, j])} at position {int(start[i]) + int(j)} "
                             f"is >= vocab_size {self.vocab_size}")
        return _to_xy(buf, self.device)

    # ---- iteration --------------------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for the next micro-step; advances the global position by world_size * B."""
        epoch, position = self._next_start(self.epoch, self.position)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == (epoch, position):
            x, y = pending[1].result()
        else:
            x, y = self._host_batch(epoch, position)
        self.epoch, self.position = epoch, position + self.world_size * self.batch_size
        if self._executor is not None:
            nxt = self._next_start(self.epoch, self.position)
            self._pending = (nxt, self._executor.submit(self._host_batch, *nxt))
        return _move(x, y, self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state describing the next batch next_batch() will return."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "document_aligned": self.document_aligned, "num_windows": self.num_windows,
                "shards_fingerprint": self.shards_fingerprint, "num_shards": len(self.paths),
                # informational: a different world size / batch size on resume is allowed
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("version", "seed", "seq_len", "document_aligned", "num_windows", "shards_fingerprint"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise LoaderStateError(f"loader state key {key!r}: saved {state.get(key)!r}, this loader has "
                                       f"{mine!r}; the saved position refers to a different window order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise LoaderStateError(f"loader state (epoch {epoch}, position {position}) outside "
                                   f"[0, {self.num_windows}]")
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self.epoch, self.position = epoch, position

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._pending = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _warn_if_incomplete(paths) -> None:
    manifest = Path(paths[0]).parent / "manifest.json"
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return  # shards from elsewhere (llm.c, GRAPE downloads) have no manifest
    if not m.get("complete", True):
        warnings.warn(f"{manifest}: preparation is not complete ({len(m.get('shards', []))} shards so far); "
                      "training on a prefix of the dataset", stacklevel=3)


class ValidationSet:
    """The first num_tokens target tokens of the validation shard, as fixed windows. See the module docstring."""

    def __init__(self, path_or_dir, seq_len: int, num_tokens: int | None = None, vocab_size: int = 50304):
        paths = shards.find_shards(path_or_dir, "val") if Path(path_or_dir).is_dir() else [Path(path_or_dir)]
        if len(paths) != 1:
            raise ShardError(f"{path_or_dir}: expected exactly one validation shard, found {[p.name for p in paths]}")
        self.path, self.seq_len = paths[0], int(seq_len)
        tokens = shards.open_shard(self.path)
        available = (tokens.size - 1) // self.seq_len
        k = available if num_tokens is None else int(num_tokens) // self.seq_len
        if k < 1 or k > available:
            raise ShardError(f"{self.path}: a validation budget of {num_tokens} tokens at seq_len {self.seq_len} "
                             f"needs {max(k, 1) * self.seq_len + 1} tokens; the shard holds {tokens.size} "
                             f"(at most {available * self.seq_len} target tokens)")
        self.num_windows = k
        self.tokens = np.array(tokens[:k * self.seq_len + 1])  # read once; small next to a training shard
        shards.check_token_range(self.path, self.tokens, vocab_size)

    @property
    def num_tokens(self) -> int:
        """Target tokens evaluated (num_windows * seq_len): the denominator of the validation mean."""
        return self.num_windows * self.seq_len

    def num_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, pad: bool = False) -> int:
        total = -(-self.num_windows // batch_size)
        return -(-total // world_size) if pad else len(range(rank, total, world_size))

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, device="cpu", pad: bool = False):
        """Yield this rank's (x, y) batches. pad=True: every rank yields the same number of full-size batches (for
        FSDP-style collectives inside forward); padding rows have y = IGNORE_INDEX (-1), so the loss must ignore -1
        and token counts must be taken as (y != -1).sum()."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        device, T = _as_device(device), self.seq_len
        total = -(-self.num_windows // batch_size)  # global batches; batch k goes to rank k % world_size
        ks = range(rank, total, world_size)
        if pad:
            ks = range(rank, self.num_batches(batch_size, rank, world_size, pad=True) * world_size, world_size)
        for k in ks:
            lo, hi = k * batch_size, min((k + 1) * batch_size, self.num_windows)
            rows = max(0, hi - lo)
            buf = np.zeros((batch_size if pad else rows, T + 1), dtype=np.uint16)  # padding rows: token 0, ignored
            for i in range(rows):
                buf[i] = self.tokens[(lo + i) * T:(lo + i + 1) * T + 1]
            x, y = _to_xy(buf, device)
            y[rows:] = IGNORE_INDEX  # only padding rows (none unless pad=True)
            yield _move(x, y, device)
