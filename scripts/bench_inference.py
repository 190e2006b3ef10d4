"""
Inference cost per positional encoding vs sequence length: prefill latency, per-token decode latency through the KV
cache, and KV-cache memory.

    python -m scripts.bench_inference                                   # tiny model on CPU, all PEs, 256..2048
    python -m scripts.bench_inference --size medium --lengths 1024,4096,16384 --device cuda --json bench.json
    python -m scripts.bench_inference --pes rope,alibi,fox,grape_ap --kv-shift

What is measured, for each PE and each length T (randomly initialised weights: the cost does not depend on them):
    prefill   one forward of a batch of T-token prompts into an empty KV cache (best of --repeats, after a warm-up)
    decode    the mean latency of --decode-steps single-token steps that continue a T-token cache (best of
              --repeats); each step attends over ~T cached keys. Every PE pays O(T) per step for attention; the
              additive PEs also rebuild their bias row over all T keys, and GRAPE-AP's path-integral bias needs a
              fresh similarity sweep and suffix sum over the T cached key probes at every step (paper §5), which is
              what its extra growth shows
    kv cache  bytes held by the cache after the prefill: keys and values, plus the per-key PE features (FoX's
              cumulative log-gates, GRAPE-A's key gates, GRAPE-AP's rotated key probes) and running states
              (KV-shift's last projections, GRAPE-M-ctx's phase); per token and total
    peak      (CUDA only) peak allocated memory during the prefill
Sizes: tiny (configs/tiny: 4 layers, width 128) or the paper's medium / large presets. --dtype auto is bfloat16
autocast on CUDA (as in training) and float32 on CPU. On a shared CPU the timings are noisy; use --repeats.
"""

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.bench_inference ...")

from model import ADDITIVE_PES, GPT, ROTARY_PES, GPTConfig  # noqa: E402

SIZES = {"tiny": dict(n_layer=4, n_head=4, n_embd=128, head_dim=32)}
ALL_PES = ("nope",) + ROTARY_PES + ADDITIVE_PES


def cache_bytes(cache):
    """Bytes of every tensor a KVCache holds (k, v, per-key features, running states)."""
    total = 0
    for layer in cache.layers:
        tensors = [layer.k, layer.v, *layer.feats.values(), *layer.state.values()]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def bench_one(model, T, batch, decode_steps, repeats, device, amp):
    """{prefill_ms, decode_ms_per_token, kv_bytes, kv_bytes_per_token, peak_mb} for prompts of T tokens."""
    idx = torch.randint(0, 50257, (batch, T), device=device)
    step_tokens = torch.randint(0, 50257, (batch, 1), device=device)
    out = {}
    with amp:
        prefill, decode = [], []
        for r in range(repeats + 1):  # the first round warms up kernels and allocators
            cache = model.new_cache()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_pre = timed(lambda: model(idx, cache=cache), device)
            if r == 0:
                out["kv_bytes"] = cache_bytes(cache)
                if device.type == "cuda":
                    out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            t_dec = timed(lambda: [model(step_tokens, cache=cache) for _ in range(decode_steps)], device)
            if r > 0:
                prefill.append(t_pre)
                decode.append(t_dec / decode_steps)
    out["prefill_ms"] = 1e3 * min(prefill)
    out["decode_ms_per_token"] = 1e3 * min(decode)
    out["kv_bytes_per_token"] = out["kv_bytes"] / (batch * T)
    return out


def markdown(results, lengths):
    lines = []
    for key, title, fmt in (("prefill_ms", "prefill latency (ms)", "{:.1f}"),
                            ("decode_ms_per_token", "decode latency per token (ms) after a T-token prompt", "{:.2f}"),
                            ("kv_bytes", "KV cache after the prompt (MiB)", None),
                            ("peak_mb", "peak memory during prefill (MiB)", "{:.0f}")):
        if not any(key in r for row in results.values() for r in row.values()):
            continue
        lines += [f"**{title}**", "", "| PE | " + " | ".join(f"T={T}" for T in lengths) + " |",
                  "|---" * (len(lengths) + 1) + "|"]
        for pe, row in results.items():
            cells = []
            for T in lengths:
                r = row[str(T)]
                if key == "kv_bytes":
                    cells.append(f"{r['kv_bytes'] / 2**20:.2f} ({r['kv_bytes_per_token']:.0f} B/tok)")
                else:
                    cells.append(fmt.format(r[key]))
            lines.append(f"| {pe} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pes", default="all", help=f"comma-separated pos_encodings (or 'all' = {', '.join(ALL_PES)})")
    p.add_argument("--kv-shift", action="store_true", help="add KV-shift to every PE")
    p.add_argument("--size", default="tiny", choices=("tiny", "medium", "large"))
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    pes = ALL_PES if args.pes == "all" else [s.strip() for s in args.pes.split(",") if s.strip()]
    lengths = [int(x) for x in args.lengths.split(",")]
    shape = SIZES.get(args.size) or {k: v for k, v in GPTConfig.from_preset(args.size).to_dict().items()
                                     if k in ("n_layer", "n_head", "n_embd", "head_dim")}
    results = {}
    for pe in pes:
        name = pe + ("+kv_shift" if args.kv_shift else "")
        torch.manual_seed(0)
        try:
            cfg = GPTConfig(**shape, pos_encoding=pe, kv_shift=args.kv_shift, block_size=max(lengths))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with torch.device(device):
            model = GPT(cfg).eval()
        results[name] = {}
        for T in lengths:
            r = bench_one(model, T, args.batch, args.decode_steps, args.repeats, device, amp)
            results[name][str(T)] = r
            print(f"{name:16s} T={T:6d}  prefill {r['prefill_ms']:9.1f} ms  decode {r['decode_ms_per_token']:7.2f} "
                  f"ms/token  kv {r['kv_bytes'] / 2**20:8.2f} MiB", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"{args.size} model ({', '.join(f'{k}={v}' for k, v in shape.items())}), batch {args.batch}, {dtype}, "
          f"{device}, best of {args.repeats}\n")
    print(markdown(results, lengths))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(size=args.size, shape=shape, batch=args.batch, dtype=dtype,
                                                   device=str(device), decode_steps=args.decode_steps,
                                                   repeats=args.repeats, torch=torch.__version__,
                                                   results=results), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
