"""
Train a GPT-2 or BERT, optionally stabilised by PSU, on the embedded synthetic corpus or a text file.

    python train.py                                  # tiny GPT-2, synthetic corpus, CPU, ~4 minutes
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

from configurator import DEVICE, auto_device, auto_dtype, exit_if_help, parse_flags, validate

# name -> (n_layer, n_head, n_embd); the parameter count is in the name (tests check within 10%)
SIZES = {'tiny': (4, 4, 128), 'gpt2': (12, 12, 768), 'gpt2-1b': (18, 16, 2048), 'gpt2-2b': (24, 20, 2560),
         'gpt2-3b': (36, 20, 2560), 'bert-1b': (18, 16, 2048)}  # bert-*: bidirectional

DEFAULTS = dict(
    # I/O
    out_dir='out', eval_interval=100, log_interval=10, eval_iters=20,
    init_from='scratch',          # 'scratch', 'resume' (from out_dir) or a path to GPT-2 weights
    # data
    data='synthetic',             # 'synthetic' (embedded, no file) or a path to a UTF-8 text file
    tokenizer='auto',             # auto (word for synthetic, gpt2-compact for files), word, char, gpt2, gpt2-compact
    n_sentences=150_000, synthetic_modes=64, synthetic_zipf=1.1, synthetic_class_scale=1,  # SyntheticCorpus (README)
    # model
    model='gpt',                  # 'gpt' (causal LM) or 'bert' (masked LM)
    size='tiny',                  # a name from SIZES; n_layer/n_head/n_embd set explicitly win
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
    num_samples=200, sample_tokens=64, dist_samples=5000,  # dist_samples: sentences for Thm 5.5's metrics
    temperature=1.0, top_k=0, top_p=1.0,  # their decoder (0: greedy; 0: no top-k; 1: no nucleus), also for the metrics
    # system
    device='auto',                # cuda where torch sees a GPU, else cpu
    dtype='auto',                 # bfloat16 on a GPU with native bf16, else float32
    compile=False, seed=1337,
    fsdp=False,                   # under torchrun: shard parameters, gradients, optimiser state (FSDP2, fully_shard)
    overwrite=False,              # a fresh run may replace the run already in out_dir (else it is refused)
)
# Each key's valid values (configurator.py: the rule strings; --help prints them), checked once the
# config is merged (get_config): a value outside them is a one-line error before anything runs.
VALID = dict(
    out_dir='PATH', eval_interval='>= 1', log_interval='>= 1', eval_iters='>= 1',
    init_from='scratch | resume | PATH',
    data='synthetic | PATH', tokenizer='auto | word | char | gpt2 | gpt2-compact',
    n_sentences='>= 1', synthetic_modes='>= 1', synthetic_zipf='>= 0', synthetic_class_scale='>= 1',
    model='gpt | bert', size=' | '.join(SIZES),
    n_layer='>= 1', n_head='>= 1', n_embd='>= 1', block_size='>= 1', dropout='[0, 1)', bias='any',
    dmu_p='(0, 1]', dmu_mode='prob | fix | edge', dtu_r='(0, 1]',
    batch_size='>= 1', gradient_accumulation_steps='>= 1', max_iters='>= 0',
    learning_rate='> 0', weight_decay='>= 0', beta1='[0, 1)', beta2='[0, 1)', grad_clip='>= 0',
    warmup_iters='>= 0', lr_decay_iters='>= 0', min_lr='>= 0',
    psu_lambda='[0, 1]', psu_channels='stats | params | both', psu_beta='[0, 1]',
    baara='any', baara_cost='time | flops',
    num_samples='>= 1', sample_tokens='>= 1', dist_samples='>= 2', temperature='>= 0', top_k='>= 0', top_p='(0, 1]',
    device=DEVICE, dtype='auto | float32 | bfloat16', compile='any', seed='[0, 1e18]', fsdp='any', overwrite='any',  # seed + rank, + 7: torch's seeds end at 2^64
)
# Keys that fix the model's shape, data or vocabulary: a resumed run may only repeat the checkpoint's value
SHAPE_KEYS = ('model', 'size', 'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'data', 'tokenizer',
              'n_sentences', 'synthetic_modes', 'synthetic_zipf', 'synthetic_class_scale')

if __name__ == '__main__':  # the config above comes before torch is imported, so that --help answers at once
    exit_if_help(sys.argv[1:], __doc__, DEFAULTS, VALID)

import torch

import distributed
from baara import BAARA
from data import check_data, get_batch, load_run_data
from metrics import predictive_entropy, summary
from model import GPT, GPTConfig, load_checkpoint, load_gpt2_state_dict, load_model_state, mask_id, mask_tokens, peak_flops
from runfolder import RunLog, checkpoint_path, resumed_config, run_folder, write_atomic
from sample import sample_metrics, sample_texts
from stabilize import PSU, Diagnostics, param_norm, step_measuring_update


def get_config(argv):
    """Defaults <- (the resumed run's config) <- config file <- --key=value, validated once merged
    (VALID, then the checks across keys). A named size sets n_layer/n_head/n_embd unless they are
    given too. Nothing is written anywhere until this has passed."""
    config, given = parse_flags(DEFAULTS, argv, VALID)
    validate(config, VALID)  # what was given: out_dir and init_from are read below
    if config['init_from'] == 'resume':
        config = resumed_config(config, given, DEFAULTS, SHAPE_KEYS)
        validate(config, VALID)  # and what the checkpoint brought (its device, say)
    config['device'], config['dtype'] = auto_device(config['device']), auto_dtype(config['dtype'])  # 'auto' -> this machine's
    if 'size' in given and config['init_from'] != 'resume':
        for key, value in zip(('n_layer', 'n_head', 'n_embd'), SIZES[config['size']]):
            config[key] = config[key] if key in given else value
        if config['size'].startswith('bert'):  # a BERT size is a bidirectional masked LM
            if 'model' in given and config['model'] != 'bert':
                raise SystemExit(f"error: size={config['size']} is a BERT size; use --model=bert or a gpt2 size")
            config['model'] = 'bert'
    if config['init_from'] not in ('scratch', 'resume'):  # GPT-2's weights: a causal GPT of their shape
        if config['model'] == 'bert':
            raise SystemExit(f"error: model=bert cannot start from GPT-2 weights (init_from={config['init_from']!r}); use --model=gpt")
        set_by_size = {'n_layer', 'n_head', 'n_embd'} if 'size' in given else set()
        for key in {'n_layer', 'n_head', 'n_embd', 'bias'} - given - set_by_size:
            config[key] = None  # the weights' (load_gpt2); a value given must be theirs
    if config['min_lr'] > config['learning_rate']:
        default = '' if 'min_lr' in given else ' (its default)'
        raise SystemExit(f"error: min_lr={config['min_lr']}{default} is above learning_rate={config['learning_rate']} (the cosine "
                         f"decays from learning_rate to min_lr); set --min_lr, e.g. to a tenth of learning_rate")
    if config['n_embd'] and config['n_head'] and config['n_embd'] % config['n_head']:  # (None: GPT-2 weights')
        raise SystemExit(f"error: n_embd={config['n_embd']} is not a multiple of n_head={config['n_head']} "
                         f"(each head gets n_embd // n_head dimensions)")
    return config


def autocast_context(dtype, device):
    """bf16 autocast over float32 weights, or nothing (no float16: it would need a gradient scaler)."""
    if dtype == 'float32':
        return nullcontext()
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
        x, y = mask_tokens(x, mask_id(tok.vocab_size + 1), tok.vocab_size)  # [MASK]: BERT's one extra id
    return x, y


@torch.no_grad()
def estimate_loss(model, splits, c, tok, device, ctx):
    """Mean loss over eval_iters batches of each split; the same batches at every eval."""
    model.eval()
    out = {}
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(c['seed'] + 7)
        # BERT's eval masks come from a fixed seed; forking (CPU, this GPU) leaves the training RNG alone
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith('cuda') else []):
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


def train_step(model, optimizer, next_batch, lr, psu=None, baara=None, accum=1, grad_clip=1.0,
               ctx=nullcontext(), measure=False):
    """One optimisation step, the one that train.py's loop, bench.py and baara.theorem_b1 all take.
    next_batch() -> (x, y) is called once per micro-step; grad_clip 0 is no clipping; measure
    (logged steps) also measures ||theta_t - theta_{t-1}|| (else None) and PSU's pull. Returns the last
    micro-batch's loss (PSU's feedback included), ||g|| before clipping, that update norm, and the
    micro-batch's logits and targets."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    if baara:
        baara.start()  # the clock for C_b (eq. 63)

    # ---- forward, PSU feedback (eq. 61), backward: gradients accumulate over accum micro-batches
    for micro_step in range(accum):
        distributed.sync_gradients(model, micro_step == accum - 1)
        x, y = next_batch()
        with ctx:
            logits, loss = model(x, y)
            feedback = psu.feedback_loss(logits, y) if psu and psu.stats_on else None  # eq. 61
            if baara:  # H_b (eq. 67): PSU's statistics channel has it already when on
                baara.observe(logits, y, loss, None if feedback is None else psu.last['stats'][0])
            if feedback is not None:
                loss = loss + feedback
        (loss / accum).backward()

    # ---- BAARA's action (eq. 69), clip, step
    if baara:  # state -> action: lr = alpha_b * eta, the inactive blocks' gradients dropped
        baara.act(optimizer, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
    # logged steps take the same step, bit for bit, also measuring Def. 3.1's ||theta_t - theta_{t-1}|| (no copy)
    update = step_measuring_update(optimizer, psu) if measure else optimizer.step()  # step() returns None
    if baara:
        baara.finish()  # v_b (eq. 65), read by the next step's act()
    optimizer.zero_grad(set_to_none=True)

    # ---- PSU's pull: theta <- theta + lambda * (theta_bar - theta), the parameter channel
    if psu and psu.params_on:
        psu.pull(measure=measure)
    return loss, grad_norm, update, logits, y


def logged_numbers(grad_norm, update, logits, y, psu, baara=None):
    """A logged step's numbers after its loss, lr and speed (host syncs): entropy for Fig. 3 (PSU's statistics
    have it when on), ||g||, ||theta_t - theta_{t-1}||, PSU's and BAARA's. bench.py times this too."""
    entropy = psu.last['stats'][0] if psu.stats_on else predictive_entropy(logits, y != -1)
    return dict(entropy=entropy.item(), grad_norm=grad_norm.item(), update_norm=update.item(), **psu.log(),
                **(baara.log() if baara else {}))


def main(argv):
    c = get_config(argv)
    rank, world, c['device'] = distributed.setup(c['device'], c['fsdp'])
    with run_folder(c, rank == 0):  # out_dir/.lock held to the end; a fresh run refused where a run is
        run(c, rank, world)


def run(c, rank, world):
    """One run, in phases: data and model, the training loop, the end-of-run samples and report."""
    device, master = c['device'], rank == 0
    torch.manual_seed(c['seed'] + rank)                         # DMU/DTU draws, dropout, BERT's masks
    data_gen = torch.Generator().manual_seed(c['seed'] + rank)  # which windows this rank trains on
    ctx = autocast_context(c['dtype'], device)

    # ---- data and model: from scratch, from GPT-2's weights, or resumed from out_dir
    ckpt = load_checkpoint(checkpoint_path(c)) if c['init_from'] == 'resume' else None
    gpt2_weights = load_gpt2(c) if c['init_from'] not in ('scratch', 'resume') else None
    train_ids, val_ids, tok, _, corpus = data = load_run_data(c)
    check_data(train_ids, val_ids, tok, ckpt, c)
    if ckpt is not None and len(ckpt['ranks']) != world:  # each rank's RNGs and PSU reference were saved
        raise SystemExit(f"error: the checkpoint in {c['out_dir']!r} was saved by {len(ckpt['ranks'])} process(es); "
                         f"resume it with as many (this run has {world})")
    config = model_config(c, tok.vocab_size + (c['model'] == 'bert'))  # BERT's [MASK]: one more id
    state, source = (ckpt['model'], checkpoint_path(c)) if ckpt is not None else (gpt2_weights, c['init_from'])
    raw_model = build_model(config, state, source, c, world, rank)  # state None: freshly initialised
    optimizer = raw_model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']),
                                               device.split(':')[0])
    psu = PSU(raw_model.parameters(), c['psu_lambda'], c['psu_beta'], c['psu_channels'], tok.eot)
    baara = (BAARA(raw_model, data.token_counts, c['seed'], lambda g: batch(train_ids, c, tok, g, device), c['baara_cost'], ctx)
             if c['baara'] else None)
    diagnostics = Diagnostics()
    iter_num, latest = 0, fresh_latest()
    if ckpt is not None:
        iter_num, latest = restore_checkpoint(ckpt, raw_model, optimizer, psu, baara, diagnostics, data_gen, device, rank)
    model = distributed.wrap_ddp(torch.compile(raw_model) if c['compile'] else raw_model, device)
    if master:
        print(f"{c['model']}: {raw_model.get_num_params() / 1e6:.2f}M parameters, vocab {config.vocab_size} "
              f"({tok.name}), {len(train_ids):,} train / {len(val_ids):,} val tokens, {world} process(es) on {device}")
        if corpus is not None and tok.name == 'word':
            print(f"synthetic corpus: {len(corpus.templates)} modes, true entropy rate {corpus.entropy_rate():.4f} nats/token")
    log = RunLog(c, iter_num, ckpt is not None) if master else None  # out_dir changes at its first row

    # ---- the training loop
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tokens_per_iter = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps'] * world
    cuda = device.startswith('cuda')
    peak = peak_flops(torch.cuda.get_device_name(device)) if cuda else None  # for MFU (a CPU's peak: unknown)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked at evals: no host sync per step
    t_start = t_log = time.time()
    iter_start, steps_timed = iter_num, 0
    while True:
        # ---- eval and checkpoint: losses on fixed batches, a Def. 3.1 record, the checkpoint
        logged_by_saver = ckpt is not None and iter_num == iter_start  # the run that saved it logged this eval
        if (iter_num % c['eval_interval'] == 0 or iter_num == c['max_iters']) and not logged_by_saver:
            losses = estimate_loss(model, {'train': train_ids, 'val': val_ids}, c, tok, device, ctx)
            if nonfinite.item() or not all(math.isfinite(v) for v in losses.values()):
                stop_nonfinite(iter_num, c)
            diag = diagnostics.record(iter_num, param_norm(params).item(), float(latest['grad_norm']),
                                      float(latest['update_norm']), latest['losses'])
            latest['eval'] = eval_row(diag, losses, data, c)  # the report's too: its val_loss and val_bpb
            if master:
                log.write(latest['eval'])
            if iter_num > iter_start:
                save_checkpoint(checkpoint_path(c), raw_model, optimizer, psu, baara, diagnostics, data_gen,
                                iter_num, latest, tok, c)
            t_log, steps_timed = time.time(), 0  # eval time is not training throughput
        if iter_num == c['max_iters']:
            break

        # ---- one step (train_step): forward, PSU feedback, backward, BAARA's action, AdamW, PSU's pull
        lr = get_lr(iter_num, c)
        logged_step = iter_num % c['log_interval'] == 0
        loss, latest['grad_norm'], update, logits, y = train_step(
            model, optimizer, lambda: batch(train_ids, c, tok, data_gen, device), lr, psu, baara,
            c['gradient_accumulation_steps'], c['grad_clip'], ctx, measure=logged_step)
        nonfinite |= ~torch.isfinite(loss.detach())
        steps_timed += 1

        # ---- log: this step's numbers (a host sync, so every log_interval steps only)
        if logged_step:
            latest['update_norm'] = update
            lossf = loss.item()
            if not math.isfinite(lossf):
                stop_nonfinite(iter_num, c)
            latest['losses'] = (latest['losses'] + [lossf])[-50:]
            now = time.time()
            tok_s = tokens_per_iter * steps_timed / (now - t_log)
            done = iter_num + 1 - iter_start  # an ETA from fewer steps (warm-up, compile, first eval) misleads
            eta = {'eta_s': round((now - t_start) / done * (c['max_iters'] - iter_num - 1))} if done >= 5 else {}
            t_log, steps_timed = now, 0
            if master:
                log.write(dict(iter=iter_num, loss=lossf, lr=lr, tok_per_s=round(tok_s), **eta,
                               **logged_numbers(latest['grad_norm'], update, logits, y, psu, baara),
                               **({'mfu': raw_model.estimate_mfu(tok_s / world, peak)} if peak else {}),
                               **({'peak_mem_gib': torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {})))
        iter_num += 1

    # ---- end of run: samples and metrics, on rank 0 alone
    t_end = time.time()
    if c['fsdp']:
        raw_model = distributed.unsharded(raw_model, config, device)
    if master:
        log.close()
        finish(raw_model, data, diagnostics, latest['eval'], iter_num, c, device, ctx)
        end_s = time.time() - t_end
        print(f"time: training loop {t_end - t_start:.0f} s, end of run {end_s:.0f} s ({end_s / (time.time() - t_start):.0%})")
    distributed.teardown()


def load_gpt2(c):
    """init_from=PATH: GPT-2's weights -> their state dict; GPT-2's tokenizer and shape go into c (for a resume)."""
    if not os.path.exists(c['init_from']):  # a typo of 'resume' too
        raise SystemExit(f"error: init_from={c['init_from']!r} does not exist (init_from: scratch, resume or a file of GPT-2 weights)")
    weights = load_checkpoint(c['init_from'])
    if isinstance(weights, dict) and {'model_args', 'config', 'tokenizer'} <= set(weights):  # save_checkpoint's
        raise SystemExit(f"error: init_from={c['init_from']!r} is a checkpoint of train.py, not GPT-2 weights; to "
                         f"continue that run use --init_from=resume --out_dir={os.path.dirname(c['init_from']) or '.'}")
    if c['tokenizer'] not in ('auto', 'gpt2'):
        raise SystemExit("error: GPT-2 weights need tokenizer=gpt2 (the full 50257-token vocabulary)")
    c['tokenizer'] = 'gpt2'
    args, state = load_gpt2_state_dict(weights)
    if args.vocab_size < 50257:
        raise SystemExit(f"error: init_from={c['init_from']!r} has {args.vocab_size} token embeddings; GPT-2 "
                         f"weights have 50257 (or a padded 50304)")
    if c['block_size'] > args.block_size:
        raise SystemExit(f"error: block_size={c['block_size']} is more than the {args.block_size} positions of "
                         f"init_from={c['init_from']!r}; use --block_size={args.block_size} or less")
    for key in ('n_layer', 'n_head', 'n_embd', 'bias'):
        if c[key] not in (None, getattr(args, key)):  # given (get_config left the others None)
            raise SystemExit(f"error: {key}={c[key]!r} is not the shape of init_from={c['init_from']!r} ({key}="
                             f"{getattr(args, key)!r}); leave it out, the weights set it")
        c[key] = getattr(args, key)
    return state


def eval_row(diag, losses, data, c):
    """An eval's log row: Def. 3.1's record, the losses, and for a GPT the validation loss in bits
    per byte (comparable across tokenizers; BERT's loss covers the masked tokens only) and, on the
    synthetic corpus with its own words, the true entropy rate the loss can reach."""
    row = dict(**diag, train_loss=losses['train'], val_loss=losses['val'])
    if c['model'] == 'gpt':
        row['val_bpb'] = data.bits_per_byte(losses['val'])
        if data.corpus is not None and data.tok.name == 'word':
            row['entropy_rate'] = data.corpus.entropy_rate()
    return row


def model_config(c, vocab_size):
    """This run's GPTConfig (GPT-2's shape for GPT-2 weights: load_gpt2 put it in c), DMU/DTU included."""
    keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'dropout', 'dmu_p', 'dmu_mode', 'dtu_r')
    return GPTConfig(vocab_size=vocab_size, causal=c['model'] == 'gpt', **{k: c[k] for k in keys})


