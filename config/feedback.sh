#!/usr/bin/env bash
# The closed loop through the data (PSU's data channel, stabilize.FedBack), measured against the
# synthetic corpus's known truth at every eval, beside PSU's other two readings:
#   - synthetic corpus, GPT: lambda {0, 0.05, 0.2} (the paper's) and {0.5, 1.0} (beyond it) x seeds
#     {2025, 2026, 2027}, the fed-back text sampled at temperature 1 and truncated (top-k 10);
#   - BERT at seed 2026 (mask-predict writes the fed-back rows), temperature 1, lambda {0, 0.2, 1};
#   - a real text (TEXT_FILE, default ../shared/data/tinyshakespeare.txt; characters), seed 2026,
#     lambda {0, 0.2, 1};
#   - config/theorem55.py's rich corpus, 20k sentences, 2,400 steps, lambda {0.2, 0, 0.05};
# (39 runs, 3 of them 4x longer: 5-8 minutes a 600-step run, two at a time on 2 cores: about 3-4
# hours; the most telling come first, so an interrupted sweep still gives the headline);
# then the table of every reading x lambda and the exact metrics' trajectories (tables.py).
#   bash config/feedback.sh [TEXT_FILE] [extra train.py flags...]
# Runs go to out-feedback/<corpus>/<name>/ (log: <name>.txt); finished runs are skipped, so the sweep
# can be resumed. JOBS runs at a time (default 2, one torch thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
text=../shared/data/tinyshakespeare.txt
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then text=$1; shift; fi
out=out-feedback extra=("$@") jobs=${JOBS:-2}
pids=() names=()
run() {  # run NAME flags...: in the background, once fewer than JOBS runs are going
  local name=$1; shift
  [ -f "$out/$name/report.json" ] && return
  mkdir -p "$(dirname "$out/$name")"
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done  # failures: reported below
  OMP_NUM_THREADS=$(( ($(nproc) + jobs - 1) / jobs )) python train.py config/table62.py \
    --out_dir="$out/$name" --overwrite=True "$@" "${extra[@]}" > "$out/$name.txt" 2>&1 &
  pids+=($!) names+=("$name")
}
gpt() {  # gpt SEED DECODER: the synthetic GPT grid over lambda at one seed and decoder
  local flags=(); [ "$2" = topk10 ] && flags=(--top_k=10)
  for lam in 0.0 0.05 0.2 0.5 1.0; do
    run "synthetic/gpt-s$1-l$lam-data-$2" --seed="$1" --psu_lambda=$lam --psu_channels=data "${flags[@]}"
  done
}
for seed in 2025 2026 2027; do gpt $seed t1; done
gpt 2026 topk10  # the decoder axis at one seed first, its other seeds after BERT and the text
for lam in 0.0 0.2 1.0; do
  run "synthetic/bert-s2026-l$lam-data-t1" --model=bert --seed=2026 --psu_lambda=$lam --psu_channels=data
done
if [ -f "$text" ]; then
  name=$(basename "${text%.*}")
  for lam in 0.0 0.2 1.0; do
    run "$name/gpt-s2026-l$lam-data-t1" --data="$text" --tokenizer=char --seed=2026 --psu_lambda=$lam \
      --psu_channels=data
  done
else
  echo "no text file at $text: synthetic corpora only"
fi
for seed in 2025 2027; do gpt $seed topk10; done
for lam in 0.2 0.0 0.05; do
  run "rich/gpt-s2026-l$lam-data-t1" config/theorem55.py --n_sentences=20000 --max_iters=2400 \
    --lr_decay_iters=2400 --psu_lambda=$lam --psu_channels=data
done
failed=()
for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("$out/${names[$i]}.txt"); done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: ${#failed[@]} run(s) failed, see ${failed[*]}; rerun to redo them" >&2
  exit 1
fi
python tables.py --readings "$out"/*/*/
python tables.py --trajectory "$out"/synthetic/gpt-s2026-*-data-t1/ --out=assets/trajectory_data.png
