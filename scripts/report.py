"""
Collect train.py runs into tables and plots:

    python -m scripts.report RUN_DIR [RUN_DIR ...] [--sweep SPEC] [--out DIR]

Reads each run's config.json, metrics.jsonl and eval/ outputs (sweeps/results.py) and prints, in markdown:
  * a table of the runs: positional encoding, steps, tokens, the last logged training loss and validation loss;
  * the paper's table layout (sweeps/tables.py): rows = PE (+ KV-shift), one table per model shape, zero-shot
    accuracy on ARC-E, ARC-C, HellaSwag, OBQA, PIQA, WinoGrande, SciQ and Avg. when zero-shot results exist, the
    validation loss and the extrapolation loss at each length when present; runs that differ only in seed are one
    row (mean ± sample std), the best of each column in bold; only finished runs (trained to their last step) count.
--sweep SPEC adds the runs of a sweep spec (configs/sweeps/*.toml) whose directories exist.
--out DIR also writes the markdown as DIR/report_<UTC time>.md with the figures next to it (<stem>_loss.png:
training and validation loss vs tokens, one line per PE; <stem>_extrapolation.png: loss vs length, when
extrapolation results exist). As in eval/, nothing is overwritten: a name in use gets _1, _2, ... appended.
"""

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.report ...")

from errors import UserError, exit_status  # noqa: E402
from eval.command import unique_stem  # noqa: E402
from sweeps import plots, tables  # noqa: E402
from sweeps.results import group_runs, read_run  # noqa: E402


def run_row(result):
    config, train, val = result.config, result.train[-1] if result.train else None, result.val
    return dict(run=result.name, pe=config["pos_encoding"] + (" + kv_shift" if config["kv_shift"] else ""),
                step=train["step"] if train else 0, tokens=train["tokens"] if train else 0,
                train_loss=train["loss"] if train else float("nan"),
                val_loss=val[-1]["val_loss"] if val else float("nan"))


def markdown_table(rows):
    lines = ["| run | positional encoding | steps | tokens | train loss | val loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['pe']} | {r['step']} | {r['tokens']:,} | {r['train_loss']:.4f} | "
              f"{r['val_loss']:.4f} |" for r in rows]
    return "\n".join(lines)


def sweep_run_dirs(spec_path):
    from sweeps.spec import load_spec

    spec = load_spec(spec_path)
    return [r.out_dir for r in spec.runs if (r.out_dir / "metrics.jsonl").is_file()]


def write_report(text, groups, out_dir):
    """DIR/report_<time>[_k].md plus its figures, under a name no existing file has; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffixes = (".md", "_loss.png", "_extrapolation.png")
    stem = unique_stem(out_dir, "report_" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()), suffixes)
    names = tables.labels(groups, with_shape=True)
    paths = [Path(f"{stem}.md")]
    paths[0].write_text(text)
    plots.loss_curves(groups, names, f"{stem}_loss.png")
    paths.append(Path(f"{stem}_loss.png"))
    if plots.extrapolation(groups, names, f"{stem}_extrapolation.png"):
        paths.append(Path(f"{stem}_extrapolation.png"))
    return paths


class ReportError(UserError, ValueError):
    """No run to report, or a run directory whose files cannot be read."""


def main(argv=None):
    """Exit status 0, or 2 with one error line for missing or unreadable runs (errors.exit_status)."""
    return exit_status(_main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m scripts.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories (train.py out_dir)")
    parser.add_argument("--sweep", default=None, metavar="SPEC", help="add the started runs of this sweep spec")
    parser.add_argument("--out", default=None, metavar="DIR", help="write the report and its figures here")
    args = parser.parse_args(argv)
    dirs = list(args.runs)
    try:
        if args.sweep:
            dirs += [str(d) for d in sweep_run_dirs(args.sweep) if str(d) not in dirs]
        if not dirs:
            raise FileNotFoundError("no run directories given" + (f" and none of {args.sweep}'s runs has started"
                                                                  if args.sweep else ""))
        results = [read_run(d) for d in dirs]
    except (FileNotFoundError, ValueError) as e:  # a missing file, or one whose content is not what was expected
        raise ReportError(str(e)) from None
    # only finished runs enter the aggregated tables: a mean over runs at different steps would compare nothing
    groups = group_runs([r for r in results if r.finished])
    unfinished = [r.name for r in results if not r.finished]
    parts = ["## Runs", markdown_table([run_row(r) for r in results])]
    if unfinished:
        parts.append(f"Not finished, so not in the tables below: {', '.join(unfinished)}.")
    text = "\n\n".join(parts + ([tables.markdown(groups)] if groups else []))
    print(text)
    if args.out:
        for path in write_report(text, groups, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
