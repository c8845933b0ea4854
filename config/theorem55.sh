#!/usr/bin/env bash
# Theorem 5.5 measured literally, on the rich synthetic corpus of config/theorem55.py, seed 2026:
#   training-set size {2k, 20k, 150k sentences} x (lambda=0, and lambda {0.05, 0.2} x PSU channel
#   {stats, params}), lambda=0 trained 4x longer on 2k sentences (to memorise) and on 20k (to learn
#   more), and three classical stabilisers at lambda=0 on 150k sentences (gradient clipping 0.1,
#   weight decay 1.0, a tenfold smaller learning rate); then the Theorem 5.5 table and the
#   stability-vs-quality map.
#   bash config/theorem55.sh [extra train.py flags...]
# Runs go to out-theorem55/<name>/ (log in out-theorem55/<name>.txt); finished runs are skipped, so
# the sweep can be resumed. JOBS runs at a time (default 2, one torch thread each: on 2 cores two
# one-thread runs make 1.5x the tokens/s of one two-thread run; the thread count changes a run's
# numbers by float rounding alone, about 1e-6 relative).
set -euo pipefail
cd "$(dirname "$0")/.."
out=out-theorem55
extra=("$@")
jobs=${JOBS:-2}
mkdir -p "$out"

pids=() names=()
run() {  # run NAME flags...: in the background, once fewer than JOBS runs are going
  local name=$1; shift
  [ -f "$out/$name/report.json" ] && return
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done  # a failure is reported at the end
  OMP_NUM_THREADS=$(( ($(nproc) + jobs - 1) / jobs )) python train.py config/table62.py config/theorem55.py \
    --out_dir="$out/$name" --overwrite=True "$@" "${extra[@]}" > "$out/$name.txt" 2>&1 &
  pids+=($!) names+=("$name")
}
run n2000-l0-long --n_sentences=2000 --max_iters=2400 --lr_decay_iters=2400    # the longest first
run n20000-l0-long --n_sentences=20000 --max_iters=2400 --lr_decay_iters=2400
for n in 2000 20000 150000; do
  run n$n-l0 --n_sentences=$n
  for lam in 0.05 0.2; do
    for channels in stats params; do
      run n$n-l$lam-$channels --n_sentences=$n --psu_lambda=$lam --psu_channels=$channels
    done
  done
done
run n150000-l0-clip0.1 --n_sentences=150000 --grad_clip=0.1
run n150000-l0-wd1.0 --n_sentences=150000 --weight_decay=1.0
run n150000-l0-lr3e-4 --n_sentences=150000 --learning_rate=3e-4 --min_lr=3e-5
failed=()
for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("$out/${names[$i]}.txt"); done  # each run's exit status
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: ${#failed[@]} run(s) failed, see ${failed[*]}; the finished ones are kept, rerun to redo the rest" >&2
  exit 1
fi
python tables.py --theorem55 "$out"/*/
python tables.py --map "$out"/*/ --out=assets/stability_map.png
