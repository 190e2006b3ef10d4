"""
The checks and measurements of attn_impl="auto" that need a GPU, in one command for one GPU, within a time limit:

    python -m scripts.gpu_check OUT_DIR                  # a CUDA machine; at most --minutes (8)
    python -m scripts.gpu_check OUT_DIR --dry-run        # a CPU: the same code, tiny shapes, well under a minute

(a) correctness: each additive PE's attention layer (and a composition, grape_m+fox) on every fused path it has
    here (attn_impl="auto"'s choice, and FlexAttention for FoX when auto took fla) and on the chunked path, in fp32
    and under bf16 autocast, against the chunked path in fp64: the output, the gradient of the input and of every
    parameter. err = max |x - x_fp64| / max(1, max |x_fp64|), per tensor. A fused path passes where, for every
    tensor, err_fused <= 2 err_chunked + floor, floor 2e-3 in fp32 (the fused kernels' Triton dots round fp32
    operands to TF32, which the chunked reference does not) and 1e-2 in bf16: the fused path is as close to the
    exact result as the reference path at the same precision.
(b) the attention layer (CausalSelfAttention: projections, PE, attention, output), forward + backward under bf16
    autocast, D = 128, at T = 4096 and 8192 (16,384 tokens per step): median time of interleaved rounds and peak
    memory above the inputs, for RoPE on SDPA's flash kernel (the baseline of every ratio), NoPE, and each additive
    PE on "auto" and "chunked" (timing code: scripts/bench_attention.py).
(c) the medium model (configs/medium/<pe>.toml: 24 layers, T = 4096) trained as train.py does (per-block
    torch.compile, bf16 autocast, fused AdamW, no gradient clipping), at the largest micro-batch the memory planner
    (memory_plan.py) says fits the free memory, one smaller where that runs out of memory: tokens/s, MFU (mfu.py)
    and peak memory per PE.
Every item is skipped, and listed as skipped, when the time left is below its expected cost; a watchdog writes what
exists and stops the process at the limit. Results: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (the tables, also
printed); an existing result is not replaced without --force. Needs torch (2.11 or later) with its Triton and, for
FoX's fla path, fla-core (requirements.txt; without it FoX runs on FlexAttention); nothing is downloaded.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.gpu_check ...")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import fused_attention  # noqa: E402
import mfu  # noqa: E402
import model  # noqa: E402
from config import load_config  # noqa: E402
from device import autocast_context  # noqa: E402
from errors import UserError, exit_status  # noqa: E402
from memory_plan import available_bytes, gib, largest_micro_batch  # noqa: E402
from scripts import bench_attention as bench  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULT_FILES = ("gpu_check.json", "gpu_check.md")
ADDITIVE = ["alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
CHECKED = ADDITIVE + ["grape_m+fox", "grape_m+grape_ap"]
LAYER_PES = ["rope", "nope"] + ADDITIVE
MODEL_PES = ["rope", "fox", "alibi", "grape_a_qk", "grape_ap", "grape_a_q", "grape_a_k"]  # the order (c) runs in
FLOOR = {"float32": 2e-3, "bfloat16": 1e-2}
SHARES = {"correctness": 0.3, "layer": 0.3}  # of the time limit, plus what earlier sections left; (c) the rest
# The sizes of a real run and of a dry run, and a guess of one item's cost per section (s) until the first one is
# measured (GPU: guesses, not measured here). Dry run: 1-2 layers, T = 128 (a correctness length of 100 pads
# FlexAttention to 128).
MODES = {
    "gpu": dict(layer=dict(n_embd=1024, n_head=8, head_dim=128, chunk=128), check_T=1000, check_batch=2,
                layer_T=(4096, 8192), layer_tokens=16384, rounds=3, model_overrides=[],
                micro_candidates=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24, 30, 32, 40, 48, 60), warmup=2,
                steps=3, cost=dict(correctness=25, layer=20, model=100)),
    "dry": dict(layer=dict(n_embd=64, n_head=4, head_dim=16, chunk=32), check_T=100, check_batch=2,
                layer_T=(128,), layer_tokens=128, rounds=1,
                model_overrides=["--n_layer=2", "--n_embd=64", "--n_head=4", "--head_dim=16", "--block_size=128",
                                 "--vocab_size=512", "--global_batch_size=2", "--device=cpu"],
                micro_candidates=(1, 2), warmup=1, steps=1, cost=dict(correctness=2, layer=1, model=10)),
}


class GpuCheckError(UserError):
    """A command line or output directory gpu_check cannot use; the message names it."""


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


class Budget:
    """The time left, per section and in all, and the record of what was skipped for lack of it. A section may use
    its share of the whole (SHARES) plus what earlier sections left unused, so that each gets some time; an item is
    started only if the time left is at least its expected cost: the longest item of its section so far, or the
    mode's guess before the first."""

    def __init__(self, seconds, guesses, results):
        self.seconds, self.start, self.guesses, self.results = seconds, time.monotonic(), guesses, results
        self.longest, self.section_end = {}, None

    def left(self):
        return self.seconds - (time.monotonic() - self.start)

    def open(self, section, share):
        """Start a section that may use `share` of the whole budget beyond what earlier ones used."""
        used = time.monotonic() - self.start
        self.section_end = min(self.seconds, max(used, self.section_end or 0.0) + share * self.seconds)

    def run(self, section, item, fn):
        """fn() if there is time for it (its result), else None, recorded as skipped."""
        cost = self.longest.get(section, self.guesses[section])
        left = min(self.left(), (self.section_end or self.seconds) - (time.monotonic() - self.start))
        if left < cost:
            reason = f"{max(left, 0):.0f} s left for {section}, ~{cost:.0f} s needed"
            self.results["skipped"].append(dict(section=section, item=item, reason=reason))
            progress(f"skip {section} {item}: {reason}")
            return None
        t0 = time.monotonic()
        out = fn()
        self.longest[section] = max(self.longest.get(section, 0.0), time.monotonic() - t0)
        return out


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def auto_path(pe, device, dtype, head_dim, T):
    """The path attn_impl="auto" takes for pe's attention here, and why not a fused one (model.attention_path)."""
    additive = model.split_pos_encoding(pe)[1]
    if additive is None:
        return "sdpa", None
    return model.attention_path("auto", model.PE_CLASSES[additive].fused, device.type, dtype, head_dim, T, T)


