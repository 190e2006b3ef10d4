"""
The GRAPE paper's zero-shot evaluation: ARC-E, ARC-C, HellaSwag, OBQA, PIQA, WinoGrande, SciQ through
lm-evaluation-harness, 0-shot, one table per metric in the paper's column order.

    python -m eval.zero_shot --checkpoint out/medium_rope [--tasks paper7] [--data-dir eval/data] [--limit N]
        [--batch-size 32] [--device cuda] [--dtype float32|bfloat16] [--max-length N] [--no-prefix-eot]
        [--override key=value ...] [--out-dir DIR]

Data. With --data-dir DIR, or when eval/data holds fetched data (`python -m eval.tasks fetch`), the tasks run
offline from local JSONL through lm-eval's own task definitions (eval/tasks.py: prompts, HellaSwag preprocessing,
WinoGrande partial scoring and metrics are lm-eval's; SciQ is its validation split offline, marked "SciQ (val)").
Otherwise (--source hub) lm-eval's built-in tasks load from the Hugging Face Hub or its cache; as every entry point
here sets HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 unless they are set, export HF_HUB_OFFLINE=0
HF_DATASETS_OFFLINE=0 to download.

Metrics. The paper does not say whether it reports acc or acc_norm (lm-eval reports both for six of the seven tasks;
WinoGrande has acc only). Two tables are written: acc_norm (WinoGrande: acc) and acc; Avg. is the unweighted mean of
the columns, as in the paper. Values are percentages; the JSON also holds each standard error and sample count.

Output: <run dir>/eval/<checkpoint name>_zero_shot_<UTC time>.{json,md}, next to the checkpoint (not inside it: training
prunes old checkpoint directories) and created exclusively, so an earlier result is never overwritten.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from eval.load import CheckpointError, set_offline_defaults



def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.zero_shot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a ckpt_* directory or a run directory (its newest ckpt)")
    p.add_argument("--tasks", default="paper7", help="paper7 or a comma-separated subset, e.g. arc_easy,piqa")
    p.add_argument("--data-dir", default=None, help="fetched task data (python -m eval.tasks fetch); default "
                                                    "eval/data when present, else lm-eval's Hub tasks")
    p.add_argument("--source", choices=("auto", "local", "hub"), default="auto")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (for quick checks)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    p.add_argument("--max-length", type=int, default=None, help="default: the checkpoint's block_size")
    p.add_argument("--no-prefix-eot", action="store_true", help="do not start every context with EOT")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="GPTConfig field override at load time (repeatable)")
    p.add_argument("--out-dir", default=None, help="default: <run dir>/eval")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def choose_source(args):
    """('local', data_dir) or ('hub', None)."""
    from eval.tasks import DEFAULT_DATA_DIR

    if args.source == "hub":
        return "hub", None
    if args.data_dir is not None:
        return "local", Path(args.data_dir)
    if (DEFAULT_DATA_DIR / "splits.json").is_file():
        return "local", DEFAULT_DATA_DIR
    if args.source == "local":
        from eval.tasks import TaskDataError
        raise TaskDataError(f"--source local but no data in {DEFAULT_DATA_DIR} and no --data-dir "
                            f"(run `python -m eval.tasks fetch`)")
    return "hub", None


def run(args, lm=None):
    """Evaluate; returns the result record (also written to disk unless out_dir is False)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.lm import GrapeLM
    from eval.tasks import check_local_data, resolve_task_names, write_task_yamls

    tasks = resolve_task_names(args.tasks)
    source, data_dir = choose_source(args)
    if source == "local":
        splits = check_local_data(data_dir, tasks)
        manager = TaskManager(include_path=str(write_task_yamls(data_dir)), include_defaults=False)
        names = [t.local for t in tasks]
    else:
        splits = {t.name: t.split for t in tasks}
        manager = TaskManager()
        names = [t.name for t in tasks]
    if lm is None:
        lm = GrapeLM(checkpoint=args.checkpoint, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                     max_length=args.max_length, prefix_eot=not args.no_prefix_eot, overrides=args.override)
    started = time.time()
    try:
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=args.limit, task_manager=manager,
                              log_samples=False, random_seed=args.seed, numpy_random_seed=args.seed,
                              torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    except Exception as e:
        if source == "hub":
            raise RuntimeError(f"lm-eval could not run {names} from the Hugging Face Hub or its cache ({e}); "
                               f"fetch the data for offline use with `python -m eval.tasks fetch`, or export "
                               f"HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to download") from e
        raise
    scores = {}
    for task, name in zip(tasks, names):
        r = out["results"][name]
        entry = {"split": splits[task.name], "n": out["n-samples"][name]["effective"]}
        for metric in task.metrics:
            entry[metric] = 100.0 * r[f"{metric},none"]
            stderr = r.get(f"{metric}_stderr,none")
            entry[f"{metric}_stderr"] = 100.0 * stderr if isinstance(stderr, (int, float)) else None
        scores[task.name] = entry
    return dict(
        checkpoint=lm.info.get("path"), step=lm.info.get("step"), tokens=lm.info.get("tokens"),
        pos_encoding=lm.info["config"]["pos_encoding"], kv_shift=lm.info["config"].get("kv_shift"),
        config=lm.info["config"], overrides=lm.info.get("overrides", {}),
        source=source, data_dir=str(data_dir.resolve()) if data_dir else None, limit=args.limit, num_fewshot=0,
        max_length=lm.max_length, prefix_eot=lm.prefix_eot, dtype=lm.dtype, batch_size=lm.batch_size,
        lm_eval_version=_version("lm_eval"), seconds=round(time.time() - started, 1),
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), tasks=scores)


