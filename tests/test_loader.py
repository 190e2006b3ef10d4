"""Tests of data/loader.py: stride-T windows, rank-disjoint epochs, exact resume (prefetch, world-size change),
accumulation == data parallel, document-aligned windows, and the validation set's identical mean on any world size."""

import json

import numpy as np
import pytest
import torch

from data import shards
from data.loader import IGNORE_INDEX, LoaderStateError, TokenLoader, ValidationSet
from data.shards import ShardError
from data.tokenizer import EOT


@pytest.fixture
def shard_dir(tmp_path):
    """Three train shards of unequal length with distinct token values, plus a validation shard."""
    rng = np.random.default_rng(0)
    shards.write_shard(tmp_path / "x_val_000000.bin", rng.integers(0, 50257, 5000).astype(np.uint16))
    for i, n in enumerate((1001, 1500, 2222), start=1):
        toks = rng.integers(0, 50000, n).astype(np.uint16)
        toks[rng.random(n) < 0.03] = EOT
        shards.write_shard(tmp_path / f"x_train_{i:06d}.bin", toks)
    return tmp_path


def window_ids(loader, x):
    """Recover (shard, start) of each row of x by matching it against the shards."""
    out = []
    for row in x.numpy().astype(np.uint16):
        for s, m in enumerate(loader._maps):
            T = loader.seq_len
            starts = loader._starts[s] if loader._starts is not None else np.arange(loader._counts[s]) * T
            hits = [int(st) for st in starts if np.array_equal(m[st:st + T], row)]
            if hits:
                out.append((s, hits[0]))
                break
        else:
            raise AssertionError("row is not a window of any shard")
    return out


def test_windows_are_stride_T_slices_with_shifted_targets(shard_dir):
    loader = TokenLoader(shard_dir, seq_len=10, batch_size=4, prefetch=False)
    assert loader.num_windows == 100 + 149 + 222
    assert loader.tokens_per_micro_step == 40
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 10) and x.is_contiguous()
    shard, start = loader.window_location(loader.windows_for(0, 0))
    for i in range(4):
        m = loader._maps[shard[i]]
        assert start[i] % 10 == 0 and start[i] + 11 <= m.size
        assert np.array_equal(x[i].numpy(), m[start[i]:start[i] + 10])
        assert np.array_equal(y[i].numpy(), m[start[i] + 1:start[i] + 11])


def test_ranks_are_disjoint_and_cover_the_epoch(shard_dir):
    T, B, W = 10, 3, 2
    ranks = [TokenLoader(shard_dir, seq_len=T, batch_size=B, rank=r, world_size=W, seed=5) for r in range(W)]
    n, steps = ranks[0].num_windows, ranks[0].steps_per_epoch
    seen = [[], []]
    for _ in range(steps):
        for r, loader in enumerate(ranks):
            seen[r] += window_ids(loader, loader.next_batch()[0])
    assert not set(seen[0]) & set(seen[1])
    union = set(seen[0]) | set(seen[1])
    assert len(union) == steps * W * B and n - len(union) < W * B  # only the < W*B remainder is skipped
    all_windows = {(int(s), int(st)) for s, st in zip(*ranks[0].window_location(np.arange(n)))}
    assert union <= all_windows
    # next batch starts epoch 1 with a new permutation
    ranks[0].next_batch()
    assert ranks[0].state_dict()["epoch"] == 1 and ranks[0].state_dict()["position"] == W * B
    assert not np.array_equal(ranks[0].windows_for(1, 0), ranks[0].windows_for(0, 0))


def test_cover_exact_when_divisible(tmp_path):
    shards.write_shard(tmp_path / "a_train_000001.bin", np.arange(241, dtype=np.uint16))  # 24 windows of 10
    loaders = [TokenLoader(tmp_path, 10, 2, rank=r, world_size=3, seed=1) for r in range(3)]
    rows = [tuple(x[i].tolist()) for _ in range(4) for lo in loaders for x in [lo.next_batch()[0]] for i in range(2)]
    assert sorted(r[0] for r in rows) == list(range(0, 240, 10))


