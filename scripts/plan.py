"""
Will a training config fit, and with which micro-batch? Printed before anything runs (memory_plan.py's estimate):

    python -m scripts.plan configs/7b/fox.toml --gpus 64 --gpu-memory 80GB
    python -m scripts.plan configs/medium/grape_ap.toml --gpus 8 --gpu-memory 141GB --set activation_checkpointing=full

For N processes of one GPU each (the device type "cuda" unless --device cpu), prints per process: the model state
(weights, gradients, AdamW moments; sharded by FSDP2 when the config says fsdp), the saved activations and the larger
backward transient for the micro-batch train.py would use (the largest divisor of global_batch_size / N not above
micro_batch_size), the estimated peak, and a table of every micro-batch that divides the per-process share with the
largest that fits; then the tokens per optimizer step. One block of the config is measured on this machine's CPU
(seconds, and about 4 bytes per parameter of one block of host memory: 0.8 GB at the 7B shape).
"""

import argparse
import sys

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.plan ...")

from config import load_config  # noqa: E402
from errors import exit_status  # noqa: E402
from eval.extrapolation import positive_int  # noqa: E402
from memory_plan import gib, largest_micro_batch, model_shape  # noqa: E402


def parse_memory(text):
    """'80GB' / '80G' / '141GiB' / '24e9' -> bytes. GB and G mean 10^9 (as GPU memory is sold), GiB 2^30."""
    units = {"gib": 2 ** 30, "gb": 10 ** 9, "g": 10 ** 9, "mib": 2 ** 20, "mb": 10 ** 6, "": 1}
    word = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if word.endswith(unit):
            try:
                value = float(word[:len(word) - len(unit)] if unit else word)
            except ValueError:
                break
            if value > 0:
                return int(value * units[unit])
            break
    raise argparse.ArgumentTypeError(f"--gpu-memory must be a positive size such as 80GB, 141GiB or 24e9, got {text!r}")


def plan(config_path, overrides, gpus, memory, device_type="cuda"):
    """The report's lines for the config with `overrides` ('--key=value') on `gpus` processes of `memory` bytes."""
    from train import micro_batch_for
    cfg = load_config(config_path, overrides)
    micro, accum = micro_batch_for(cfg, gpus)
    share = cfg.global_batch_size // gpus
    candidates = [b for b in range(1, share + 1) if share % b == 0]
    best, plans = largest_micro_batch(cfg, gpus, device_type, memory, candidates)
    m, chosen = cfg.model, plans[micro]
    layout = f"FSDP2 over {gpus}" if cfg.fsdp else f"DDP over {gpus}" if gpus > 1 else "one process"
    lines = [f"{config_path}: {m.pos_encoding}{' + kv_shift' if m.kv_shift else ''}, "
             f"{model_shape(m).params:,} parameters, T = {m.block_size}, {layout}, dtype {cfg.dtype} on {device_type}, "
             f"activation_checkpointing={cfg.activation_checkpointing}, {gib(memory)} per GPU",
             "model state per GPU: " + ", ".join(f"{k} {gib(v)}" for k, v in chosen.state_terms.items()),
             f"micro-batch {micro} x {accum} accumulation steps (micro_batch_size={cfg.micro_batch_size}): model state "
             f"{gib(chosen.state)} + saved activations {gib(chosen.saved)} + transient "
             f"{gib(max(chosen.loss_transient, chosen.block_transient))} = peak {gib(chosen.peak)} per GPU: "
             + ("fits" if chosen.peak <= memory else "DOES NOT FIT"),
             "", "| micro-batch | accumulation | activations | peak per GPU | fits |", "|---|---|---|---|---|"]
    for b, p in plans.items():
        lines.append(f"| {b} | {share // b} | {gib(p.activations)} | {gib(p.peak)} | {'yes' if p.peak <= memory else 'no'} |")
    lines.append("")
    lines.append(f"largest micro-batch that fits: {best} (--micro_batch_size={best})" if best else
                 "no micro-batch fits: use fsdp=true, activation_checkpointing=full, more GPUs or a shorter context")
    lines.append(f"tokens per optimizer step: {cfg.global_batch_size * m.block_size:,} "
                 f"({cfg.global_batch_size} sequences x {m.block_size})")
    lines.append("(an estimate: memory_plan.py says what it counts; runtime and fragmentation come on top)")
    return lines


def main(argv=None):
    return exit_status(_main, sys.argv[1:] if argv is None else argv)


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m scripts.plan", description=__doc__.strip().splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--gpus", type=positive_int, default=1, help="processes (one GPU each)")
    parser.add_argument("--gpu-memory", type=parse_memory, default=parse_memory("80GB"), help="e.g. 80GB, 141GiB")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="device type the run uses (its dtype auto: bf16 on cuda, fp32 on cpu)")
    args = parser.parse_args(argv)
    lines = plan(args.config, [f"--{kv}" for kv in args.set], args.gpus, args.gpu_memory, args.device)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
