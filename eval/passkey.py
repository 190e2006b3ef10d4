"""
Passkey retrieval: a random 5-digit number hidden at a chosen depth of filler text, retrieved by greedy decoding.

    python -m eval.passkey --checkpoint out/medium_rope [out/medium_alibi ...] --lengths 1x,2x,4x,8x \\
        [--depths 0,0.25,0.5,0.75,1] [--trials 20] [--seed 0] [--batch-size 4] [--device cuda] [--override k=v]

The prompt (Mohtashami & Jaggi, Landmark Attention, 2023; used by LongLoRA, YaRN and others), as tokens:

    [EOT] "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
    you about the important info there." + filler x a + " The pass key is 12345. Remember it. 12345 is the pass
    key." + filler x b + " What is the pass key? The pass key is"

filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." a + b filler
copies make the prompt as long as possible without exceeding the target length (in tokens, EOT included);
a = round(depth * (a + b)), so depth 0 puts the key right after the instruction and depth 1 right before the
question. The model continues greedily for up to 8 tokens through its KV cache; a trial is correct when the first
number in the continuation is the passkey. Each (length, depth) cell draws `trials` keys from a seeded generator,
the same keys for every checkpoint.

Lengths: "Nx" is N times the checkpoint's training block_size, or a number of tokens. Output (next to the first
checkpoint's run directory unless --out): passkey_<UTC time>.json (every trial: key, answer, correct) and .png (one
accuracy heat map per checkpoint, depth x length), and a markdown table on stdout.
"""

import argparse
import random
import re
import sys

import torch

from data.tokenizer import EOT, GPT2_N_VOCAB, gpt2_encoding
from eval.command import (EvalError, add_model_args, checkpoint_labels, checkpoints_parser, command_main,
                          default_label, output_stem, utc_time, write_result)
from eval.extrapolation import LENGTH_FORMAT, length_list, parse_length, positive_int
from eval.load import load

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important info there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
MAX_NEW_TOKENS = 8


def build_prompt(enc, key, length, depth):
    """Token ids of a prompt of at most `length` tokens with `key` at `depth` in [0, 1]; (ids, filler copies)."""
    intro = [EOT] + enc.encode(INTRO)
    filler, needle, question = enc.encode(FILLER), enc.encode(NEEDLE.format(key=key)), enc.encode(QUESTION)
    fixed = len(intro) + len(needle) + len(question)
    copies = (length - fixed) // len(filler)
    if copies < 0:
        raise EvalError(f"a passkey prompt needs at least {fixed} tokens; length {length} is too short")
    before = round(depth * copies)
    ids = intro + filler * before + needle + filler * (copies - before) + question
    return ids, copies


def first_number(text):
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


@torch.no_grad()
def greedy_continue(model, prompts, device, amp, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy continuations (token lists) of equally long prompts, batched through one KV cache; the argmax runs
    over GPT-2's 50,257 tokens (the rest of the 50,304 rows are padding, never a token)."""
    x = torch.tensor(prompts, device=device)
    cache = model.new_cache()
    out = []
    with amp:
        logits, _ = model(x, cache=cache)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1, :GPT2_N_VOCAB].argmax(-1, keepdim=True)  # ids past 50256 are vocabulary padding
            out.append(nxt)
            logits, _ = model(nxt, cache=cache)
    return torch.cat(out, 1).tolist()