def test_same_seed_same_stream_and_exact_resume(shard_dir):
    def stream(loader, k):
        return [torch.cat(loader.next_batch()) for _ in range(k)]

    a, b = (TokenLoader(shard_dir, 16, 4, seed=3) for _ in range(2))
    sa, sb = stream(a, 80), stream(b, 80)  # 80 steps > 1 epoch (65 steps)
    assert all(torch.equal(u, v) for u, v in zip(sa, sb))
    c = TokenLoader(shard_dir, 16, 4, seed=4)
    assert not torch.equal(sa[0], c.next_batch()[0].repeat(2, 1)[:8])

    for cut in (1, 30, 64, 65, 66):
        first = TokenLoader(shard_dir, 16, 4, seed=3)  # prefetch on: a batch is in flight when we save
        stream(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = TokenLoader(shard_dir, 16, 4, seed=3)
        resumed.next_batch()  # load_state_dict must also discard a loader's own prefetched batch
        resumed.load_state_dict(state)
        assert all(torch.equal(u, v) for u, v in zip(stream(resumed, 80 - cut), sa[cut:]))
        first.close(), resumed.close()


def test_accumulation_equals_data_parallel_and_world_size_change(shard_dir):
    T, B = 12, 3
    single = TokenLoader(shard_dir, T, B, seed=9)
    pair = [TokenLoader(shard_dir, T, B, rank=r, world_size=2, seed=9) for r in range(2)]
    for _ in range(20):
        acc = torch.cat([single.next_batch()[0], single.next_batch()[0]])  # 1 rank x 2 micro-steps
        dp = torch.cat([pair[0].next_batch()[0], pair[1].next_batch()[0]])  # 2 ranks x 1 micro-step
        assert torch.equal(acc, dp)
    # resume a 2-rank run on 1 rank with twice the batch: the global order continues where it stopped
    state = pair[0].state_dict()
    wide = TokenLoader(shard_dir, T, 2 * B, seed=9)
    wide.load_state_dict(state)
    expected = torch.cat([pair[0].next_batch()[0], pair[1].next_batch()[0]])
    assert torch.equal(wide.next_batch()[0], expected)


def test_state_mismatch_is_refused(shard_dir):
    state = TokenLoader(shard_dir, 16, 4, seed=3).state_dict()
    cases = (({"seq_len": 8}, "seq_len"), ({"seed": 4}, "seed"), ({"document_aligned": True}, "document_aligned"),
             ({"shard_dir_or_glob": str(shard_dir / "x_train_00000[12].bin")}, "num_windows"))
    for kwargs, key in cases:
        other = TokenLoader(**{"shard_dir_or_glob": shard_dir, "seq_len": 16, "batch_size": 4, "seed": 3, **kwargs})
        with pytest.raises(LoaderStateError, match=key):
            other.load_state_dict(state)
    TokenLoader(shard_dir, 16, 8, rank=1, world_size=3, seed=3).load_state_dict(state)  # world/batch may change


def test_document_aligned_windows(shard_dir):
    T = 20
    loader = TokenLoader(shard_dir, T, 4, document_aligned=True, seed=1)
    for s, m in enumerate(loader._maps):  # independent greedy reference
        expected, nxt = [], 0
        for p in np.flatnonzero(np.asarray(m) == EOT):
            if p >= nxt and p + T + 1 <= m.size:
                expected.append(int(p))
                nxt = p + T
        assert loader._starts[s].tolist() == expected
    for _ in range(loader.steps_per_epoch):
        x, y = loader.next_batch()
        assert (x[:, 0] == EOT).all() and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_identical_across_world_sizes_and_exact_mean(shard_dir):
    T, B = 16, 3
    val = ValidationSet(shard_dir, seq_len=T, num_tokens=1000)
    assert val.num_windows == 62 and val.num_tokens == 992
    m = shards.open_shard(shard_dir / "x_val_000000.bin")
    single = list(val.batches(B))
    xs = torch.cat([x for x, _ in single])
    assert np.array_equal(xs.numpy().reshape(-1), m[:992]) and torch.equal(torch.cat([y for _, y in single]).view(-1),
                                                                          torch.from_numpy(m[1:993].astype(np.int64)))

    def fake_loss(x, y):  # per-token "losses" with an exact float64 sum
        return ((x * 7 + y) % 13).double()

    ref = sum(fake_loss(x, y).sum() for x, y in single) / val.num_tokens
    for world in (2, 3, 5):
        for pad in (False, True):
            parts = [list(val.batches(B, r, world, pad=pad)) for r in range(world)]
            if pad:
                assert len({len(p) for p in parts}) == 1 and all(x.shape == (B, T) for p in parts for x, _ in p)
            loss_sum = sum(fake_loss(x, y)[y != IGNORE_INDEX].sum() for p in parts for x, y in p)
            count = sum(int((y != IGNORE_INDEX).sum()) for p in parts for _, y in p)
            assert count == val.num_tokens and loss_sum / count == ref  # all-reduce(sum), all-reduce(count)
            order = sorted((k * world + r, x) for r, p in enumerate(parts) for k, (x, y) in enumerate(p))
            assert torch.equal(torch.cat([x for _, x in order])[:62], xs)
            assert [val.num_batches(B, r, world, pad) for r in range(world)] == [len(p) for p in parts]
    with pytest.raises(ShardError, match="holds 5000"):
        ValidationSet(shard_dir, seq_len=T, num_tokens=10_000)