def build_model(config, state, source, c, world, rank):
    """The model on its device, loaded from `state` (read from the file `source`) or freshly
    initialised when state is None. Under FSDP it is built sharded: no rank holds the whole model."""
    if state is not None:  # GPT-2's tables cropped: positions to block_size (as nanoGPT), tokens to the tokenizer's
        rows = {'transformer.wpe.weight': config.block_size, 'transformer.wte.weight': config.vocab_size,
                'lm_head.weight': config.vocab_size}  # (nanoGPT pads GPT-2's 50257 to 50304)
        state = {k: v[:rows[k]] if k in rows else v for k, v in state.items()}
    if not c['fsdp']:
        model = GPT(config)
        if state is not None:
            load_model_state(model, state, source)
        return model.to(c['device'])
    return distributed.build_fsdp(config, c['device'], world, c['dtype'], state, c['seed'] + rank)


# -----------------------------------------------------------------------------
# checkpoints: all that the next steps read, so that a resumed run continues as the unbroken one

def fresh_latest():
    """What the next Def. 3.1 record reads: the last 50 logged losses, the latest ||g|| and logged update norm;
    and the last eval's log row, for the report."""
    return dict(losses=[], grad_norm=torch.zeros(()), update_norm=torch.zeros(()), eval=None)


def rng_states(data_gen, device):
    return dict(data=data_gen.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.startswith('cuda') else None)  # DMU/DTU on the GPU


