#!/usr/bin/env bash
# The README's main job, offline apart from PyPI: does a positional encoding keep its loss beyond the length it was
# trained at? Tokenizes the embedded real-text sample as UTF-8 bytes, trains a tiny model per encoding (RoPE, ALiBi,
# FoX, GRAPE-AP; two seeds each; configs/sweeps/quickstart.toml) on the CPU or a GPU, evaluates each at 1x-8x its
# training length, then prints the tables and what they show, and writes them with the plots to
# out/quickstart/report/.
#   bash scripts/quickstart.sh
#   bash scripts/quickstart.sh --only 'tiny_rope_*'      # further arguments go to scripts/sweep.py
# Re-running skips finished runs and resumes unfinished ones; every report gets a new file name.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=configs/sweeps/quickstart.toml

python -m data.fineweb_edu --sample --tokenizer bytes --no-progress
python -m scripts.sweep "$SPEC" --local "$@"
python -m scripts.report --sweep "$SPEC" --out out/quickstart/report
