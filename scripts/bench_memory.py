"""
The memory planner (memory_plan.py) against measured CPU trainings: estimated vs measured peak, per config.

    python -m scripts.bench_memory [--out results/plan_vs_measured.md]

Each case trains one process on random tokens in a child process: one warm-up step (AdamW allocates its moments;
gradients are kept, zeroed), then a second step whose peak resident memory is read. Method:
  * glibc's mmap threshold is pinned low (MALLOC_MMAP_THRESHOLD_=65536), so every tensor above 64 KiB is its own
    mapping, returned to the system when freed: the resident set follows the live tensors instead of keeping
    freed blocks in the heap;
  * before the second step the kernel's peak-RSS mark is reset (writing 5 to /proc/self/clear_refs), and after it
    /proc/self/status gives VmHWM (the peak) and VmRSS;
  * measured activations = VmHWM - VmRSS before the second step (weights, gradients and moments all live then);
    measured peak = VmHWM - VmRSS before the model was built (the runtime's own growth, ~0.1 GiB of libraries and
    caches the planner does not count, is in it).
Linux only. Ratios are estimate / measured.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.bench_memory ...")

from errors import exit_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# (name, config, overrides, micro-batch): a tiny-to-small model each; the vocabulary of 50,304 makes the logits and
# the loss transients a large share, as in the paper's models at their micro-batches
CASES = [
    ("tiny rope fp32", "configs/tiny/rope.toml", [], 16),
    ("small grape_ap fp32, checkpointing", "configs/tiny/grape_ap.toml",
     ["--n_layer=6", "--n_embd=256", "--n_head=4", "--head_dim=64", "--block_size=512", "--activation_checkpointing=full"], 4),
    ("small fox + kv_shift bf16", "configs/tiny/fox.toml",
     ["--n_layer=6", "--n_embd=256", "--n_head=4", "--head_dim=64", "--block_size=512", "--kv_shift=true",
      "--dtype=bfloat16"], 4),
]

CHILD = """
import json, sys, types
import torch
from config import load_config
from device import autocast_context
import parallel
from model import GPT

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

config, micro_batch, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = load_config(config, overrides)
torch.manual_seed(0)
before_model = status("VmRSS")
model = GPT(cfg.model)
parallel.wrap(model, cfg, torch.device("cpu"), distributed=False)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
amp = autocast_context("cpu", cfg.dtype)
T, V = cfg.model.block_size, cfg.model.vocab_size
tokens = torch.randint(0, V, (micro_batch, T + 1))

def step():
    with amp:
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)

step()
before_step = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
step()
peak = status("VmHWM")
print(json.dumps(dict(activations=peak - before_step, peak=peak - before_model)))
"""


def measure(config, overrides, micro_batch, threads=2):
    """{"activations", "peak"} in bytes, measured in a child process (module docstring)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO / config), str(micro_batch), *overrides],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"the measurement of {config} {overrides} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(config, overrides, micro_batch):
    """(the memory_plan Estimate, the measurement) for one case."""
    from config import load_config
    from memory_plan import estimate
    cfg = load_config(REPO / config, overrides)
    return estimate(cfg, world=1, micro_batch=micro_batch, device_type="cpu"), measure(config, overrides, micro_batch)


def table(rows):
    from memory_plan import gib
    lines = ["| case | micro-batch x T | activations: estimated | measured | ratio | peak: estimated | measured | "
             "ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, T, plan, got in rows:
        lines.append(f"| {name} | {plan.micro_batch} x {T} | {gib(plan.activations)} | {gib(got['activations'])} | "
                     f"{plan.activations / got['activations']:.2f} | {gib(plan.peak)} | {gib(got['peak'])} | "
                     f"{plan.peak / got['peak']:.2f} |")
    return lines


def main(argv=None):
    return exit_status(_main, sys.argv[1:] if argv is None else argv)


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_memory", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here too")
    args = parser.parse_args(argv)
    from config import load_config
    rows = []
    for name, config, overrides, micro_batch in CASES:
        plan, got = compare(config, overrides, micro_batch)
        rows.append((name, load_config(REPO / config, overrides).model.block_size, plan, got))
        print(table(rows)[-1], flush=True)
    lines = table(rows)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