def save_checkpoint(path, model, optimizer, psu, baara, diagnostics, data_gen, iter_num, latest, tok, c):
    """Every rank calls it: each rank's RNGs and PSU reference are gathered (each rank draws its own
    batches), and under FSDP the shards; rank 0 writes one file, atomically."""
    master = distributed.is_rank0()
    psu_state = psu.state_dict(saving=master)                              # collectives under FSDP
    baara_state = baara.state_dict(saving=master) if baara else None
    ranks = distributed.gather_objects(dict(rng=rng_states(data_gen, c['device']),
                                            psu={k: psu_state[k] for k in ('ref', 'var')}))
    model_state, optim_state = distributed.whole_state_dicts(model, optimizer)
    if not master:
        return
    ckpt = dict(model=model_state, optimizer=optim_state, config=c, model_args=asdict(model.config),
                tokenizer=tok.state(), iter_num=iter_num, ranks=ranks, psu={'ema': psu_state['ema']},
                baara=baara_state, diagnostics=diagnostics.state_dict(),
                latest=dict(losses=latest['losses'], grad_norm=float(latest['grad_norm']),
                            update_norm=float(latest['update_norm']), eval=latest['eval']))
    torch.save(ckpt, path + '.tmp')
    os.replace(path + '.tmp', path)  # atomic: a crash never leaves half a checkpoint


