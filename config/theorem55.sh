#!/usr/bin/env bash
# Theorem 5.5 measured literally, on the rich synthetic corpus of config/theorem55.py, seed 2026:
#   training-set size {2k, 20k, 150k sentences} x (lambda=0, and lambda {0.05, 0.2} x PSU channel
#   {stats, params}), lambda=0 trained 4x longer on 20k sentences (to memorise), and three classical
#   stabilisers at lambda=0 on 150k sentences (gradient clipping 0.1, weight decay 1.0, a tenfold
#   smaller learning rate); then the Theorem 5.5 table and the stability-vs-quality map.
#   bash config/theorem55.sh [extra train.py flags...]
# Runs go to out-theorem55/<name>/; finished runs are skipped, so the sweep can be resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out-theorem55
extra=("$@")

run() {  # run NAME flags...
  local dir=$out/$1; shift
  [ -f "$dir/report.json" ] && return
  python train.py config/table62.py config/theorem55.py --out_dir="$dir" --overwrite=True "$@" "${extra[@]}"
}
for n in 2000 20000 150000; do
  run n$n-l0 --n_sentences=$n
  for lam in 0.05 0.2; do
    for channels in stats params; do
      run n$n-l$lam-$channels --n_sentences=$n --psu_lambda=$lam --psu_channels=$channels
    done
  done
done
run n20000-l0-long --n_sentences=20000 --max_iters=2400 --lr_decay_iters=2400
run n150000-l0-clip0.1 --n_sentences=150000 --grad_clip=0.1
run n150000-l0-wd1.0 --n_sentences=150000 --weight_decay=1.0
run n150000-l0-lr3e-4 --n_sentences=150000 --learning_rate=3e-4 --min_lr=3e-5
python tables.py --theorem55 "$out"/*
python tables.py --map "$out"/* --out=assets/stability_map.png
