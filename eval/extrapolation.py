"""
Length extrapolation: loss and perplexity at multiples of the training length, per position, on held-out text.

    python -m eval.extrapolation --checkpoint out/medium_rope out/medium_alibi --lengths 1x,2x,4x,8x,16x \\
        [--data-dir data/shards/fineweb-edu100B] [--tokens 1048576] [--stride 0.5x] [--modes nonoverlap,sliding] \\
        [--override rope_base=500000] [--batch-size 1] [--device cuda] [--dtype bfloat16] [--out DIR]

Data: the validation shard (`*_val_000000.bin`, never trained on) of --data-dir (default data/shards/sample), its
first --tokens tokens (default: 2^20, or the whole shard if shorter), the same span for every length and checkpoint.
The shard is documents joined by EOT, so a window spans several documents once it is longer than a document;
beyond the training length the curve measures how the model copes with positions and distances it never saw, which
is what separates the PEs (FoX, Lin et al. 2025, and ALiBi, Press et al. 2022, report the same two protocols).

Lengths: "Nx" is N times the checkpoint's training block_size (so checkpoints of different lengths are compared at
the same multiples), a plain number is tokens.

Two protocols per length L:
    nonoverlap  consecutive windows of L + 1 tokens at stride L (x = w[:-1], y = w[1:]); every position 0..L-1 of
                every window is scored. Gives the per-position loss curve (mean over windows): position p has
                exactly p tokens of context.
    sliding     windows of L tokens at stride S (--stride, default L/2, "Nx" or tokens); the first window scores all
                its tokens, every later one only its last S, so each token is scored once with at least L - S
                tokens of context (S = 1 is the ALiBi paper's sliding evaluation; costly).
Reported: mean loss and perplexity = exp(mean loss) over the scored tokens, and (nonoverlap) the loss per position
and its mean over each block of block_size positions ([0, T), [T, 2T), ...).

Inference-time changes to the model are config overrides passed through to the model: --override key=value
(repeatable; the value read as train.py reads --key=value), applied to every checkpoint, recorded in the output;
--override-for LABEL:key=value for one labelled checkpoint (give a checkpoint twice with two labels to compare).
The RoPE scalings have a shortcut:
`--rope-scaling pi,ntk,yarn [--rope-scaling-factor S]` evaluates every rope / grape_m / grape_m_basis checkpoint once
more per scaling (labelled <label>+<kind>; S defaults to the longest length over the training length).

Output (next to the first checkpoint's run directory unless --out): extrapolation_<UTC time>.json and .png (left:
loss vs position, one line per checkpoint, at the longest length; right: loss vs evaluation length, both protocols).
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from eval.command import (EvalError, add_model_args, checkpoint_labels, checkpoints_parser, command_main,
                          default_label, output_stem, utc_time, write_result)
from eval.load import Checkpoint
from eval.scoring import token_losses


class DataError(EvalError):
    """No usable validation data: a missing directory or shard, or too few tokens for a length."""


def validation_tokens(data_dir, max_tokens=None):
    """The first max_tokens tokens (int64 numpy) of data_dir's validation shard."""
    from data import shards

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir} (python -m data.fineweb_edu --sample makes "
                        f"data/shards/sample)")
    try:
        found = shards.find_shards(data_dir, "val")
    except shards.ShardError as e:
        raise DataError(str(e)) from None
    if len(found) != 1:
        raise DataError(f"{data_dir}: expected one validation shard (*_val_000000.bin), found "
                        f"{[p.name for p in found]}")
    tokens = shards.open_shard(found[0])
    n = tokens.size if max_tokens is None else min(int(max_tokens), tokens.size)
    return np.asarray(tokens[:n], dtype=np.int64), found[0]


LENGTH_FORMAT = "Nx (N > 0 times the training block_size, e.g. 2x or 0.5x) or a positive number of tokens"


def _length_number(spec):
    """The number in a length spec ('4x' -> 4.0, '300' -> 300), or None when spec is neither form."""
    try:
        return float(spec[:-1]) if spec.endswith("x") else int(spec)
    except ValueError:
        return None


