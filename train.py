"""
Train a GPT-2 or BERT, optionally stabilised by PSU, on the embedded synthetic corpus or a text file.

    python train.py                                  # tiny GPT-2, synthetic corpus, CPU, ~3 minutes
    python train.py config/table62.py --psu_lambda=0.2 --seed=2026
    torchrun --standalone --nproc_per_node=2 train.py --device=cpu

Every key below can be set by a config file or --key=value (configurator.py). Keys share
nanoGPT's names where nanoGPT has the same knob.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import parse_flags
from data import get_batch, load_data, tokenizer_from_state
from model import GPT, GPTConfig, SIZES, load_checkpoint, load_gpt2_state_dict, load_model_state, mask_tokens
from sample import sample_texts
from stabilize import PSU, Diagnostics, param_norm, update_norm

DEFAULTS = dict(
    # I/O
    out_dir='out', eval_interval=100, log_interval=10, eval_iters=20,
    init_from='scratch',          # 'scratch', 'resume' (from out_dir) or a path to GPT-2 weights
    # data
    data='synthetic',             # 'synthetic' (embedded, no file) or a path to a UTF-8 text file
    tokenizer='auto',             # auto (word for synthetic, gpt2-compact for files), word, char, gpt2, gpt2-compact
    # model
    model='gpt',                  # 'gpt' (causal LM) or 'bert' (masked LM)
    size='tiny',                  # a name from model.SIZES; n_layer/n_head/n_embd set explicitly win
    n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=True,
    dmu_p=1.0, dmu_mode='fix',    # DMU retention and mask kind ('prob', 'fix', 'edge'); p=1 is off
    dtu_r=1.0,                    # DTU keep ratio of head dimensions; r=1 is off
    # optimiser: AdamW, linear warmup then cosine decay to min_lr at lr_decay_iters
    batch_size=32, gradient_accumulation_steps=1, max_iters=1000,
    learning_rate=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
    warmup_iters=50, lr_decay_iters=1000, min_lr=3e-4,
    # PSU (stabilize.py)
    psu_lambda=0.0, psu_channels='both', psu_beta=0.99,
    # end of run: samples and metrics written to out_dir
    num_samples=200, sample_tokens=64,
    # system
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32',
    compile=False, seed=1337,
)
CHOICES = dict(model=('gpt', 'bert'), size=tuple(SIZES), dmu_mode=('prob', 'fix', 'edge'),
               psu_channels=('stats', 'params', 'both'), dtype=('float32', 'bfloat16', 'float16'))
CKPT = 'ckpt.pt'


def get_config(argv):
    """Defaults <- (the resumed run's config) <- config file <- --key=value. A named size sets
    n_layer/n_head/n_embd unless they are given too."""
    config, given = parse_flags(DEFAULTS, argv)
    if config['init_from'] == 'resume':
        saved = load_checkpoint(os.path.join(config['out_dir'], CKPT))['config']
        config = {**saved, **{k: config[k] for k in given}}
    elif 'size' in given:
        for key, value in zip(('n_layer', 'n_head', 'n_embd'), SIZES[config['size']]):
            config[key] = config[key] if key in given else value
    for key, valid in CHOICES.items():
        if config[key] not in valid:
            raise SystemExit(f"error: {key}={config[key]!r} is not one of {', '.join(valid)}")
    if not 0 < config['dmu_p'] <= 1 or not 0 < config['dtu_r'] <= 1:
        raise SystemExit("error: dmu_p and dtu_r must be in (0, 1]")
    return config


def get_lr(it, c):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / (c['warmup_iters'] + 1)
    if it > c['lr_decay_iters']:
        return c['min_lr']
    ratio = (it - c['warmup_iters']) / max(1, c['lr_decay_iters'] - c['warmup_iters'])
    return c['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c['learning_rate'] - c['min_lr'])


def batch(ids, c, tok, generator, device):
    """A training or eval batch: next-token pairs for GPT, masked-LM pairs for BERT."""
    x, y = get_batch(ids, c['batch_size'], c['block_size'], generator, device)
    if c['model'] == 'bert':
        x, y = mask_tokens(x, tok.vocab_size, tok.vocab_size, generator=None)
    return x, y


@torch.no_grad()
def estimate_loss(model, splits, c, tok, device, ctx):
    """Mean loss over eval_iters batches of each split; the same batches at every eval."""
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(c['seed'] + 7)
        fork = torch.random.fork_rng(devices=[]) if c['model'] == 'bert' else nullcontext()
        with fork:  # BERT's eval masks come from a fixed seed and leave the training RNG alone
            torch.manual_seed(c['seed'] + 7)
            losses = torch.zeros(c['eval_iters'])
            for k in range(c['eval_iters']):
                x, y = batch(ids, c, tok, gen, device)
                with ctx:
                    _, loss = model(x, y)
                losses[k] = loss.item()
        out[name] = losses.mean().item()
    model.train()
    return out


def main(argv):
    c = get_config(argv)
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        init_process_group(backend='nccl' if c['device'].startswith('cuda') else 'gloo')
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if c['device'].startswith('cuda'):
            c['device'] = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(c['device'])
    else:
        rank, world = 0, 1
    master = rank == 0
    device = c['device']
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    torch.manual_seed(c['seed'] + rank)
    gen = torch.Generator().manual_seed(c['seed'] + rank)  # the training batches
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[c['dtype']]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)

    # ---- data and model
    resuming = c['init_from'] == 'resume'
    ckpt = load_checkpoint(os.path.join(c['out_dir'], CKPT)) if resuming else None
    gpt2_weights = None
    if c['init_from'] not in ('scratch', 'resume'):
        model_args, gpt2_weights = load_gpt2_state_dict(load_checkpoint(c['init_from']))
        if c['tokenizer'] not in ('auto', 'gpt2'):
            raise SystemExit("error: GPT-2 weights need tokenizer=gpt2 (the full 50257-token vocabulary)")
        c['tokenizer'] = 'gpt2'
    train_ids, val_ids, tok, corpus_text, corpus = load_data(c['data'], c['tokenizer'], c['seed'])
    if ckpt is not None and tokenizer_from_state(ckpt['tokenizer']).state() != tok.state():
        raise SystemExit(f"error: checkpoint in {c['out_dir']!r} was trained with another tokenizer or data")
    if len(val_ids) <= c['block_size'] + 1:
        raise SystemExit(f"error: the data has {len(train_ids) + len(val_ids)} tokens, too few for block_size {c['block_size']}")
    vocab_size = tok.vocab_size + (c['model'] == 'bert')  # BERT's [MASK] is the last id
    units = dict(dropout=c['dropout'], dmu_p=c['dmu_p'], dmu_mode=c['dmu_mode'], dtu_r=c['dtu_r'])
    if gpt2_weights is not None:
        config = GPTConfig(**{**asdict(model_args), **units, 'block_size': model_args.block_size})
    else:
        config = GPTConfig(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                           vocab_size=vocab_size, bias=c['bias'], causal=c['model'] == 'gpt', **units)
    model = GPT(config)
    if gpt2_weights is not None:
        load_model_state(model, gpt2_weights, c['init_from'])
        if c['block_size'] < config.block_size:  # crop the position table, as nanoGPT does
            model.transformer.wpe.weight = torch.nn.Parameter(model.transformer.wpe.weight[:c['block_size']])
            model.config.block_size = c['block_size']
    if ckpt is not None:
        load_model_state(model, ckpt['model'], os.path.join(c['out_dir'], CKPT))
    model.to(device)
    optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), device_type)
    psu = PSU(model.parameters(), c['psu_lambda'], c['psu_beta'], c['psu_channels'], tok.eot)
    diagnostics = Diagnostics()
    iter_num = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        psu.load_state_dict(ckpt['psu'])
        diagnostics.load_state_dict(ckpt['diagnostics'])
        iter_num = ckpt['iter_num']
        gen.set_state(ckpt['rng']['data'][rank])
        torch.set_rng_state(ckpt['rng']['torch'][rank])
    raw_model = model
    if c['compile']:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
    if master:
        os.makedirs(c['out_dir'], exist_ok=True)
        print(f"{c['model']}: {raw_model.get_num_params() / 1e6:.2f}M parameters, vocab {vocab_size} "
              f"({tok.name}), {len(train_ids):,} train / {len(val_ids):,} val tokens, {world} process(es) on {device}")
        if corpus is not None and tok.name == 'word':
            print(f"synthetic corpus: {len(corpus.templates)} modes, true entropy rate {corpus.entropy_rate():.4f} nats/token")
    log_file = open(os.path.join(c['out_dir'], 'log.jsonl'), 'a' if resuming else 'w') if master else None

    def save_checkpoint():
        rngs = [None] * world, [None] * world
        states = (gen.get_state(), torch.get_rng_state())
        if ddp:  # every rank's RNG, so that a resumed run draws what the uninterrupted run drew
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, states)
            rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        else:
            rngs = [states[0]], [states[1]]
        if not master:
            return
        ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=c,
                    model_args=asdict(raw_model.config), iter_num=iter_num, tokenizer=tok.state(),
                    psu=psu.state_dict(), diagnostics=diagnostics.state_dict(),
                    rng=dict(data=rngs[0], torch=rngs[1]))
        path = os.path.join(c['out_dir'], CKPT)
        torch.save(ckpt, path + '.tmp')
        os.replace(path + '.tmp', path)  # atomic: a crash never leaves half a checkpoint

    def log(row):
        print(' | '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
        log_file.write(json.dumps(row) + '\n')
        log_file.flush()

    # ---- the training loop
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tokens_per_iter = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps'] * world
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    recent_losses, grad_norm, last_update = [], torch.zeros(()), torch.zeros(())
    t_start = t_log = time.time()
    iter_start = iter_num
    while True:
        if iter_num % c['eval_interval'] == 0 or iter_num == c['max_iters']:
            losses = estimate_loss(model, {'train': train_ids, 'val': val_ids}, c, tok, device, ctx)
            if nonfinite.item() or not all(math.isfinite(v) for v in losses.values()):
                stop_nonfinite(iter_num, c)
            diag = diagnostics.record(iter_num, param_norm(params).item(), float(grad_norm),
                                      float(last_update), recent_losses)
            if master:
                row = dict(**diag, train_loss=losses['train'], val_loss=losses['val'])
                if corpus is not None and tok.name == 'word' and c['model'] == 'gpt':
                    row['entropy_rate'] = corpus.entropy_rate()
                log(row)
            if iter_num > iter_start:
                save_checkpoint()
            t_log = time.time()  # eval time is not training throughput
        if iter_num == c['max_iters']:
            break

        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group['lr'] = lr
        logging = iter_num % c['log_interval'] == 0
        before = [p.detach().clone() for p in params] if logging else None
        for micro_step in range(c['gradient_accumulation_steps']):
            if ddp:
                model.require_backward_grad_sync = micro_step == c['gradient_accumulation_steps'] - 1
            x, y = batch(train_ids, c, tok, gen, device)
            with ctx:
                logits, loss = model(x, y)
                if psu.stats_on:
                    loss = loss + psu.feedback_loss(logits, y)
                loss = loss / c['gradient_accumulation_steps']
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c['grad_clip'] if c['grad_clip'] > 0 else float('inf'))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if psu.params_on:
            psu.pull()
        nonfinite |= ~torch.isfinite(loss.detach())
        iter_num += 1

        if logging:
            last_update = update_norm(params, before)
            lossf = loss.item() * c['gradient_accumulation_steps']
            if not math.isfinite(lossf):
                stop_nonfinite(iter_num, c)
            recent_losses = (recent_losses + [lossf])[-50:]
            now = time.time()
            elapsed_iters = iter_num - iter_start
            tok_s = tokens_per_iter * min(c['log_interval'], elapsed_iters) / (now - t_log)
            eta = (now - t_start) / elapsed_iters * (c['max_iters'] - iter_num)
            t_log = now
            if master:
                log(dict(iter=iter_num, loss=lossf, lr=lr, tok_per_s=round(tok_s), eta_s=round(eta),
                         grad_norm=grad_norm.item(), update_norm=last_update.item(), **psu.log()))

    if master:
        log_file.close()
        finish(raw_model, tok, corpus, corpus_text, diagnostics, c, device, ctx)
    if ddp:
        destroy_process_group()


def stop_nonfinite(iter_num, c):
    raise SystemExit(f"error: the loss became NaN or infinite by iter {iter_num}; stopped, and the last good "
                     f"checkpoint in {c['out_dir']!r} is untouched")


def finish(model, tok, corpus, corpus_text, diagnostics, c, device, ctx):
    """End of run: samples to samples.txt, metrics and the stability verdict to report.json."""
    texts = sample_texts(model, tok, c['num_samples'], c['sample_tokens'], device=device, seed=c['seed'])
    with open(os.path.join(c['out_dir'], 'samples.txt'), 'w') as f:
        f.write('\n=====\n'.join(texts))
    verdict = diagnostics.verdict()
    report = dict(config=c, stability=verdict)
    with open(os.path.join(c['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print(f"stability: {verdict['verdict']}; {len(texts)} samples in {c['out_dir']}/samples.txt, e.g.:")
    for t in texts[:3]:
        print('  ' + t.strip().replace('\n', ' / ')[:100])


if __name__ == '__main__':
    main(sys.argv[1:])