# ---------------------------------------------------------------------------------------------- (a) correctness


def layer_tensors(layer, x, cotangent, amp):
    """{"output", "grad x", parameter name: gradient} of one forward + backward, in fp64 for comparison."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with amp:
        y = layer(x, torch.arange(x.size(1), device=x.device))
    (y.to(cotangent.dtype) * cotangent).sum().backward()
    out = {"output": y.detach(), "grad x": x.grad}
    out.update((n, p.grad) for n, p in layer.named_parameters() if p.grad is not None)
    return {n: t.detach().double() for n, t in out.items()}


def errors_against(result, ref):
    return {n: (result[n] - ref[n]).abs().max().item() / max(1.0, ref[n].abs().max().item()) for n in ref}


def check_pe(pe, mode, device):
    """Every fused path of pe's attention against the chunked one, fp32 and bf16, both against fp64 (docstring)."""
    shape = mode["layer"]
    a = dict(shape, T=mode["check_T"], batch=mode["check_batch"])
    layer = bench.make_layer(a, pe, "chunked", device)
    with torch.no_grad():  # move the PE's parameters off their init (GRAPE-M's spectrum equals RoPE's there)
        for name, p in layer.named_parameters():
            if "additive" in name or "rotary" in name:
                p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(a["batch"], a["T"], shape["n_embd"], generator=gen).to(device)
    cotangent = torch.randn(a["batch"], a["T"], shape["n_embd"], generator=gen).to(device).double()
    ref = layer_tensors(copy.deepcopy(layer).double(), x.double(), cotangent, nullcontext())
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        amp = autocast_context(device, "bfloat16") if dtype_name == "bfloat16" else nullcontext()
        dtype = getattr(torch, dtype_name)
        layer.attn_impl = "chunked"
        chunked = errors_against(layer_tensors(layer, x, cotangent, amp), ref)
        path, why = auto_path(pe, device, dtype, shape["head_dim"], a["T"])
        impls = [("auto", path)] + ([("flex", "flex")] if path == "fla" else [])
        for impl, taken in impls:
            layer.attn_impl = impl
            row = dict(pe=pe, dtype=dtype_name, impl=impl, path=taken, why=why, T=a["T"])
            try:
                fused = errors_against(layer_tensors(layer, x, cotangent, amp), ref)
            except Exception as e:  # a kernel that fails here is a finding, not the end of the check
                row.update(error=f"{type(e).__name__}: {e}"[:500], passed=False)
                rows.append(row)
                continue
            floor = FLOOR[dtype_name]
            worst = max(fused, key=lambda n: fused[n] - 2 * chunked[n])
            row.update(err=max(fused.values()), err_chunked=max(chunked.values()), worst=worst,
                       passed=all(fused[n] <= 2 * chunked[n] + floor for n in fused), errors=fused,
                       errors_chunked=chunked)
            rows.append(row)
            progress(f"  {pe} {dtype_name} {impl} ({taken}): err {row['err']:.2e}, chunked {row['err_chunked']:.2e}"
                     f" -> {'pass' if row['passed'] else 'FAIL'}")
    return rows