def _version(package):
    from importlib.metadata import version

    return version(package.replace("_", "-"))


def row_label(record):
    label = record["pos_encoding"] + (" (w/ KV-shift)" if record.get("kv_shift") else "")
    return f"{label} @ step {record['step']}" if record.get("step") is not None else label


def markdown(records):
    """The paper's tables (acc_norm with WinoGrande acc; then acc) for one or more result records."""
    from eval.tasks import TASKS

    present = [t for t in TASKS if any(t.name in r["tasks"] for r in records)]
    header = [(t.column + (" (val)" if any(r["tasks"].get(t.name, {}).get("split") not in (None, t.split)
                                            for r in records) else "")) for t in present]
    lines = []
    for metric, title in (("acc_norm", "acc_norm (WinoGrande: acc)"), ("acc", "acc")):
        lines += [f"**{title}**, 0-shot, % (± standard error)", "",
                  "| Method | " + " | ".join(header) + " | Avg. |", "|---" * (len(header) + 2) + "|"]
        for r in records:
            vals, errs = [], []
            for t in present:
                e = r["tasks"].get(t.name)
                m = metric if e is not None and metric in e else "acc"
                vals.append(None if e is None else e[m])
                errs.append(None if e is None else e.get(f"{m}_stderr"))
            got = [v for v in vals if v is not None]
            avg = sum(got) / len(got) if got else None
            fmt = lambda v: "–" if v is None else f"{v:.2f}"
            lines.append(f"| {row_label(r)} | " + " | ".join(map(fmt, vals)) + f" | {fmt(avg)} |")
            lines.append("| ± | " + " | ".join(map(fmt, errs)) + " | |")
        lines.append("")
    notes = []
    limits = {r.get("limit") for r in records}
    if limits != {None}:
        notes.append(f"first {', '.join(str(x) for x in sorted(l for l in limits if l))} examples per task "
                     f"(--limit), not the full splits")
    if any("(val)" in h for h in header):
        notes.append("(val): the validation split (the test split lm-eval uses is not available offline)")
    notes.append("Avg.: unweighted mean of the columns shown")
    return "\n".join(lines + [f"Notes: {'; '.join(notes)}.", ""])


def write_results(record, out_dir=None):
    """<out_dir or run dir/eval>/<ckpt>_zero_shot_<time>[_k].{json,md}, created exclusively (never overwritten)."""
    ckpt = Path(record["checkpoint"])
    out_dir = Path(out_dir) if out_dir else ckpt.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{ckpt.name}_zero_shot_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    for k in range(1000):
        name = stem if k == 0 else f"{stem}_{k}"
        try:
            with open(out_dir / f"{name}.json", "x") as f:
                json.dump(record, f, indent=1)
        except FileExistsError:
            continue
        (out_dir / f"{name}.md").write_text(markdown([record]))
        return out_dir / f"{name}.json", out_dir / f"{name}.md"
    raise RuntimeError(f"could not find a free result name for {stem} in {out_dir}")


def main(argv=None):
    args = parse_args(argv)
    set_offline_defaults()
    from eval.tasks import TaskDataError

    try:
        record = run(args)
    except (CheckpointError, TaskDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_results(record, args.out_dir)
    print(markdown([record]))
    print(f"wrote {json_path}\n      {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
