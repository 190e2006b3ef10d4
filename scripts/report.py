"""
Collect finished runs into a table: python scripts/report.py RUN_DIR [RUN_DIR ...]

Reads each run's config.json and metrics.jsonl (written by train.py) and prints a markdown table with the
positional encoding, steps, tokens, the last logged training loss and the last validation loss.
"""

import argparse
import json
import sys
from pathlib import Path


def read_run(run_dir):
    run_dir = Path(run_dir)
    config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.jsonl"
    for f in (config_file, metrics_file):
        if not f.is_file():
            raise FileNotFoundError(f"{run_dir} is not a train.py run directory: {f.name} is missing")
    config = json.loads(config_file.read_text())
    train, val = None, None
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "train":
            train = record
        elif record.get("event") == "val":
            val = record
    return dict(run=run_dir.name, pe=config["pos_encoding"] + (" + kv_shift" if config["kv_shift"] else ""),
                step=train["step"] if train else 0, tokens=train["tokens"] if train else 0,
                train_loss=train["loss"] if train else float("nan"),
                val_loss=val["val_loss"] if val else float("nan"))


def markdown_table(rows):
    lines = ["| run | positional encoding | steps | tokens | train loss | val loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['pe']} | {r['step']} | {r['tokens']:,} | {r['train_loss']:.4f} | "
              f"{r['val_loss']:.4f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (train.py out_dir)")
    args = parser.parse_args(argv)
    try:
        rows = [read_run(r) for r in args.runs]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