def evaluate_checkpoint(loaded, lengths, depths, trials, seed, batch_size):
    """The result entry of one model (eval.load.Loaded): its summary and one cell per (length, depth)."""
    enc = gpt2_encoding()
    T = loaded.info["trained_block_size"]
    cells = []
    for spec in lengths:
        L = parse_length(spec, T)
        for depth in depths:
            rng = random.Random(f"{seed}-{spec}-{depth}")  # same keys for every checkpoint
            keys = [str(rng.randint(10000, 99999)) for _ in range(trials)]
            prompts = [build_prompt(enc, k, L, depth)[0] for k in keys]
            groups = {}
            for i, p in enumerate(prompts):  # keys of different token counts give prompts of different lengths
                groups.setdefault(len(p), []).append(i)
            answers = [None] * trials
            for idx in groups.values():
                for b in range(0, len(idx), batch_size):
                    rows = idx[b:b + batch_size]
                    conts = greedy_continue(loaded.model, [prompts[r] for r in rows], loaded.device, loaded.amp)
                    for r, cont in zip(rows, conts):
                        answers[r] = enc.decode([t for t in cont if t != EOT])
            results = [dict(key=k, answer=a, correct=first_number(a) == k) for k, a in zip(keys, answers)]
            acc = sum(r["correct"] for r in results) / trials
            cells.append(dict(length_spec=spec, length=L, prompt_tokens=max(map(len, prompts)), depth=depth,
                              accuracy=acc, trials=results))
            print(f"  {spec:>5} = {L:6d} depth {depth:.2f}: accuracy {acc:.2f}", flush=True)
    return dict(loaded.summary(), cells=cells)


def table(result):
    lines = []
    for run in result["checkpoints"]:
        lengths = list(dict.fromkeys(c["length"] for c in run["cells"]))
        depths = list(dict.fromkeys(c["depth"] for c in run["cells"]))
        acc = {(c["length"], c["depth"]): c["accuracy"] for c in run["cells"]}
        lines += [f"**{run['label']}**: passkey accuracy (%), {result['trials']} trials per cell", "",
                  "| depth \\ length | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for d in depths:
            lines.append(f"| {d:g} | " + " | ".join(f"{100 * acc[(L, d)]:.0f}" for L in lengths) + " |")
        mean = [sum(acc[(L, d)] for d in depths) / len(depths) for L in lengths]
        lines += ["| mean | " + " | ".join(f"{100 * m:.0f}" for m in mean) + " |", ""]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = result["checkpoints"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs) + 1, 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        lengths = list(dict.fromkeys(c["length"] for c in run["cells"]))
        depths = list(dict.fromkeys(c["depth"] for c in run["cells"]))
        acc = {(c["length"], c["depth"]): c["accuracy"] for c in run["cells"]}
        grid = np.array([[acc[(L, d)] for L in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set(xlabel="prompt length (tokens)", ylabel="depth", title=run["label"])
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def depth_list(text):
    """argparse type of --depths: 'a,b,...' -> [floats], each in [0, 1], at least one."""
    try:
        depths = [float(d) for d in str(text).split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise argparse.ArgumentTypeError(f"expected comma-separated depths in [0, 1], got {text!r}")
    return depths


def parse_args(argv):
    p = checkpoints_parser("python -m eval.passkey", __doc__)
    p.add_argument("--lengths", type=length_list, default="1x,2x,4x,8x", help=f"comma-separated: {LENGTH_FORMAT}")
    p.add_argument("--depths", type=depth_list, default="0,0.25,0.5,0.75,1", help="comma-separated, each in [0, 1]")
    p.add_argument("--trials", type=positive_int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=4)
    add_model_args(p)
    return p.parse_args(argv)


def run(args):
    """Evaluate every checkpoint; write <stem>.json and .png; (result, [those files])."""
    labels = checkpoint_labels(args.label, args.checkpoint)
    depths = args.depths
    lengths = args.lengths
    result = dict(lengths=lengths, depths=depths, trials=args.trials, seed=args.seed, dtype=args.dtype,
                  prompt=dict(intro=INTRO, filler=FILLER, needle=NEEDLE, question=QUESTION),
                  time_utc=utc_time(), checkpoints=[])
    for path, label in zip(args.checkpoint, labels):
        print(path + (f" [{label}]" if label else ""))
        loaded = load(path, args.override, args.device, args.dtype)
        entry = evaluate_checkpoint(loaded, lengths, depths, args.trials, args.seed, args.batch_size)
        del loaded
        entry["label"] = label or default_label(entry)
        result["checkpoints"].append(entry)
    stem = output_stem(args.out, result["checkpoints"][0]["path"], "passkey")
    return result, write_result(result, stem, plot, indent=1)


main = command_main(parse_args, run, table)


if __name__ == "__main__":
    sys.exit(main())
