"""
Train a GPT-2 or BERT, optionally stabilised by PSU, on the embedded synthetic corpus or a text file.

    python train.py                                  # tiny GPT-2, synthetic corpus, CPU, ~3 minutes
    python train.py config/table62.py --psu_lambda=0.2 --seed=2026
    torchrun --standalone --nproc_per_node=2 train.py --device=cpu
    torchrun --standalone --nproc_per_node=8 train.py --size=gpt2-1b --fsdp=True   # sharded, bf16 on GPUs

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
from datetime import timedelta

import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from baara import BAARA
from configurator import parse_flags
from data import get_batch, load_data, tokenizer_from_state
from metrics import evaluate, summary
from model import GPT, GPTConfig, SIZES, load_checkpoint, load_gpt2_state_dict, load_model_state, mask_tokens, peak_flops
from sample import sample_texts
from distributed import full_tensor
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
    # BAARA (baara.py): a policy picks each step's learning-rate factor, update scope and DMU/DTU keep ratios
    baara=False, baara_cost='time',  # C_b from measured step times, or 'flops' (deterministic, reproducible)
    # end of run: samples and metrics written to out_dir
    num_samples=200, sample_tokens=64,
    # system
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32',
    compile=False, seed=1337,
    fsdp=False,                   # under torchrun: shard parameters, gradients, optimiser state (FSDP2, fully_shard)
)
CHOICES = dict(model=('gpt', 'bert'), size=tuple(SIZES), dmu_mode=('prob', 'fix', 'edge'),
               psu_channels=('stats', 'params', 'both'), dtype=('float32', 'bfloat16'),
               baara_cost=('time', 'flops'))
CKPT = 'ckpt.pt'


def get_config(argv):
    """Defaults <- (the resumed run's config) <- config file <- --key=value. A named size sets
    n_layer/n_head/n_embd unless they are given too."""
    config, given = parse_flags(DEFAULTS, argv, CHOICES)
    if config['init_from'] == 'resume':
        path = os.path.join(config['out_dir'], CKPT)
        saved = load_checkpoint(path)
        if not isinstance(saved, dict) or not isinstance(saved.get('config'), dict):
            raise SystemExit(f"error: {path!r} is not a checkpoint written by train.py (it has no config)")
        saved = saved['config']
        config = {**DEFAULTS, **saved, **{k: config[k] for k in given}}  # keys newer than the checkpoint: defaults
    elif 'size' in given:
        for key, value in zip(('n_layer', 'n_head', 'n_embd'), SIZES[config['size']]):
            config[key] = config[key] if key in given else value
    for key, valid in CHOICES.items():
        if config[key] not in valid:
            raise SystemExit(f"error: {key}={config[key]!r} is not one of {', '.join(valid)}")
    if not 0 < config['dmu_p'] <= 1 or not 0 < config['dtu_r'] <= 1:
        raise SystemExit("error: dmu_p and dtu_r must be in (0, 1]")
    return config


def autocast_context(dtype, device):
    """bf16 autocast over float32 weights, or nothing for float32. (float16 is not offered: it would
    need a gradient scaler, and every GPU this targets has bf16.)"""
    if dtype == 'float32':
        return nullcontext()
    if dtype != 'bfloat16':  # train.py checked it already; bench.py's --dtype comes here unchecked
        raise SystemExit(f"error: dtype={dtype!r} is not one of float32, bfloat16")
    return torch.autocast(device_type='cuda' if device.startswith('cuda') else 'cpu', dtype=torch.bfloat16)


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
        x, y = mask_tokens(x, tok.vocab_size, tok.vocab_size)
    return x, y


@torch.no_grad()
def estimate_loss(model, splits, c, tok, device, ctx):
    """Mean loss over eval_iters batches of each split; the same batches at every eval."""
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(c['seed'] + 7)
        # BERT's eval masks come from a fixed seed; forking (CPU and this GPU) leaves the
        # training RNG (DMU/DTU draws, dropout, BERT's training masks) alone for both models
        fork = torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith('cuda') else [])
        with fork:
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
    if ddp:  # rank 0 alone saves (multi-GB at 1B-3B) and samples at the end while the others wait
        init_process_group(backend='nccl' if c['device'].startswith('cuda') else 'gloo', timeout=timedelta(hours=1))
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if c['device'].startswith('cuda'):
            c['device'] = f"cuda:{os.environ['LOCAL_RANK']}"
    else:
        rank, world = 0, 1
    if c['device'].startswith('cuda:'):
        torch.cuda.set_device(c['device'])  # the current GPU, which CUDA events, syncs and fork_rng use
    fsdp = c['fsdp']
    if fsdp and not ddp:
        raise SystemExit("error: fsdp=True needs torchrun, e.g. torchrun --standalone --nproc_per_node=2 train.py --fsdp=True")
    master = rank == 0
    device = c['device']
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    torch.manual_seed(c['seed'] + rank)
    gen = torch.Generator().manual_seed(c['seed'] + rank)  # the training batches
    ctx = autocast_context(c['dtype'], device)

    # ---- data and model
    resuming = c['init_from'] == 'resume'
    ckpt = load_checkpoint(os.path.join(c['out_dir'], CKPT)) if resuming else None
    gpt2_weights = None
    if c['init_from'] not in ('scratch', 'resume'):
        model_args, gpt2_weights = load_gpt2_state_dict(load_checkpoint(c['init_from']))
        if c['tokenizer'] not in ('auto', 'gpt2'):
            raise SystemExit("error: GPT-2 weights need tokenizer=gpt2 (the full 50257-token vocabulary)")
        c['tokenizer'] = 'gpt2'
    train_ids, val_ids, tok, corpus_text, corpus = load_data(c['data'], c['tokenizer'])
    if ckpt is not None and tokenizer_from_state(ckpt['tokenizer']).state() != tok.state():
        raise SystemExit(f"error: checkpoint in {c['out_dir']!r} was trained with another tokenizer or data")
    if len(val_ids) <= c['block_size'] + 1:
        raise SystemExit(f"error: the data has {len(train_ids) + len(val_ids)} tokens, too few for block_size {c['block_size']}")
    vocab_size = tok.vocab_size + (c['model'] == 'bert')  # BERT's [MASK] is the last id
    units = dict(dropout=c['dropout'], dmu_p=c['dmu_p'], dmu_mode=c['dmu_mode'], dtu_r=c['dtu_r'])
    if gpt2_weights is not None:  # crop the position table to block_size, as nanoGPT does
        block_size = min(c['block_size'], model_args.block_size)
        gpt2_weights['transformer.wpe.weight'] = gpt2_weights['transformer.wpe.weight'][:block_size]
        config = GPTConfig(**{**asdict(model_args), **units, 'block_size': block_size})
    else:
        config = GPTConfig(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                           vocab_size=vocab_size, bias=c['bias'], causal=c['model'] == 'gpt', **units)
    state = ckpt['model'] if ckpt is not None else gpt2_weights
    if fsdp:
        model = build_fsdp(config, device, world, c['dtype'])
        if state is None:
            model.init_weights()  # on the local shards
            torch.cuda.manual_seed(c['seed'] + rank)  # on a GPU, DTensor's init gave every rank rank 0's generator
        else:  # the whole state dict, read from rank 0's copy (every rank maps the file, none copies it)
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model = GPT(config)
        if state is not None:
            load_model_state(model, state, os.path.join(c['out_dir'], CKPT) if resuming else c['init_from'])
        model.to(device)
    optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), device_type)
    names = {p: n for n, p in model.named_parameters()}
    fqns = [names[p] for g in optimizer.param_groups for p in g['params']]  # the optimizer state's int keys
    psu = PSU(model.parameters(), c['psu_lambda'], c['psu_beta'], c['psu_channels'], tok.eot)
    baara = (BAARA(model, train_ids, c['seed'], lambda g: batch(train_ids, c, tok, g, device), c['baara_cost'], ctx)
             if c['baara'] else None)
    diagnostics = Diagnostics()
    iter_num = 0
    if ckpt is not None:
        if fsdp:
            set_optimizer_state_dict(model, optimizer, rekey(ckpt['optimizer'], fqns),
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            optimizer.load_state_dict(ckpt['optimizer'])
        psu.load_state_dict(ckpt['psu'])
        ref_var = ckpt['psu'].get('ranks', [(psu.ref, psu.var)] * world)[rank]  # this rank's PSU reference
        psu.ref, psu.var = (None if t is None else t.to(device) for t in ref_var)
        diagnostics.load_state_dict(ckpt['diagnostics'])
        if baara and ckpt.get('baara') is not None:
            baara.load_state_dict(ckpt['baara'])
        iter_num = ckpt['iter_num']
        gen.set_state(ckpt['rng']['data'][rank])
        torch.set_rng_state(ckpt['rng']['torch'][rank])
        if device_type == 'cuda' and ckpt['rng'].get('cuda', [None] * world)[rank] is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'][rank], device)
    raw_model = model
    if c['compile']:
        model = torch.compile(model)
    if ddp and not fsdp:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None)
    if master:
        os.makedirs(c['out_dir'], exist_ok=True)
        print(f"{c['model']}: {raw_model.get_num_params() / 1e6:.2f}M parameters, vocab {vocab_size} "
              f"({tok.name}), {len(train_ids):,} train / {len(val_ids):,} val tokens, {world} process(es) on {device}")
        if corpus is not None and tok.name == 'word':
            print(f"synthetic corpus: {len(corpus.templates)} modes, true entropy rate {corpus.entropy_rate():.4f} nats/token")
    log_file = open(os.path.join(c['out_dir'], 'log.jsonl'), 'a' if resuming else 'w') if master else None

    def save_checkpoint():
        states = (gen.get_state(), torch.get_rng_state(), [None if t is None else t.cpu() for t in (psu.ref, psu.var)],
                  torch.cuda.get_rng_state(device) if device_type == 'cuda' else None)  # DMU/DTU draw on the GPU
        gathered = [states]
        if ddp:  # every rank's RNG and PSU reference, so that a resumed run draws what the uninterrupted run drew
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, states)
        rngs = [g[0] for g in gathered], [g[1] for g in gathered], [g[3] for g in gathered]
        psu_state = dict(psu.state_dict(keep=master), ranks=[g[2] for g in gathered])  # a collective under FSDP
        baara_state = baara.state_dict(keep=master) if baara else None                # so is this one
        if fsdp:  # gathered whole onto rank 0's CPU: the same single-file checkpoint as without FSDP
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(raw_model, options=opts)
            optim_state = get_optimizer_state_dict(raw_model, optimizer, options=opts)
            optim_state = rekey(optim_state, {n: i for i, n in enumerate(fqns)}) if master else None
        else:
            model_state, optim_state = raw_model.state_dict(), optimizer.state_dict()
        if not master:
            return
        ckpt = dict(model=model_state, optimizer=optim_state, config=c,
                    model_args=asdict(raw_model.config), iter_num=iter_num, tokenizer=tok.state(),
                    psu=psu_state, diagnostics=diagnostics.state_dict(), baara=baara_state,
                    rng=dict(data=rngs[0], torch=rngs[1], cuda=rngs[2]),
                    loop=dict(recent_losses=recent_losses, grad_norm=float(grad_norm), last_update=float(last_update)))
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
    peak = peak_flops(torch.cuda.get_device_name(device)) if device_type == 'cuda' else None  # for MFU
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    recent_losses, grad_norm, last_update = [], torch.zeros(()), torch.zeros(())
    if ckpt is not None and 'loop' in ckpt:  # what the next eval's diagnostics need, as the unbroken run had it
        recent_losses = list(ckpt['loop']['recent_losses'])
        grad_norm, last_update = torch.tensor(ckpt['loop']['grad_norm']), torch.tensor(ckpt['loop']['last_update'])
    t_start = t_log = time.time()
    iter_start, steps_timed = iter_num, 0
    while True:
        evaluated = resuming and iter_num == iter_start  # the saving run logged this eval already
        if (iter_num % c['eval_interval'] == 0 or iter_num == c['max_iters']) and not evaluated:
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
            t_log, steps_timed = time.time(), 0  # eval time is not training throughput
        if iter_num == c['max_iters']:
            break

        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group['lr'] = lr
        logging = iter_num % c['log_interval'] == 0
        before = [p.detach().clone() for p in params] if logging else None
        if baara:
            baara.start()  # the clock for C_b (eq. 63)
        for micro_step in range(c['gradient_accumulation_steps']):
            if fsdp:  # reduce-scatter the gradients on the last micro-step only
                raw_model.set_requires_gradient_sync(micro_step == c['gradient_accumulation_steps'] - 1)
            elif ddp:
                model.require_backward_grad_sync = micro_step == c['gradient_accumulation_steps'] - 1
            x, y = batch(train_ids, c, tok, gen, device)
            with ctx:
                logits, loss = model(x, y)
                feedback = psu.feedback_loss(logits, y) if psu.stats_on else None  # eq. 61
                if baara:  # H_b: PSU's statistics channel has it already when on
                    baara.observe(logits, y, loss, None if feedback is None else psu.last['stats'][0])
                if feedback is not None:
                    loss = loss + feedback
                loss = loss / c['gradient_accumulation_steps']
            loss.backward()
        if baara:  # state -> action: lr = alpha_b * eta, the inactive blocks' gradients dropped (eq. 69)
            baara.act(optimizer, lr)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, c['grad_clip'] if c['grad_clip'] > 0 else float('inf')))
        optimizer.step()
        if baara:
            baara.finish()  # v_b (eq. 65), read at the next act()
        optimizer.zero_grad(set_to_none=True)
        if psu.params_on:
            psu.pull(measure=logging)
        nonfinite |= ~torch.isfinite(loss.detach())
        steps_timed += 1

        if logging:
            last_update = update_norm(params, before)
            lossf = loss.item() * c['gradient_accumulation_steps']
            if not math.isfinite(lossf):
                stop_nonfinite(iter_num, c)
            recent_losses = (recent_losses + [lossf])[-50:]
            now = time.time()
            tok_s = tokens_per_iter * steps_timed / (now - t_log)
            eta = (now - t_start) / (iter_num + 1 - iter_start) * (c['max_iters'] - iter_num - 1)
            t_log, steps_timed = now, 0
            if master:
                entropy = psu.statistics(logits.detach(), y)[0].item()  # for Fig. 3, with or without PSU
                log(dict(iter=iter_num, loss=lossf, lr=lr, tok_per_s=round(tok_s), eta_s=round(eta), entropy=entropy,
                         grad_norm=grad_norm.item(), update_norm=last_update.item(), **psu.log(), **(baara.log() if baara else {}),
                         **({'mfu': raw_model.estimate_mfu(tok_s / world, peak)} if peak else {}),
                         **({'peak_mem_gib': torch.cuda.max_memory_allocated(device) / 2**30} if device_type == 'cuda' else {})))
        iter_num += 1

    if fsdp:  # samples and metrics run on rank 0 alone: gather the whole model there
        state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            with torch.device('meta'):
                raw_model = GPT(config)
            raw_model.to_empty(device=device).load_state_dict(state)
    if master:
        log_file.close()
        finish(raw_model, tok, corpus, corpus_text, val_ids, diagnostics, c, device, ctx)
    if ddp:
        torch.distributed.barrier()  # the other ranks wait for rank 0's report: exiting early can hang gloo
        destroy_process_group()


def build_fsdp(config, device, world, dtype='float32'):
    """FSDP2 without ever holding the whole model: build on the meta device, fully_shard each Block
    then the root (tied wte/lm_head stay one parameter), then allocate only this rank's shards.
    With bfloat16 the shards are gathered in bf16 (half the traffic) and the gradients reduced in
    float32; the optimiser, PSU and BAARA keep working on the float32 shards."""
    with torch.device('meta'):
        model = GPT(config)
    mesh = init_device_mesh(device.split(':')[0], (world,))
    bf16 = dtype == 'bfloat16'
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model.to_empty(device=device)


def rekey(optim_state, keys):
    """An optimizer state dict with its parameter keys mapped by keys: int index <-> FQN (FSDP's API)."""
    return {'state': {keys[k]: v for k, v in optim_state['state'].items()},
            'param_groups': [{**g, 'params': [keys[k] for k in g['params']]} for g in optim_state['param_groups']]}


def stop_nonfinite(iter_num, c):
    raise SystemExit(f"error: the loss became NaN or infinite by iter {iter_num}; stopped, and the last good "
                     f"checkpoint in {c['out_dir']!r} is untouched")


def finish(model, tok, corpus, corpus_text, val_ids, diagnostics, c, device, ctx):
    """End of run: samples to samples.txt, metrics and the stability verdict to report.json."""
    with ctx:
        texts = sample_texts(model, tok, c['num_samples'], c['sample_tokens'], device=device, seed=c['seed'])
    with open(os.path.join(c['out_dir'], 'samples.txt'), 'w') as f:
        f.write('\n=====\n'.join(texts))
    verdict = diagnostics.verdict()
    metrics = evaluate(model, tok, corpus_text, corpus, texts, val_ids, batch_size=c['batch_size'],
                       device=device, ctx=ctx, seed=c['seed'])
    report = dict(config=c, stability=verdict, metrics=metrics)
    with open(os.path.join(c['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print(summary(metrics))
    print(f"stability: {verdict['verdict']}; {len(texts)} samples in {c['out_dir']}/samples.txt, e.g.:")
    for t in texts[:3]:
        print('  ' + t.strip().replace('\n', ' / ')[:100])


if __name__ == '__main__':
    main(sys.argv[1:])
