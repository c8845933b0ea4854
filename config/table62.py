# Table 6.2 at CPU scale (shared settings; the sweep sets model, seed, psu_lambda, data):
#   python train.py config/table62.py --psu_lambda=0.05 --seed=2026
# Tiny model, 600 steps: about 1.5 minutes a run on 2 CPU cores.
max_iters = 600
lr_decay_iters = 600
eval_interval = 100
log_interval = 10
eval_iters = 10
num_samples = 200
sample_tokens = 64
