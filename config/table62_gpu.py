# Table 6.2 at GPU scale: bash config/table62.sh PATH --gpu
# GPT-2 124M on one GPU. The paper's sizes: add --size=gpt2-1b (or gpt2-2b, gpt2-3b) with GPT-3's
# learning rate for that size, --learning_rate=2e-4 (1.6e-4 for 2-3B), and on several GPUs
# LAUNCH='torchrun --standalone --nproc_per_node=8' ... --fsdp=True. The paper gives no hyperparameters.
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
