# Table 6.2 at GPU scale: bash config/table62.sh PATH --gpu
# GPT-2 124M on one GPU; the paper's 1B-3B sizes are --size=gpt2-1b ... with --fsdp=True under torchrun.
size = 'gpt2'
block_size = 256
batch_size = 64
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 200
learning_rate = 6e-4
min_lr = 6e-5
eval_interval = 500
log_interval = 50
eval_iters = 50
num_samples = 500
sample_tokens = 128
compile = True
