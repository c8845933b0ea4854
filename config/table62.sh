#!/usr/bin/env bash
# Table 6.2, re-measured: psu_lambda in {0, 0.05, 0.2} x seeds {2025, 2026, 2027} for GPT-2 and
# BERT at seed 2026, on the embedded synthetic corpus and on a real text, then the table.
#   bash config/table62.sh [TEXT_FILE] [--gpu] [extra train.py flags...]
#   LAUNCH='torchrun --standalone --nproc_per_node=8' bash config/table62.sh FILE --gpu --size=gpt2-1b \
#       --learning_rate=2e-4 --fsdp=True     # the paper's scale (see config/table62_gpu.py)
# TEXT_FILE defaults to ../shared/data/tinyshakespeare.txt when it exists (real text is tokenized
# by characters at CPU scale, GPT-2 BPE with --gpu). --gpu adds config/table62_gpu.py.
# The PSU channel ablation at lambda=0.2 (stats only, params only) runs on the synthetic corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
text=../shared/data/tinyshakespeare.txt
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then text=$1; shift; fi
scale=(config/table62.py) text_tok=--tokenizer=char out=out-table62
if [ "${1:-}" = --gpu ]; then scale+=(config/table62_gpu.py) text_tok=--tokenizer=gpt2-compact out=out-table62-gpu; shift; fi
[ -f "$text" ] || echo "no text file at $text: synthetic corpus only"

run() {  # run NAME flags...: skip runs that already finished, so the sweep can be resumed
  local dir=$out/$1; shift
  [ -f "$dir/report.json" ] && return
  ${LAUNCH:-python} train.py "${scale[@]}" --out_dir="$dir" --overwrite=True "$@" "${extra[@]}"  # an interrupted run restarts
}
extra=("$@")
table() {  # table NAME flags...: GPT at three seeds and BERT at seed 2026, each lambda
  local name=$1; shift
  for lam in 0.0 0.05 0.2; do
    for seed in 2025 2026 2027; do
      run "$name/gpt-s$seed-l$lam" "$@" --model=gpt --seed=$seed --psu_lambda=$lam
    done
    run "$name/bert-s2026-l$lam" "$@" --model=bert --seed=2026 --psu_lambda=$lam
  done
}
table synthetic --data=synthetic
for channels in stats params; do
  run "synthetic/gpt-s2026-l0.2-$channels" --data=synthetic --model=gpt --seed=2026 --psu_lambda=0.2 --psu_channels=$channels
done
[ -f "$text" ] && table "$(basename "${text%.*}")" --data="$text" "$text_tok"
python tables.py "$out"/*/*
