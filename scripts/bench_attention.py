"""
Cost of each positional encoding's attention on this machine, as ratios to RoPE + causal SDPA measured in the same
run. Three measurements, all written to the --json file so that later changes can be compared:

1. layer: one attention layer (CausalSelfAttention: projections, PE features, bias, attention, output projection),
   forward + backward, per PE and sequence length T, on the chunked path (default) and, where it fits, the dense
   (B, H, T, T) path.
   time: all PEs of one T in one process, timed in interleaved rounds (so that noise from other processes on the
         machine hits them alike); the median round.
   mem:  each configuration in its own process, one forward + backward; the peak RSS (ru_maxrss) above the RSS just
         before the step, i.e. what the layer's forward and backward add. The process peak is in the JSON too.
2. model: a tiny model's training step (forward, backward, AdamW), all PEs in one process, interleaved rounds,
   median; for the shape of configs/tiny, and for the same model with a 512-token vocabulary, where the LM head no
   longer hides the attention.
3. --long: every additive PE trains the configs/tiny model for a few steps at T = 8192 (one process each): peak RSS,
   step time, losses.

    python -m scripts.bench_attention --json /tmp/bench.json        # T 1k/2k/4k/8k (dense to 2k), 2 rounds, ~15 min
    python -m scripts.bench_attention --full --threads 1 --json results/bench_attention.json        # ~35 min
    python -m scripts.bench_attention --long --threads 1 --json results/bench_attention_long.json   # ~13 min
--threads 1 gives stable ratios on a shared machine: with two OpenMP threads, each op of a many-op path (the chunked
one) can stall for a scheduler tick while another process holds the second core. results/bench_attention.md holds
the tables.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.bench_attention ...")

PES = ["rope", "nope", "alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
ADDITIVE = ["alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
# configs/tiny (4 layers, 4 heads of 32, width 128, GPT-2 vocabulary) and the same with 512 tokens
MODEL_SHAPES = {"tiny": dict(n_layer=4, n_head=4, n_embd=128, head_dim=32, vocab_size=50304),
                "tiny_v512": dict(n_layer=4, n_head=4, n_embd=128, head_dim=32, vocab_size=512)}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------- workers


def split_impl(impl):
    """"chunked+compile" -> ("chunked", True): an attn_impl and whether the layer is compiled."""
    base, _, suffix = impl.partition("+")
    if suffix not in ("", "compile"):
        raise ValueError(f"unknown path {impl!r}: an attn_impl, optionally followed by +compile")
    return base, suffix == "compile"


def make_layer(a, pe, impl, device="cpu"):
    """One CausalSelfAttention of the shape in `a` (n_head, n_embd, head_dim, chunk) for `pe`, in training mode.
    impl: an attn_impl, or one followed by "+compile": the layer under torch.compile, with the chunked path's
    autograd Function traced into the graph (trace_autograd_ops; without it the Function runs eagerly)."""
    import torch
    from model import GPT, GPTConfig
    base, compile_it = split_impl(impl)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=a["n_head"], n_embd=a["n_embd"], head_dim=a["head_dim"], vocab_size=64,
                    pos_encoding=pe, attn_impl=base, attn_chunk_size=a["chunk"])
    layer = GPT(cfg).transformer.h[0].attn.train().to(device)
    if compile_it:
        if hasattr(torch._dynamo.config, "trace_autograd_ops"):  # a torch without it runs the Function eagerly
            torch._dynamo.config.trace_autograd_ops = True
        layer.compile()
    return layer


def layer_step(layer, x, grad):
    import torch
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x, torch.arange(x.size(1), device=x.device)).backward(grad)


def layer_inputs(a, device="cpu"):
    import torch
    torch.manual_seed(1)
    x = torch.randn(a["batch"], a["T"], a["n_embd"], device=device, requires_grad=True)
    return x, torch.randn_like(x)


def worker_layer_mem(a):
    """One configuration, one forward + backward: the RSS it adds (not for a compiled layer, whose first step's
    peak is the compiler's)."""
    layer = make_layer(a, a["pe"], a["impl"])
    x, grad = layer_inputs(a)
    before = rss_mb()
    t0 = time.perf_counter()
    layer_step(layer, x, grad)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    return dict(mem=max(peak - before, 0.0), peak_rss=peak, rss_before=before, first_step=seconds)


def worker_layer_time(a):
    """All configurations of one T in one process; one warm-up round, then a["rounds"] interleaved rounds."""
    layers = {f"{pe}/{impl}": make_layer(a, pe, impl) for pe, impl in a["configs"]}
    x, grad = layer_inputs(a)
    steps = {key: (lambda layer=layer: layer_step(layer, x, grad)) for key, layer in layers.items()}
    return interleaved_rounds(steps, a["rounds"], f"layer T={a['T']}")


def interleaved_rounds(steps, rounds, label):
    """Time each of `steps` (name -> callable) once per round, the names interleaved so that a slow phase of the
    machine hits all of them alike; round 0 is a warm-up. Returns name -> median time and the timed rounds."""
    times = {key: [] for key in steps}
    for r in range(1 + rounds):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r:
                times[key].append(time.perf_counter() - t0)
        progress(f"  {label}: round {r}/{rounds}")
    return {key: dict(time=statistics.median(ts), times=ts) for key, ts in times.items()}


def make_model(pe, T, shape):
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape, block_size=T, pos_encoding=pe)).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def train_step(model, opt, idx):
    opt.zero_grad(set_to_none=True)
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    opt.step()
    return loss.item()


