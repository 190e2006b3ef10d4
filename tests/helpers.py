"""Helpers shared by test modules.

Floating-point results on a CPU depend on the number of threads (a parallel reduction splits its sum by thread,
and the rounding follows the split), on the instruction set the kernels dispatch to, and on the BLAS build. A test
that compares two computations bit for bit therefore runs both under one thread setting, in one process or in
children told the same, whatever the machine's default is."""

import contextlib
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from data import shards
from data.fineweb_edu import prepare
from data.tokenizer import EOT, gpt2_encoding
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
COMPARE_THREADS = 1  # the thread count of every computation a test compares with another bit for bit


@contextlib.contextmanager
def torch_threads(n=COMPARE_THREADS):
    """Run the body with torch's intra-op thread count set to n (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def child_env(threads=COMPARE_THREADS, **extra):
    """The environment of a child process (train.py, torchrun) whose numbers a test compares: the repository on
    PYTHONPATH, OMP_NUM_THREADS pinned (torch reads it for its thread count; torchrun passes a value that is set to
    its workers unchanged), wandb off, and no torchrun variables of an enclosing job."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def assert_bitwise_equal(a, b):
    """Two state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------------------- models
# Small models for the tests of model.py and its PEs (vocabulary 97, two layers, four heads of 16 dims).


def tiny_config(pe, kv_shift=False, **kw):
    """A two-layer GPTConfig with pos_encoding=pe; embedding std 0.2 gives logits of std ~2 and max ~13 (like a
    trained LM), so absolute tolerances mean something."""
    base = dict(n_layer=2, n_head=4, n_embd=64, head_dim=16, vocab_size=97, block_size=32,
                pos_encoding=pe, kv_shift=kv_shift, embedding_init_std=0.2)
    return GPTConfig(**{**base, **kw})


@torch.no_grad()
def perturb_pe_parameters(model, scale=0.3):
    """Move every PE parameter and norm gain away from its init, so that tests do not pass only at init
    (e.g. GRAPE-M-ctx's gate weight starts at exactly 0 and GRAPE-M's spectrum equals RoPE's)."""
    for name, p in model.named_parameters():
        if any(s in name for s in ("rotary", "additive", "shift_proj", "rms")):
            p.add_(scale * torch.randn_like(p) * (p.abs().mean() + 0.1))


def tiny_model(pe, kv_shift=False, seed=0, **kw):
    """The fp32 model of tiny_config, built under torch.manual_seed(seed), PE parameters perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(pe, kv_shift, **kw))
    perturb_pe_parameters(model)
    return model.eval()


def double_model(pe, perturb=True, **kw):
    """The model of tiny_config in fp64 (for comparisons with explicit matrices), seed 0, in eval mode."""
    torch.manual_seed(0)
    model = GPT(tiny_config(pe, **kw)).double()
    if perturb:
        perturb_pe_parameters(model)
    return model.eval()


LAYER_BATCH, LAYER_LENGTH = 2, 12  # the shape of layer_inputs


def layer_inputs(model):
    """(x, positions): a random fp64 attention input (LAYER_BATCH, LAYER_LENGTH, n_embd) at positions 0 .. T-1."""
    return torch.randn(LAYER_BATCH, LAYER_LENGTH, model.config.n_embd, dtype=torch.float64), torch.arange(LAYER_LENGTH)


def scores(attn, x, positions, cache=None):
    """The attention logits (B, H, T, T) of one layer: <q~_i, k~_j> / sqrt(D) + b(i, j), -inf above the diagonal."""
    q, k, _, (q_feats, k_feats) = attn.qkv(x, positions, cache)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    s = q @ k.transpose(-1, -2) * attn.scale  # 1/sqrt(D), also for PoPE's 2D-wide q and k
    if attn.additive is not None:
        s = s + attn.additive.bias(q_feats, k_feats, positions, positions)
    hidden = positions[None, :] > positions[:, None]
    return s.masked_fill(hidden, float("-inf"))


def lower(s):
    """The causal (j <= i) entries of (..., T, T) scores."""
    i, j = torch.tril_indices(s.size(-2), s.size(-1))
    return s[..., i, j]


def half_split_generator(freqs):
    """L = sum_m theta_m (e_m e_{m+d/2}^T - e_{m+d/2} e_m^T): exp(n L) rotates plane (m, m+d/2) by -n theta_m."""
    half = freqs.numel()
    gen = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    idx = torch.arange(half)
    gen[idx, idx + half] = freqs.double()
    gen[idx + half, idx] = -freqs.double()
    return gen


@torch.no_grad()
def full_and_cached(model, idx, chunks):
    """(logits of one full forward, the same logits decoded through the KV cache): the first chunks[i] tokens as
    multi-token steps (a prefill, then a chunk on a non-empty cache), then one token at a time."""
    full, _ = model(idx, all_logits=True)
    cache, pieces, t = model.new_cache(), [], 0
    for end in [*chunks, *range(chunks[-1] + 1, idx.size(1) + 1)]:
        pieces.append(model(idx[:, t:end], cache=cache, all_logits=True)[0])
        t = end
    assert cache.length == idx.size(1)
    return full, torch.cat(pieces, dim=1)


# ------------------------------------------------------------------------------------------------------------ data
# Inputs and readers for the tests of data/ (preparation, sources, tokenizer, shard writer).

DOCUMENTS = [
    "Hello world, this is GPT-2.",
    "A second document.\nIt has two lines, and a literal <|endoftext|> that must stay text.",
    "Ünïcödé: naïve café, 東京, emoji 🙂 and math ∑x².",
    "  leading spaces are kept\ttabs too   ",
    " ".join(f"word{i}" for i in range(300)),  # longer than two shards of 64 tokens
    "x",
    "The end.",
]


def write_txt(path, docs, sep="\n\n", gz=False):
    """A txt input (gzip-compressed with gz=True): the documents separated by `sep`, a blank line by default."""
    text = sep.join(docs) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def shard_paths(directory):
    """The shard files of a directory in index order (validation shard 0 first)."""
    return sorted(Path(directory).glob("*.bin"), key=lambda p: shards.parse_shard_name(p.name)[2])


def shard_tokens(directory):
    """The token stream of a directory: every shard's tokens, concatenated in index order."""
    return np.concatenate([np.asarray(shards.open_shard(p)) for p in shard_paths(directory)])


def decode_documents(tokens):
    """The texts of a GPT-2 token stream in which every document starts with EOT."""
    cuts = np.flatnonzero(tokens == EOT)
    assert cuts.size and cuts[0] == 0, "every document starts with EOT"
    return [gpt2_encoding().decode(tokens[a + 1:b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [tokens.size])]


def visible_files(directory):
    """{name: bytes} of a directory's files, hidden ones (the lock, temporary files) excluded: what two preparations
    that must be byte-identical are compared by."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if not p.name.startswith(".")}


def prepare_tiny(source, out_dir, **overrides):
    """data.fineweb_edu.prepare with 40-token shards named r_*, 4 documents per batch, in this process, silently."""
    return prepare(source, out_dir, **{"shard_size": 40, "prefix": "r", "workers": 0, "progress": False,
                                       "batch_docs": 4, **overrides})


# ---- train.py on a tiny config (tests/test_train.py, tests/test_checkpoint.py)

TINY_TRAIN_ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--head_dim=32", "--block_size=64",
                   "--global_batch_size=8", "--micro_batch_size=8", "--learning_rate=3e-3", "--min_lr=3e-4",
                   "--warmup_steps=5", "--val_tokens=8192", "--log_interval=1", "--wandb=disabled", "--device=cpu",
                   "--compile=false"]


def train_args(shard_dir, out_dir, *extra):
    """train.py's arguments: configs/tiny/rope.toml made tinier, on these shards (byte shards: the 320-row
    vocabulary), then `extra`."""
    import json

    tokenizer = json.loads((Path(shard_dir) / "manifest.json").read_text())["identity"]["tokenizer"]["name"]
    vocab = ["--vocab_size=320"] if tokenizer == "bytes" else []
    return [str(REPO / "configs" / "tiny" / "rope.toml"), f"--data_dir={shard_dir}", f"--out_dir={out_dir}",
            *TINY_TRAIN_ARGS, *vocab, *extra]


def train_in_process(shard_dir, out_dir, *extra, threads=None):
    """train.py in this process (its result dict); threads: torch's thread count for the run (that of the child
    processes it is compared with bit for bit, COMPARE_THREADS), default unchanged."""
    import train
    from config import load_config

    argv = train_args(shard_dir, out_dir, *extra)
    with torch_threads(threads) if threads else contextlib.nullcontext():
        return train.train(load_config(argv[0], argv[1:]))


def train_metrics(out_dir, event="train"):
    """The records of one event ("train", "val", ...) in a run's metrics.jsonl, in order."""
    import json

    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def final_weights(out_dir):
    """The model state dict of a run's newest checkpoint."""
    import checkpoint

    return torch.load(checkpoint.latest_checkpoint(out_dir) / "model.pt", weights_only=True)


def torchrun(nproc, shard_dir, out_dir, *extra, check=True, timeout=300):
    """train.py under torchrun with nproc CPU (gloo) processes and train_args(shard_dir, out_dir, *extra); the
    finished process (asserted successful unless check=False)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train",
           *train_args(shard_dir, out_dir, *extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def assert_runs_close(run_a, run_b, steps, loss_tol, val_tol):
    """Two runs logged the same `steps` training steps with losses within loss_tol, and final validation losses
    within val_tol."""
    a, b = train_metrics(run_a), train_metrics(run_b)
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= loss_tol, (x, y)
    assert abs(train_metrics(run_a, "val")[-1]["val_loss"] - train_metrics(run_b, "val")[-1]["val_loss"]) <= val_tol
