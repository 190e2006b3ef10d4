#!/usr/bin/env bash
# The README's main job: tokenize the embedded real-text sample, train a tiny model per positional encoding on the
# CPU (or a GPU if present), and print a table of their validation losses. Offline; a few minutes per encoding.
#   bash scripts/quickstart.sh                       # rope, alibi, grape_ap
#   PES="rope fox grape_m" STEPS=300 bash scripts/quickstart.sh
# Re-running skips finished runs and resumes unfinished ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PES="${PES:-rope alibi grape_ap}"
STEPS="${STEPS:-200}"
OUT="${OUT:-out/quickstart}"
DEVICE="${DEVICE:-auto}"

python data/fineweb_edu.py --sample --no-progress
runs=()
for pe in $PES; do
    echo "== training $pe =="
    python train.py "configs/tiny/$pe.toml" --max_steps="$STEPS" --lr_decay_steps="$STEPS" \
        --out_dir="$OUT/$pe" --device="$DEVICE"
    runs+=("$OUT/$pe")
done
python scripts/report.py "${runs[@]}"