# ------------------------------------------------------------------------------------------------- (b) the layer


def memory_step(step, device):
    """Peak memory (bytes) one call of step() adds above what is allocated before it; None off CUDA."""
    if device.type != "cuda":
        step()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def layer_configs(pe, device, head_dim, T):
    """[(key, attn_impl)] of the layer table for pe: RoPE and NoPE once (SDPA), an additive PE on auto and
    chunked, FoX also on FlexAttention where auto takes fla."""
    if pe in ("rope", "nope"):
        return [(pe, "chunked")]
    path, _ = auto_path(pe, device, torch.bfloat16, head_dim, T)
    impls = ["auto", "chunked"] + (["flex"] if path == "fla" else [])
    return [(f"{pe}/{impl}", impl) for impl in impls]


def time_layers(T, mode, device, budget, pes):
    shape = mode["layer"]
    a = dict(shape, T=T, batch=max(1, mode["layer_tokens"] // T))
    amp = autocast_context(device, "bfloat16")
    x, grad = bench.layer_inputs(a, device)
    rows, steps = [], {}
    for pe in pes:
        for key, impl in layer_configs(pe, device, shape["head_dim"], T):
            row = dict(pe=pe, impl=impl, T=T, batch=a["batch"],
                       path=auto_path(pe, device, torch.bfloat16, shape["head_dim"], T)[0] if impl == "auto"
                       else ("sdpa" if pe in ("rope", "nope") else impl))

            def prepare(row=row, pe=pe, impl=impl):
                try:
                    layer = bench.make_layer(a, pe, impl, device)
                    # RoPE runs on SDPA's flash kernel, the baseline of every ratio (an error if it cannot)
                    flash = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if pe == "rope" else nullcontext

                    def step():
                        with flash(), amp:
                            bench.layer_step(layer, x, grad)
                        synchronize(device)

                    step()  # compiles FlexAttention for this shape
                    row["mem"] = memory_step(step, device)
                    steps[(pe, impl)] = step
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    progress(f"  layer {pe}/{impl} T={T}: {row['error']}")
                return row

            if budget.run("layer", f"{key} T={T}", prepare) is not None:
                rows.append(row)
    times = bench.interleaved_rounds(steps, mode["rounds"], f"layer T={T}") if steps else {}
    for row in rows:
        row.update(times.get((row["pe"], row["impl"]), {}))
    return rows


# ------------------------------------------------------------------------------------------------- (c) the model


def train_model(pe, mode, device, budget):
    """The medium config of pe trained as train.py does, at the planner's largest fitting micro-batch."""
    import parallel
    overrides = mode["model_overrides"] + ["--compile=true"]
    cfg = load_config(REPO / "configs" / "medium" / f"{pe}.toml", overrides)
    m = cfg.model
    free, source = available_bytes(device)
    best, plans = largest_micro_batch(cfg, 1, device.type, free, mode["micro_candidates"])
    row = dict(pe=pe, T=m.block_size, n_layer=m.n_layer, memory=source,
               path=auto_path(pe, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                              m.head_dim, m.block_size)[0], planner_micro_batch=best)
    if best is None:
        row["error"] = f"no micro-batch of {mode['micro_candidates']} fits {gib(free)} by the planner's estimate"
        return row
    tries = [b for b in mode["micro_candidates"] if b <= best][::-1][:2]  # the largest, then one smaller on OOM
    for micro in tries:
        torch._dynamo.reset()
        torch.manual_seed(cfg.seed)
        try:
            with torch.device(device):
                raw = model.GPT(m)
            net = parallel.wrap(raw, cfg, device, distributed=False)
            opt = torch.optim.AdamW(raw.optimizer_param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                    betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=device.type == "cuda")
            amp = autocast_context(device, cfg.dtype)
            idx = torch.randint(0, m.vocab_size, (micro, m.block_size + 1), device=device)

            def step():
                opt.zero_grad(set_to_none=True)
                with amp:
                    _, loss = net(idx[:, :-1], idx[:, 1:])
                loss.backward()
                opt.step()
                synchronize(device)
                return loss.item()

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            losses = [step() for _ in range(mode["warmup"])]
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(mode["steps"]):
                t0 = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            tok_s = micro * m.block_size / step_s
            n_params = raw.num_params()
            peak, peak_source = mfu.device_peak(device, cfg.peak_flops)
            flops = mfu.flops_per_token(n_params, m.n_layer, m.n_head, m.head_dim, m.block_size)
            row.update(micro_batch=micro, step_s=step_s, tokens_per_s=tok_s, warmup_s=compile_s, losses=losses,
                       mfu=mfu.utilisation(tok_s, flops, peak), peak_source=peak_source, n_params=n_params,
                       planner_peak=plans[micro].peak,
                       peak_memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
            row.pop("error", None)
            return row
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory at micro-batch {micro}: {str(e)[:200]}"
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            return row
        finally:
            raw = net = opt = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if budget.run("model", f"{pe} (smaller micro-batch)", lambda: True) is None:
            break
    return row


# ---------------------------------------------------------------------------------------------------- the report


def fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def markdown(results):
    env = results["environment"]
    lines = [f"# gpu_check {env['date']}", "",
             f"{env['device']}; torch {env['torch']}, triton {env['triton']}, fla-core {env['fla']}; "
             f"kernels: fla {env['fla_kernel']}, grape_ap {env['grape_ap_kernel']}; "
             f"{'dry run (CPU, tiny shapes)' if env['dry_run'] else 'full run'}, {env['elapsed_s']:.0f} s of "
             f"{env['budget_s']:.0f}", "",
             "## (a) fused paths against the chunked one (err vs fp64, relative to max(1, max |x|))", "",
             "| PE | dtype | attn_impl | path | T | err | err chunked | worst tensor | passed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["correctness"]:
        lines.append(f"| {r['pe']} | {r['dtype']} | {r['impl']} | {r['path']} | {r['T']} | "
                     f"{fmt(r.get('err'), '.2e', r.get('error', '–')[:60])} | {fmt(r.get('err_chunked'), '.2e')} | "
                     f"{r.get('worst', '–')} | {'yes' if r['passed'] else 'NO'} |")
    lines += ["", "## (b) attention layer, forward + backward, bf16 autocast (x RoPE on SDPA's flash kernel)", "",
              "| PE | attn_impl | path | T | batch | ms | x RoPE | peak MiB | x RoPE |", "|---|---|---|---|---|---|---|---|---|"]
    base = {r["T"]: r for r in results["layer"] if r["pe"] == "rope" and "time" in r}
    for r in results["layer"]:
        b = base.get(r["T"], {})
        t, m = r.get("time"), r.get("mem")
        lines.append(f"| {r['pe']} | {r['impl']} | {r['path']} | {r['T']} | {r['batch']} | "
                     f"{fmt(t and 1e3 * t, '.2f', r.get('error', '–')[:60])} | "
                     f"{bench.ratio(t, b.get('time')) if t else '–'} | {fmt(m and m / 2**20, '.0f')} | "
                     f"{bench.ratio(m, b.get('mem')) if m else '–'} |")
    lines += ["", "## (c) medium model training step (per-block compile, bf16 autocast, fused AdamW)", "",
              "| PE | path | micro-batch | tokens/s | step s | MFU | peak GiB | planner GiB | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["model"]:
        lines.append(f"| {r['pe']} | {r['path']} | {r.get('micro_batch', '–')} | {fmt(r.get('tokens_per_s'), ',.0f')}"
                     f" | {fmt(r.get('step_s'), '.3f')} | {mfu.percent(r.get('mfu'))} | "
                     f"{fmt(r.get('peak_memory') and r['peak_memory'] / 2**30, '.1f')} | "
                     f"{fmt(r.get('planner_peak') and r['planner_peak'] / 2**30, '.1f')} | {r.get('error', '')[:80]} |")
    if results["skipped"]:
        lines += ["", "## skipped (time budget)", ""]
        lines += [f"- {s['section']} {s['item']}: {s['reason']}" for s in results["skipped"]]
    if results.get("stopped"):
        lines += ["", f"**stopped at the time limit** while running: {results['stopped']}"]
    return "\n".join(lines) + "\n"


def write(out_dir, results):
    results["environment"]["elapsed_s"] = time.monotonic() - results["environment"]["_start"]
    clean = json.loads(json.dumps(results, default=str))
    clean["environment"].pop("_start", None)
    (out_dir / "gpu_check.json").write_text(json.dumps(clean, indent=1))
    text = markdown(clean)
    (out_dir / "gpu_check.md").write_text(text)
    return text


def environment(device, args, budget_s):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        from importlib.metadata import version
        fla_version = version("fla-core")
    except Exception:
        fla_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    kernel = lambda k: fused_attention.unavailable(k) or "available"
    return dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=name, torch=torch.__version__,
                triton=triton_version, fla=fla_version, fla_kernel=kernel("fla"), grape_ap_kernel=kernel("grape_ap"),
                python=platform.python_version(), dry_run=args.dry_run, budget_s=budget_s, _start=time.monotonic(),
                command="python -m scripts.gpu_check " + " ".join(sys.argv[1:]))


def _main(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dry-run", action="store_true", help="on a CPU: tiny shapes, the same code path")
    p.add_argument("--minutes", type=float, help="time limit (default 8; dry run 0.75)")
    p.add_argument("--force", action="store_true", help="replace results already in OUT_DIR")
    p.add_argument("--sections", default="correctness,layer,model", help="any of correctness,layer,model")
    p.add_argument("--pes", help="restrict every section to these PEs (comma-separated)")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if set(sections) - {"correctness", "layer", "model"}:
        raise GpuCheckError(f"--sections {args.sections!r}: expected names among correctness,layer,model")
    minutes = args.minutes if args.minutes is not None else (0.75 if args.dry_run else 8.0)
    if minutes <= 0:
        raise GpuCheckError(f"--minutes must be > 0, got {minutes}")
    if not args.dry_run and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA device here: run on a GPU node, or pass --dry-run on a CPU")
    existing = [args.out_dir / f for f in RESULT_FILES if (args.out_dir / f).exists()]
    if existing and not args.force:
        raise GpuCheckError(f"{existing[0]} exists (an earlier run's results); pass --force to replace them, or "
                            f"choose another OUT_DIR")
    only = set(args.pes.split(",")) if args.pes else None
    keep = lambda names: [n for n in names if only is None or n in only]
    args.out_dir.mkdir(parents=True, exist_ok=True)

    mode = MODES["dry" if args.dry_run else "gpu"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    budget_s = 60 * minutes - (5 if args.dry_run else 30)  # leave time to write and exit
    results = dict(correctness=[], layer=[], model=[], skipped=[])
    results["environment"] = environment(device, args, budget_s)
    budget = Budget(budget_s, mode["cost"], results)
    current = ["start-up"]

    def at_the_limit():  # the main thread is inside a kernel or a compile: write what exists and stop
        results["stopped"] = current[0]
        try:
            print(write(args.out_dir, results), flush=True)
        finally:
            os._exit(124)

    watchdog = threading.Timer(60 * minutes - 3, at_the_limit)
    watchdog.daemon = True
    watchdog.start()
    torch._dynamo.config.cache_size_limit = 64  # every PE's score_mod and shape compiles FlexAttention anew
    torch.backends.cuda.matmul.allow_tf32 = False  # (a)'s fp32 reference is fp32; (c) sets it as train.py does

    if "correctness" in sections:
        budget.open("correctness", SHARES["correctness"])
        for pe in keep(CHECKED):
            current[0] = f"correctness {pe}"
            torch._dynamo.reset()
            results["correctness"] += budget.run("correctness", pe, lambda: check_pe(pe, mode, device)) or []
    if "layer" in sections:
        budget.open("layer", SHARES["layer"])
        for T in mode["layer_T"]:
            current[0] = f"layer T={T}"
            torch._dynamo.reset()
            results["layer"] += time_layers(T, mode, device, budget, keep(LAYER_PES))
    if "model" in sections:
        budget.open("model", 1.0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for pe in keep(MODEL_PES):
            current[0] = f"model {pe}"
            r = budget.run("model", pe, lambda: train_model(pe, mode, device, budget))
            if r is not None:
                results["model"].append(r)
                progress(f"  model {pe}: " + (r.get("error") or f"micro-batch {r['micro_batch']}, "
                                              f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu.percent(r['mfu'])}"))
    watchdog.cancel()
    print(write(args.out_dir, results))
    failed = [f"{r['pe']} {r['dtype']} {r['impl']}" for r in results["correctness"] if not r["passed"]]
    if failed:
        progress(f"correctness FAILED: {', '.join(failed)}")
        return 1
    return 0


def main(argv=None):
    return exit_status(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