def worker_model(a):
    """All PEs in one process; one warm-up round, then a["rounds"] interleaved rounds; median step time."""
    import torch
    torch.manual_seed(0)
    idx = torch.randint(0, a["shape"]["vocab_size"], (a["batch"], a["T"] + 1))
    models = {pe: make_model(pe, a["T"], a["shape"]) for pe in a["pes"]}
    steps = {pe: (lambda m=model, o=opt: train_step(m, o, idx)) for pe, (model, opt) in models.items()}
    return interleaved_rounds(steps, a["rounds"], f"model T={a['T']}")


def worker_long(a):
    """The tiny model trains a few steps at long context; the peak RSS of the whole process."""
    import torch
    model, opt = make_model(a["pe"], a["T"], a["shape"])
    torch.manual_seed(0)
    idx = torch.randint(0, a["shape"]["vocab_size"], (a["batch"], a["T"] + 1))
    losses, times = [], []
    for _ in range(a["steps"]):
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, idx))
        times.append(time.perf_counter() - t0)
    return dict(losses=losses, time=statistics.median(times), peak_rss=peak_rss_mb(),
                finite=all(abs(v) < float("inf") for v in losses))


WORKERS = {"layer_mem": worker_layer_mem, "layer_time": worker_layer_time, "model": worker_model,
           "long": worker_long}