def check_length_spec(spec):
    """spec stripped, when it is a length ('Nx' with a finite N > 0, or an integer > 0); else ValueError naming it."""
    spec = str(spec).strip()
    number = _length_number(spec)
    if number is None or not math.isfinite(number) or number <= 0:
        raise EvalError(f"{spec!r} is not a length: expected {LENGTH_FORMAT}")
    return spec


def length_list(text):
    """argparse type of --lengths: 'a,b,...' -> [the stripped specs], each checked; at least one is required, so
    that a bad list fails at parse time, before any model is loaded or any file written."""
    specs = [s.strip() for s in str(text).split(",") if s.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"{text!r} names no length: expected a comma-separated list of "
                                         f"{LENGTH_FORMAT}")
    try:
        return [check_length_spec(s) for s in specs]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def length_spec(text):
    """argparse type of a single length flag (--stride): one checked spec."""
    try:
        return check_length_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text):
    """argparse type of a count (--tokens, --batch-size): an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_length(spec, block_size):
    """'4x' -> 4 * block_size; '0.5x' -> block_size // 2; '8192' -> 8192 (check_length_spec's forms)."""
    spec = check_length_spec(spec)
    value = int(float(spec[:-1]) * block_size) if spec.endswith("x") else int(spec)
    if value <= 0:
        raise EvalError(f"length {spec!r} is not positive (it rounds to {value} tokens at block_size {block_size})")
    return value


@torch.no_grad()
def nonoverlap(model, tokens, L, batch_size, device, amp):
    """Per-position mean loss (L,) over the windows of L + 1 tokens at stride L, and the window count."""
    k = (len(tokens) - 1) // L
    if k < 1:
        raise DataError(f"{len(tokens)} tokens hold no window of {L + 1}; use more --tokens or a shorter length")
    total = torch.zeros(L, dtype=torch.float64)
    for s in range(0, k, batch_size):
        rows = range(s, min(s + batch_size, k))
        w = torch.from_numpy(np.stack([tokens[r * L:r * L + L + 1] for r in rows])).to(device)
        with amp:
            losses = token_losses(model, w[:, :-1], w[:, 1:])
        total += losses.double().sum(0).cpu()
    return (total / k).numpy(), k


@torch.no_grad()
def sliding(model, tokens, L, stride, batch_size, device, amp):
    """(sum of losses, scored tokens): windows of L at stride `stride`, each token scored once (see module doc)."""
    n = len(tokens) - 1  # targets
    if n < L:
        raise DataError(f"{len(tokens)} tokens hold no window of {L + 1}; use more --tokens or a shorter length")
    width = L
    starts = list(range(0, n - width + 1, stride))
    if starts[-1] + width < n:
        starts.append(n - width)  # the tail: one more window, ending at the last token
    jobs, covered = [], 0  # (window start, first offset not scored by an earlier window)
    for st in starts:
        jobs.append((st, max(covered - st, 0)))
        covered = st + width
    loss_sum, count = 0.0, 0
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        w = torch.from_numpy(np.stack([tokens[st:st + width + 1] for st, _ in batch])).to(device)
        with amp:
            losses = token_losses(model, w[:, :-1], w[:, 1:])
        for row, (_, first) in enumerate(batch):
            loss_sum += losses[row, first:].double().sum().item()
            count += width - first
    assert count == n, (count, n)
    return loss_sum, count


def evaluate_checkpoint(loaded, lengths, tokens, modes, stride_spec, batch_size):
    """The result entry of one model (eval.load.Loaded): its summary, then both protocols at every length."""
    model, device, amp = loaded.model, loaded.device, loaded.amp
    T = loaded.info["trained_block_size"]
    out = dict(loaded.summary(), nonoverlap={}, sliding={})
    for spec in lengths:
        L = parse_length(spec, T)
        if "nonoverlap" in modes:
            per_pos, k = nonoverlap(model, tokens, L, batch_size, device, amp)
            loss = float(per_pos.mean())
            blocks = [float(per_pos[i:i + T].mean()) for i in range(0, L, T)]
            out["nonoverlap"][str(L)] = dict(length_spec=spec, loss=loss, ppl=math.exp(loss), windows=k,
                                             tokens=k * L, per_block=blocks, per_position=per_pos.tolist())
            print(f"  {spec:>5} = {L:6d}  nonoverlap  loss {loss:.4f}  ppl {math.exp(loss):9.2f}  ({k} windows)",
                  flush=True)
        if "sliding" in modes:
            S = parse_length(stride_spec, L) if str(stride_spec).endswith("x") else int(stride_spec)
            S = max(1, min(S, L))
            total, count = sliding(model, tokens, L, S, batch_size, device, amp)
            loss = total / count
            out["sliding"][str(L)] = dict(length_spec=spec, stride=S, loss=loss, ppl=math.exp(loss), tokens=count)
            print(f"  {spec:>5} = {L:6d}  sliding    loss {loss:.4f}  ppl {math.exp(loss):9.2f}  (stride {S})",
                  flush=True)
    return out


