# Sec. 6.3 ablation at CPU scale (shared settings; config/ablation63.sh sets psu_lambda, dmu_p/dtu_r, data):
#   python train.py config/ablation63.py --psu_lambda=0.05 --dtu_r=1.0     # the "without DTU" run
# The full system: PSU (psu_lambda), BAARA, DMU (keep 0.5 of the MLP units), DTU (keep 0.5 of
# each head's dimensions). BAARA's C_b from the FLOP ratio, so that the table reproduces bit for
# bit (--baara_cost=time measures it instead; on a busy CPU the step times jitter).
# The same scale as config/table62.py: tiny model, 600 steps.
seed = 2026
baara = True
baara_cost = 'flops'
dmu_p = 0.5
dtu_r = 0.5
max_iters = 600
lr_decay_iters = 600
eval_interval = 100
log_interval = 10
eval_iters = 10
num_samples = 200
sample_tokens = 64