def restore_checkpoint(ckpt, model, optimizer, psu, baara, diagnostics, data_gen, device, rank):
    """save_checkpoint's mirror (the model's weights are loaded when it is built). -> (iter_num, latest)."""
    distributed.load_optimizer(model, optimizer, ckpt['optimizer'])  # with its groups' settings: unfused stays so
    mine = ckpt['ranks'][rank]
    psu.load_state_dict({**ckpt['psu'], **mine['psu']})
    if baara and ckpt['baara'] is not None:  # BAARA switched on at resume starts afresh
        baara.load_state_dict(ckpt['baara'])
    diagnostics.load_state_dict(ckpt['diagnostics'])
    data_gen.set_state(mine['rng']['data'])
    torch.set_rng_state(mine['rng']['torch'])
    if mine['rng']['cuda'] is not None and device.startswith('cuda'):
        torch.cuda.set_rng_state(mine['rng']['cuda'], device)
    return ckpt['iter_num'], {'eval': None, **ckpt['latest'], 'losses': list(ckpt['latest']['losses'])}


def stop_nonfinite(iter_num, c):
    raise SystemExit(f"error: the loss became NaN or infinite by iter {iter_num}; stopped, and the last good "
                     f"checkpoint in {c['out_dir']!r} is untouched")


def finish(model, data, diagnostics, evaluation, iter_num, c, device, ctx):
    """End of run: samples.txt, and report.json: which run (config, iteration, decoder), its metrics, Def. 3.1's verdict,
    and its last eval's losses (`evaluation`: the log's row, None from a checkpoint older than this key)."""
    decoder = {k: c[k] for k in ('temperature', 'top_k', 'top_p')}
    with ctx:
        texts = sample_texts(model, data.tok, c['num_samples'], c['sample_tokens'], device=device, seed=c['seed'], **decoder)
    write_atomic(os.path.join(c['out_dir'], 'samples.txt'), '\n=====\n'.join(texts))
    verdict = diagnostics.verdict()
    metrics = sample_metrics(model, data, texts, decoder, c['batch_size'], c['dist_samples'], device, c['seed'], ctx)
    losses = {k: v for k, v in (evaluation or {}).items() if k in ('train_loss', 'val_loss', 'val_bpb', 'entropy_rate')}
    report = dict(config=c, iter_num=iter_num, decoder=decoder, stability=verdict, losses=losses, metrics=metrics)
    write_atomic(os.path.join(c['out_dir'], 'report.json'), json.dumps(report, indent=1))
    print(summary(metrics))
    print(f"stability: {verdict['verdict']}; {len(texts)} samples in {c['out_dir']}/samples.txt, e.g.:")
    print('\n'.join('  ' + t.strip().replace('\n', ' / ')[:100] for t in texts[:3]))


if __name__ == '__main__':
    main(sys.argv[1:])