def run_worker(kind, spec, threads):
    """One measurement in a fresh Python process; its JSON result, or {"error": ...}."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # stderr passes through (the workers' progress lines); stdout carries the result
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--worker", kind, json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return dict(error=f"worker exited with status {proc.returncode} (out of memory?)")


# ---------------------------------------------------------------------------------------------------------- tables


def ratio(value, base):
    return f"{value / base:.2f}x" if base else "–"


def layer_table(rows, seqlens, impls=("chunked", "dense")):
    head = " | ".join(f"T={T} s | x RoPE | T={T} MB | x RoPE" for T in seqlens)
    lines = [f"| PE | path | {head} |", "|---|---|" + "---|" * (4 * len(seqlens))]
    find = {(r["pe"], r["impl"], r["T"]): r for r in rows}
    for pe in PES:
        for impl in impls:
            if not any((pe, impl, T) in find for T in seqlens):
                continue
            cells = []
            for T in seqlens:
                r, base = find.get((pe, impl, T)), find.get(("rope", "chunked", T))
                if r is None:
                    cells += ["–"] * 4
                    continue
                t, m = r.get("time"), r.get("mem")
                cells += [f"{t:.3f}" if t else r.get("error", "–")[:40],
                          ratio(t, base and base.get("time")) if t else "–",
                          f"{m:.0f}" if m is not None else r.get("mem_error", "–")[:40],
                          ratio(m, base and base.get("mem")) if m is not None else "–"]
            path = ("causal SDPA" + impl[len(split_impl(impl)[0]):]) if pe in ("rope", "nope") else impl
            lines.append(f"| {pe} | {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(results):
    cols = list(results)
    lines = ["| PE | " + " | ".join(f"{c}: s | x RoPE" for c in cols) + " |", "|---|" + "---|---|" * len(cols)]
    for pe in PES:
        cells = []
        for c in cols:
            r, base = results[c].get(pe), results[c].get("rope")
            cells += ["–", "–"] if r is None else [f"{r['time']:.3f}", ratio(r["time"], base and base["time"])]
        lines.append(f"| {pe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_table(rows):
    lines = ["| PE | T | batch | steps | peak RSS MB | x RoPE | step s | losses |", "|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["pe"] == "rope" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pe']} | {r['T']} | {r['batch']} | – | {r['error']} | – | – | – |")
            continue
        losses = ", ".join(f"{v:.3f}" for v in r["losses"])
        lines.append(f"| {r['pe']} | {r['T']} | {r['batch']} | {len(r['losses'])} | {r['peak_rss']:.0f} | "
                     f"{ratio(r['peak_rss'], base and base['peak_rss'])} | {r['time']:.2f} | {losses} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--full", action="store_true",
                   help="dense path up to 4096, more tiny-model sizes, 3 rounds")
    p.add_argument("--pes", default=",".join(PES))
    p.add_argument("--seqlens", help="layer T values (default 1024,2048,4096,8192)")
    p.add_argument("--dense-seqlens", help="dense-path T values (default 1024,2048; --full: 1024,2048,4096)")
    p.add_argument("--chunk", type=int, help="attn_chunk_size (default: GPTConfig's)")
    p.add_argument("--impls", default="chunked,dense",
                   help="the layer table's paths for the additive PEs: attn_impl values (auto, chunked, dense, flex), "
                        "each optionally +compile (the layer under torch.compile, the chunked Function traced into "
                        "its graph; time only). dense runs at --dense-seqlens, the others at --seqlens; RoPE and "
                        "NoPE run as causal SDPA, eager and (if any path is compiled) compiled")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, help="timed interleaved rounds, layer and model (default 2; --full: 3)")
    p.add_argument("--models", help="shape:T,... of the model table (default tiny:256,tiny_v512:1024; --full: "
                                    "tiny:256,tiny:1024,tiny_v512:1024,tiny_v512:2048)")
    p.add_argument("--model-tokens", type=int, default=2048, help="tokens per model step (batch = this / T)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: torch's default)")
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--long", action="store_true", help="only the long-context training check of every additive PE")
    p.add_argument("--long-T", type=int, default=8192)
    p.add_argument("--long-steps", type=int, default=3)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        kind, spec = args.worker
        print("RESULT " + json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
        return

    import torch
    from model import GPTConfig
    chunk = args.chunk or GPTConfig.attn_chunk_size
    pes = args.pes.split(",")
    ints = lambda s: [int(v) for v in s.split(",")]
    seqlens = ints(args.seqlens) if args.seqlens else [1024, 2048, 4096, 8192]
    dense_seqlens = ints(args.dense_seqlens) if args.dense_seqlens else [1024, 2048, 4096] if args.full else [1024, 2048]
    models = args.models or ("tiny:256,tiny:1024,tiny_v512:1024,tiny_v512:2048" if args.full
                             else "tiny:256,tiny_v512:1024")
    args.rounds = args.rounds or (3 if args.full else 2)
    models = [(m.split(":")[0], int(m.split(":")[1])) for m in models.split(",")]
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                python=platform.python_version(), cpus=os.cpu_count(), threads=args.threads or torch.get_num_threads(),
                command="python -m scripts.bench_attention " + " ".join(sys.argv[1:]),
                layer=dict(batch=args.batch, n_embd=args.n_embd, n_head=args.n_head, head_dim=args.head_dim,
                           chunk=chunk, rounds=args.rounds),
                model=dict(shapes=MODEL_SHAPES, tokens_per_step=args.model_tokens, rounds=args.rounds, chunk=chunk))
    out = dict(meta=meta, layer=[], model={}, long=[])
    sections = []

    if args.long:
        for pe in ["rope"] + [pe for pe in pes if pe in ADDITIVE]:
            spec = dict(pe=pe, T=args.long_T, batch=1, steps=args.long_steps, shape=MODEL_SHAPES["tiny"])
            t0 = time.time()
            r = {**spec, **run_worker("long", spec, args.threads)}
            r.pop("shape")
            progress(f"long {pe} T={args.long_T}: " + (r.get("error") or f"peak {r['peak_rss']:.0f} MB, "
                     f"{r['time']:.1f} s/step, losses {[round(v, 3) for v in r['losses']]}")
                     + f" ({time.time() - t0:.0f} s)")
            out["long"].append(r)
        sections.append(f"configs/tiny model ({MODEL_SHAPES['tiny']}) trained {args.long_steps} steps at "
                        f"T={args.long_T}, batch 1, AdamW, chunked attention (chunk {chunk}); peak RSS of the "
                        f"whole process:\n\n" + long_table(out["long"]))
    else:
        if not args.skip_layer:
            shape = dict(chunk=chunk, batch=args.batch, n_embd=args.n_embd, n_head=args.n_head,
                         head_dim=args.head_dim)
            impls = args.impls.split(",")
            for impl in impls:
                split_impl(impl)
            sdpa = ["chunked"] + (["chunked+compile"] if any(split_impl(i)[1] for i in impls) else [])
            table_impls = list(dict.fromkeys(impls + sdpa))
            for T in sorted(set(seqlens) | set(dense_seqlens)):
                configs = [(pe, impl) for impl in table_impls for pe in pes
                           if (impl in impls if pe in ADDITIVE else impl in sdpa)
                           and T in (dense_seqlens if split_impl(impl)[0] == "dense" else seqlens)]
                rows = [dict(pe=pe, impl=impl, T=T) for pe, impl in configs]
                for n, row in enumerate(rows, 1):
                    if split_impl(row["impl"])[1]:
                        row["mem_skipped"] = "compiled: not measured"
                        continue
                    t0 = time.time()
                    r = run_worker("layer_mem", dict(shape, pe=row["pe"], impl=row["impl"], T=T), args.threads)
                    if "error" in r:
                        row["mem_error"] = r["error"]
                    else:
                        row.update(r)
                    progress(f"[T={T} {n}/{len(rows)}] memory {row['pe']}/{row['impl']}: "
                             + (row.get("mem_error") or f"+{row['mem']:.0f} MB") + f" ({time.time() - t0:.0f} s)")
                ok = [(r["pe"], r["impl"]) for r in rows if "mem_error" not in r]  # fits in memory
                progress(f"[T={T}] timing {len(ok)} layers ...")
                times = run_worker("layer_time", dict(shape, T=T, configs=ok, rounds=args.rounds), args.threads)
                for row in rows:
                    t = times.get(f"{row['pe']}/{row['impl']}")
                    if t:
                        row.update(t)
                    elif "error" in times:
                        row["error"] = times["error"]
                out["layer"] += rows
            sections.append(
                f"Attention layer, forward + backward: batch {args.batch}, n_embd {args.n_embd}, {args.n_head} heads "
                f"of {args.head_dim}, chunk {chunk}. s = median of {args.rounds} interleaved rounds; MB = peak RSS "
                f"added by one forward + backward in a fresh process (not measured for a compiled layer).\n\n"
                + layer_table(out["layer"], seqlens, table_impls))
        if not args.skip_model:
            for shape_name, T in models:
                spec = dict(pes=pes, T=T, batch=max(1, args.model_tokens // T), rounds=args.rounds,
                            shape=MODEL_SHAPES[shape_name])
                progress(f"model {shape_name} T={T} batch {spec['batch']} ...")
                r = run_worker("model", spec, args.threads)
                if "error" in r:
                    progress("  " + r["error"])
                    continue
                out["model"][f"{shape_name} T={T} B={spec['batch']}"] = r
            shapes = "; ".join(f"{k} = {v}" for k, v in MODEL_SHAPES.items())
            sections.append(f"Tiny-model training step (forward + backward + AdamW, the default attn_impl, chunk {chunk}; "
                            f"{shapes}); median of {args.rounds} interleaved rounds, s per step:\n\n"
                            + model_table(out["model"]))

    text = (f"{meta['date']}, torch {meta['torch']}, {meta['cpus']} CPUs, {meta['threads']} threads\n"
            f"`{meta['command']}`\n\n" + "\n\n".join(sections))
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