def smooth(y, width):
    if width <= 1:
        return np.asarray(y)
    kernel = np.ones(width) / width
    return np.convolve(y, kernel, mode="valid")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run in result["checkpoints"]:
        if run["nonoverlap"]:
            L = max(run["nonoverlap"], key=int)
            y = np.asarray(run["nonoverlap"][L]["per_position"])
            width = max(1, len(y) // 128)
            ys = smooth(y, width)
            ax1.plot(np.arange(len(ys)) + width, ys, label=run["label"], lw=1.2)
            ax1.axvline(run["block_size"], color="gray", ls=":", lw=0.8)
            xs = sorted(map(int, run["nonoverlap"]))
            ax2.plot(xs, [run["nonoverlap"][str(x)]["loss"] for x in xs], "o-", label=f"{run['label']} (non-overlap)")
        if run["sliding"]:
            xs = sorted(map(int, run["sliding"]))
            ax2.plot(xs, [run["sliding"][str(x)]["loss"] for x in xs], "s--", label=f"{run['label']} (sliding)")
    ax1.set(xscale="log", xlabel="position (tokens)", ylabel="loss (nats, moving average)",
            title="loss vs position, longest length, non-overlapping windows")
    ax2.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="mean loss (nats)",
            title="mean loss vs evaluation length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.text(0.01, 0.01, "dotted: training length", transform=ax1.transAxes, fontsize=8, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result):
    lines = []
    for mode in ("nonoverlap", "sliding"):
        lengths = sorted({int(L) for r in result["checkpoints"] for L in r[mode]})
        if not lengths:
            continue
        lines += [f"**{mode}**: perplexity (loss) by evaluation length", "",
                  "| checkpoint | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for r in result["checkpoints"]:
            cells = [f"{r[mode][str(L)]['ppl']:.2f} ({r[mode][str(L)]['loss']:.3f})" if str(L) in r[mode] else "–"
                     for L in lengths]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


MODES = ("nonoverlap", "sliding")


def mode_list(text):
    """argparse type of --modes: 'a,b' -> [modes], each one of MODES, at least one."""
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes or not set(modes) <= set(MODES):
        raise argparse.ArgumentTypeError(f"expected nonoverlap and/or sliding, got {text!r}")
    return modes


def parse_args(argv):
    p = checkpoints_parser("python -m eval.extrapolation", __doc__)
    p.add_argument("--lengths", type=length_list, default="1x,2x,4x,8x,16x", help=f"comma-separated: {LENGTH_FORMAT}")
    p.add_argument("--modes", type=mode_list, default="nonoverlap,sliding", help="nonoverlap and/or sliding")
    p.add_argument("--stride", type=length_spec, default="0.5x",
                   help="sliding-window stride: 'Nx' of the length, or tokens")
    p.add_argument("--data-dir", default="data/shards/sample")
    p.add_argument("--tokens", type=positive_int, default=1 << 20,
                   help="validation tokens used (the same for all lengths)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    add_model_args(p)
    p.add_argument("--override-for", action="append", default=[], metavar="LABEL:KEY=VALUE",
                   help="GPTConfig override for the checkpoint with this label (repeatable)")
    p.add_argument("--rope-scaling", default="", metavar="KIND[,KIND...]",
                   help="also evaluate every rope / grape_m / grape_m_basis checkpoint with these evaluation-time "
                        "scalings (pi, ntk, yarn, dynamic_ntk, dynamic_yarn), labelled <label>+<kind>")
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="s for the static scalings (default: the longest length / the training length)")
    return p.parse_args(argv)


def check_scaling_kinds(kinds):
    from model import ROPE_SCALINGS

    for kind in kinds:
        if kind not in ROPE_SCALINGS or kind == "none":
            raise EvalError(f"--rope-scaling: unknown kind {kind!r}; expected some of {ROPE_SCALINGS[1:]}")


def scaled_variants(checkpoint, overrides, kinds, factor, lengths):
    """[(label suffix, overrides)]: the checkpoint (eval.load.Checkpoint) as given, then one entry per RoPE scaling
    kind when its PE has a RoPE spectrum (the others are listed once, unscaled). factor None: the longest length
    over the training length."""
    from model import SCALABLE_ROTARY_PES, split_pos_encoding

    out = [("", overrides)]
    if not kinds:
        return out
    cfg = checkpoint.model_config(overrides)
    if split_pos_encoding(cfg.pos_encoding)[0] not in SCALABLE_ROTARY_PES:
        print(f"{checkpoint.path}: {cfg.pos_encoding} has no RoPE spectrum; --rope-scaling does not apply",
              file=sys.stderr)
        return out
    s = factor or max(1.0, max(parse_length(x, cfg.block_size) for x in lengths) / cfg.block_size)
    for kind in kinds:
        out.append((f"+{kind}", overrides + [f"rope_scaling={kind}", f"rope_scaling_factor={s}"]))
    return out


def trained_lengths(checkpoint, specs):
    """The specs in tokens at the checkpoint's training block_size (what evaluate_checkpoint uses)."""
    block_size = checkpoint.meta["config"].get("block_size") or checkpoint.model_config().block_size
    try:
        return [parse_length(spec, block_size) for spec in specs]
    except ValueError as e:
        raise EvalError(f"--lengths, checkpoint {checkpoint.path}: {e}") from None


def override_lists(args, labels):
    """{label: the overrides of the checkpoint so labelled}: --override for all, then its own --override-for."""
    per_label = {label: list(args.override) for label in labels}
    for item in args.override_for:
        label, _, kv = item.partition(":")
        if label not in labels:
            raise EvalError(f"--override-for {item!r}: no checkpoint labelled {label!r} (labels: {labels})")
        per_label[label].append(kv)
    return per_label


def run(args):
    """Evaluate every checkpoint (and its scaled variants); write <stem>.json and .png; (result, [those files])."""
    modes, lengths = args.modes, args.lengths
    labels = checkpoint_labels(args.label, args.checkpoint)
    per_label = override_lists(args, labels)
    kinds = [k.strip() for k in args.rope_scaling.split(",") if k.strip()]
    check_scaling_kinds(kinds)
    tokens, shard = validation_tokens(args.data_dir, args.tokens)
    result = dict(data=str(Path(shard).resolve()), tokens=int(len(tokens)), lengths=lengths, modes=modes,
                  stride=args.stride, dtype=args.dtype, time_utc=utc_time(), checkpoints=[])
    jobs = []
    for path, label in zip(args.checkpoint, labels):
        checkpoint = Checkpoint(path)
        for suffix, overrides in scaled_variants(checkpoint, per_label[label], kinds, args.rope_scaling_factor,
                                                 lengths):
            jobs.append((checkpoint, path, label, suffix, overrides))
    for checkpoint, *_ in jobs:
        trained_lengths(checkpoint, lengths)  # a length that rounds to 0 tokens fails before anything is computed
    for checkpoint, path, label, suffix, overrides in jobs:
        print(f"{path}" + (f" [{label}]" if label else "") + (f" overrides {overrides}" if overrides else ""))
        loaded = checkpoint.load(overrides, args.device, args.dtype)
        entry = evaluate_checkpoint(loaded, lengths, tokens, modes, args.stride, args.batch_size)
        del loaded
        entry["label"] = (label or default_label(entry)) + suffix
        result["checkpoints"].append(entry)
    return result, write_result(result, output_stem(args.out, jobs[0][0].path, "extrapolation"), plot)


main = command_main(parse_args, run, table)


if __name__ == "__main__":
    sys.exit(main())
