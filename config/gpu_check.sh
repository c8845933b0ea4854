#!/usr/bin/env bash
# The GPU check, one command on one GPU (meant to take under 8 minutes on one H100/H200; not yet run on a GPU):
#   bash config/gpu_check.sh [TEXT_FILE]
# 1. the GPU tests: python -m pytest -q tests/test_fsdp.py
# 2. python bench.py (on CUDA it adds compile against eager, tokens/s and MFU at GPT-2 124M)
# 3. TEXT_FILE (default $TEXT, else ../shared/data/tinyshakespeare.txt) prepared once into GPT-2 BPE bins
# 4. GPT-2 124M on those bins, bf16, torch.compile, STEPS steps (config/table62_gpu.py's hyperparameters)
# 5. GPT-2 1B (gpt2-1b) with --fsdp=True under torchrun with 1 process, STEPS_1B steps
# then one summary table from the runs' log.jsonl: tokens/s, MFU, peak GPU memory, final val loss.
# Every run writes into a fresh folder under a temporary one (mktemp -d in $TMPDIR); its checkpoints
# are deleted at the end, its logs kept (KEEP=1 keeps the checkpoints too). A failed step does not stop
# the others; the exit status is 1 if any failed.
#
# Every part runs on the CPU at a tiny size too (tests/test_gpu_check.py does), with these variables:
#   SIZE_124M=gpt2 SIZE_1B=gpt2-1b STEPS=300 STEPS_1B=20 BATCH_1B=16 DEVICE=cuda DTYPE=bfloat16
#   COMPILE=True COMPILE_1B=False SKIP_TESTS=0 SKIP_BENCH=0 BENCH_FLAGS= TRAIN_FLAGS= (appended to
#   both runs' flags, so they win) DRY_RUN=1 (print the commands, run nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
text=${1:-${TEXT:-../shared/data/tinyshakespeare.txt}}
SIZE_124M=${SIZE_124M:-gpt2} SIZE_1B=${SIZE_1B:-gpt2-1b} STEPS=${STEPS:-300} STEPS_1B=${STEPS_1B:-20}
BATCH_1B=${BATCH_1B:-16} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} COMPILE=${COMPILE:-True}
COMPILE_1B=${COMPILE_1B:-False} SKIP_TESTS=${SKIP_TESTS:-0} SKIP_BENCH=${SKIP_BENCH:-0}
read -r -a bench_flags <<< "${BENCH_FLAGS:-}"
read -r -a train_flags <<< "${TRAIN_FLAGS:-}"
if [ ! -f "$text" ]; then
  echo "error: no text file at $text: bash config/gpu_check.sh TEXT_FILE (tinyshakespeare, say)" >&2
  exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -f "$tmp"/*/ckpt.pt; }
trap cleanup EXIT
status=0

# step NAME COMMAND...: run it (its output also into $tmp/NAME.out), time it, and add "NAME passed|FAILED
# SECONDS" to $tmp/steps.txt
step() {
  local name=$1 start=$SECONDS result=passed; shift
  echo "== $name: $*"
  if [ "${DRY_RUN:-0}" = 1 ]; then return; fi
  "$@" 2>&1 | tee "$tmp/$name.out" || { result=FAILED; status=1; }
  echo "$name $result $((SECONDS - start))" >> "$tmp/steps.txt"
}
skipped() { echo "== $1: skipped"; echo "$1 skipped 0" >> "$tmp/steps.txt"; }

# a few hundred steps: evals at the start and the end, 6 logged steps, a short warm-up and decay to min_lr
steps124=(--max_iters="$STEPS" --lr_decay_iters="$STEPS" --warmup_iters=$((STEPS / 10))
          --eval_interval="$STEPS" --log_interval=$((STEPS / 6 > 0 ? STEPS / 6 : 1)))
steps1b=(--max_iters="$STEPS_1B" --lr_decay_iters="$STEPS_1B" --warmup_iters=$((STEPS_1B / 10))
         --eval_interval="$STEPS_1B" --log_interval=$((STEPS_1B / 4 > 0 ? STEPS_1B / 4 : 1)))
system=(--device="$DEVICE" --dtype="$DTYPE")

if [ "$SKIP_TESTS" = 1 ]; then skipped tests; else step tests python -m pytest -q tests/test_fsdp.py; fi
if [ "$SKIP_BENCH" = 1 ]; then skipped bench; else step bench python bench.py --device="$DEVICE" --dtype="$DTYPE" "${bench_flags[@]}"; fi
step prepare python data.py --src="$text" --out="$tmp/bins" --tokenizer=gpt2
step gpt2-124m python train.py config/table62_gpu.py --data="$tmp/bins" --out_dir="$tmp/gpt2-124m" \
  --size="$SIZE_124M" "${steps124[@]}" "${system[@]}" --compile="$COMPILE" --num_samples=50 "${train_flags[@]}"
# GPT-3's learning rate at 1.3B. A quarter of 124M's batch (16 x 256 tokens, not 64): the 1B model's float32
# weights, gradients and AdamW state take ~16 GB, and its activations grow with the batch (an estimate: not yet
# measured, which is what peak GiB is for). Eager by default: compile under FSDP is tested on the CPU, and here it
# would add its compile time to a 20-step run (COMPILE_1B=True to time it).
step gpt2-1b-fsdp torchrun --standalone --nproc_per_node=1 train.py config/table62_gpu.py --data="$tmp/bins" \
  --out_dir="$tmp/gpt2-1b-fsdp" --size="$SIZE_1B" --learning_rate=2e-4 --fsdp=True --batch_size="$BATCH_1B" \
  "${steps1b[@]}" --eval_iters=5 "${system[@]}" --compile="$COMPILE_1B" --num_samples=8 --sample_tokens=32 \
  "${train_flags[@]}"
if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi

# the summary: one row per run from its log.jsonl (tok/s and MFU: the median over the logged steps after the
# first, which includes compilation; peak memory: the largest); exit status 1 unless every step passed or was skipped
python - "$tmp" <<'EOF'
import json, os, re, statistics, sys
import torch
tmp = sys.argv[1]
done = {name: (result, seconds) for name, result, seconds in (line.split() for line in open(os.path.join(tmp, 'steps.txt')))}
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(f"\nGPU check: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; runs in {tmp}")
for name in ('tests', 'bench', 'prepare'):
    result, seconds = done.get(name, ('missing', 0))
    print(f"{name}: {result} ({seconds} s)")


def read(*path):
    path = os.path.join(tmp, *path)
    return open(path).read() if os.path.exists(path) else ''


fmt = lambda v, f: '-' if v is None else format(v, f)
head = ('run', 'size', 'params', 'steps', 'tok/s', 'MFU', 'peak GiB', 'val loss', 'val bpb', 'status', 's')
rows = []
for run in ('gpt2-124m', 'gpt2-1b-fsdp'):
    log = [json.loads(line) for line in read(run, 'log.jsonl').splitlines()]
    steps = [r for r in log if 'loss' in r]
    timed = [r for r in steps if r['iter'] > 0] or steps
    median = lambda k: statistics.median(r[k] for r in timed) if timed and all(k in r for r in timed) else None
    last = ([r for r in log if 'val_loss' in r] or [{}])[-1]
    size = json.loads(read(run, 'report.json') or '{"config": {"size": "?"}}')['config']['size']
    params = re.search(r'([\d.]+)M parameters', read(run + '.out'))
    result, seconds = done.get(run, ('missing', 0))
    rows.append((run, size, params.group(1) + 'M' if params else '-', str(steps[-1]['iter'] + 1 if steps else 0),
                 fmt(median('tok_per_s'), ',.0f'), fmt(median('mfu'), '.1%'),
                 fmt(max((r['peak_mem_gib'] for r in steps if 'peak_mem_gib' in r), default=None), '.2f'),
                 fmt(last.get('val_loss'), '.3f'), fmt(last.get('val_bpb'), '.3f'), result, str(seconds)))
widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
for r in [head, *rows]:
    print('  '.join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
sys.exit(0 if all(r in ('passed', 'skipped') for r, _ in done.values()) and all(r[-2] == 'passed' for r in rows) else 1)
EOF
exit $status
