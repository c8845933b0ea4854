"""
Train a GPT-2 or BERT, optionally stabilised by PSU, on the embedded synthetic corpus or a text.

    python train.py                          # tiny GPT-2, synthetic corpus, CPU, ~4 minutes
    python train.py config/table62.py --psu_lambda=0.2 --seed=2026
    torchrun --standalone --nproc_per_node=2 train.py --device=cpu
    torchrun --standalone --nproc_per_node=8 train.py --size=gpt2-1b --fsdp=True   # sharded, bf16

Every key below can be set by a config file or --key=value; configurator.py checks each value
against the rule beside its default. Keys share nanoGPT's names where nanoGPT has the same knob.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

from configurator import DEVICE, exit_if_help, train_config

# name -> (n_layer, n_head, n_embd): the parameter count is in the name; bert-*: bidirectional
SIZES = {'tiny': (4, 4, 128), 'gpt2': (12, 12, 768), 'gpt2-1b': (18, 16, 2048),
         'gpt2-2b': (24, 20, 2560), 'gpt2-3b': (36, 20, 2560), 'bert-1b': (18, 16, 2048)}

# key=(default, valid values): the rules are configurator.py's, and --help prints both
KEYS = dict(
    # I/O; init_from: scratch, resume (from out_dir) or a path to GPT-2 weights
    out_dir=('out', 'PATH'), eval_interval=(100, '>= 1'), log_interval=(10, '>= 1'),
    eval_iters=(20, '>= 1'), init_from=('scratch', 'scratch | resume | PATH'),
    # data: synthetic (embedded, no file) or a UTF-8 text file or a folder of bins (data.py);
    # tokenizer auto: word for synthetic, gpt2-compact for files; SyntheticCorpus's knobs (README)
    data=('synthetic', 'synthetic | PATH'),
    tokenizer=('auto', 'auto | word | char | gpt2 | gpt2-compact'),
    n_sentences=(150_000, '>= 1'), synthetic_modes=(64, '>= 1'), synthetic_zipf=(1.1, '>= 0'),
    synthetic_class_scale=(1, '>= 1'),
    # model: gpt (causal LM) or bert (masked LM); a size from SIZES (n_layer/... given win);
    # DMU keeps MLP units with retention dmu_p (1: off), DTU a share dtu_r of head dims (1: off)
    model=('gpt', 'gpt | bert'), size=('tiny', ' | '.join(SIZES)),
    n_layer=(4, '>= 1'), n_head=(4, '>= 1'), n_embd=(128, '>= 1'), block_size=(64, '>= 1'),
    dropout=(0.0, '[0, 1)'), bias=(True, 'any'),
    dmu_p=(1.0, '(0, 1]'), dmu_mode=('fix', 'prob | fix | edge'), dtu_r=(1.0, '(0, 1]'),
    # optimiser: AdamW, linear warmup then cosine decay to min_lr at lr_decay_iters
    batch_size=(32, '>= 1'), gradient_accumulation_steps=(1, '>= 1'), max_iters=(1000, '>= 0'),
    learning_rate=(3e-3, '> 0'), weight_decay=(0.1, '>= 0'), beta1=(0.9, '[0, 1)'),
    beta2=(0.99, '[0, 1)'), grad_clip=(1.0, '>= 0'),
    warmup_iters=(50, '>= 0'), lr_decay_iters=(1000, '>= 0'), min_lr=(3e-4, '>= 0'),
    # PSU (stabilize.py): gain lambda, its channels (both: stats+params; data: the model's own
    # text fed back, the stream rewritten every psu_data_every steps), the EMAs' decay
    psu_lambda=(0.0, '[0, 1]'), psu_beta=(0.99, '[0, 1]'), psu_data_every=(50, '>= 1'),
    psu_channels=('both', 'stats | params | both | data | stats+data | params+data | both+data'),
    # BAARA (baara.py): a policy picks each step's lr factor, update scope and DMU/DTU keep
    # ratios; C_b from measured step times, or flops (deterministic, reproducible)
    baara=(False, 'any'), baara_cost=('time', 'time | flops'),
    # end of run: samples and metrics in out_dir; dist_samples: sentences for Thm 5.5's metrics
    # (eval_dist_samples at each eval; 0: none); the decoder of the samples, the metrics and
    # PSU's data channel (temperature 0: greedy; top_k 0: off; top_p 1: no nucleus)
    num_samples=(200, '>= 1'), sample_tokens=(64, '>= 1'), dist_samples=(5000, '>= 2'),
    eval_dist_samples=(500, '[0, 1e9]'),
    temperature=(1.0, '>= 0'), top_k=(0, '>= 0'), top_p=(1.0, '(0, 1]'),
    # system: device auto is cuda where torch sees a GPU; dtype auto is bfloat16 on a GPU with
    # native bf16; fsdp shards under torchrun; overwrite: a fresh run may replace out_dir's run
    device=('auto', DEVICE), dtype=('auto', 'auto | float32 | bfloat16'), compile=(False, 'any'),
    seed=(1337, '[0, 1e18]'),  # seed + rank, + 7: torch's seeds end at 2^64
    fsdp=(False, 'any'), overwrite=(False, 'any'),
)
DEFAULTS = {key: default for key, (default, _) in KEYS.items()}
VALID = {key: rule for key, (_, rule) in KEYS.items()}

if __name__ == '__main__':  # before torch is imported, so that --help answers at once
    exit_if_help(sys.argv[1:], __doc__, DEFAULTS, VALID)

import torch

import distributed
from baara import BAARA
from checkpoint import fresh_latest, load_run, restore_checkpoint, resumed_config, save_checkpoint
from data import get_batch
from metrics import exact_metrics, predictive_entropy
from model import mask_id, mask_tokens
from runfolder import RunLog, Stop, checkpoint_path, run_folder, stop_nonfinite, write_atomic
from sample import sample_metrics, sample_texts
from stabilize import PSU, Diagnostics, FedBack, param_norm
from tables import summary


def get_config(argv):
    """DEFAULTS <- (a resumed run's config) <- config file <- --key=value, checked once merged."""
    return train_config(argv, DEFAULTS, VALID, SIZES, resumed_config)


def get_lr(it, c):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < c['warmup_iters']:
        return c['learning_rate'] * (it + 1) / (c['warmup_iters'] + 1)
    if it > c['lr_decay_iters']:
        return c['min_lr']
    ratio = (it - c['warmup_iters']) / max(1, c['lr_decay_iters'] - c['warmup_iters'])
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # from 1 down to 0
    return c['min_lr'] + coeff * (c['learning_rate'] - c['min_lr'])


def batch(ids, c, tok, generator, device, fed_back=None):
    """A training or eval batch: next-token pairs for GPT, masked-LM pairs for BERT. fed_back:
    PSU's data channel, whose windows of the model's own text replace some rows."""
    fed = fed_back.fed_rows if fed_back else 0
    x, y = get_batch(ids, c['batch_size'] - fed, c['block_size'], generator, device)  # (B, T) each
    if fed:  # PSU's data channel: the last `fed` rows are the model's own text
        x, y = (torch.cat(pair) for pair in zip((x, y), fed_back.windows(device)))
    if c['model'] == 'bert':  # [MASK]: BERT's one extra id
        x, y = mask_tokens(x, mask_id(tok.vocab_size + 1), tok.vocab_size)
    return x, y


@torch.no_grad()
def estimate_loss(model, splits, c, tok, device, ctx):
    """Mean loss over eval_iters batches of each split; the same batches at every eval."""
    model.eval()
    out, gpu = {}, [torch.cuda.current_device()] if device.startswith('cuda') else []
    for name, ids in splits.items():
        gen = torch.Generator().manual_seed(c['seed'] + 7)
        # BERT's eval masks come from a fixed seed; forking leaves the training RNGs alone
        with torch.random.fork_rng(devices=gpu):
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
    """One optimisation step, the one the loop below, bench.py and theorem_b1.py take: next_batch()
    -> (x, y) once per micro-step; grad_clip 0: no clipping; measure (logged steps): also the update
    norm (else None) and PSU's pull. -> the last micro-batch's loss (PSU's feedback included), ||g||
    before clipping, the update norm, the micro-batch's logits and targets."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    if baara:
        baara.start()  # the clock for C_b (eq. 63)

    # forward, PSU's statistics feedback (eq. 61), backward: gradients add up over micro-batches
    for micro_step in range(accum):
        distributed.sync_gradients(model, micro_step == accum - 1)
        x, y = next_batch()
        with ctx:
            logits, loss = model(x, y)  # logits (B, T, V)
            feedback = psu.feedback_loss(logits, y) if psu and psu.stats_on else None  # eq. 61
            if baara:  # H_b (eq. 67): PSU's statistics channel has it already when on
                baara.observe(logits, y, loss, None if feedback is None else psu.last['stats'][0])
            if feedback is not None:
                loss = loss + feedback
        (loss / accum).backward()

    # BAARA's action (eq. 69): lr = alpha_b * eta and the inactive blocks' gradients dropped
    if baara:
        baara.act(optimizer, lr)
    # clip, then AdamW; a logged step takes the same step, bit for bit, also measuring Def. 3.1's
    # ||theta_t - theta_{t-1}|| (PSU's pull to come included) without a parameter copy
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
    update = distributed.step_measuring_update(optimizer, psu) if measure else optimizer.step()
    if baara:
        baara.finish()  # v_b (eq. 65), read by the next step's act()
    optimizer.zero_grad(set_to_none=True)

    # PSU's parameter channel: theta <- theta + lambda * (theta_bar - theta)
    if psu and psu.params_on:
        psu.pull(measure=measure)
    return loss, grad_norm, update, logits, y


def logged_numbers(grad_norm, update, logits, y, psu, baara=None):
    """A logged step's numbers (host syncs): entropy (Fig. 3), ||g||, update norm, PSU's, BAARA's"""
    entropy = psu.last['stats'][0] if psu.stats_on else predictive_entropy(logits, y != -1)
    return dict(entropy=entropy.item(), grad_norm=grad_norm.item(), update_norm=update.item(),
                **psu.log(), **(baara.log() if baara else {}))


def main(argv):
    c = get_config(argv)
    rank, world, c['device'] = distributed.setup(c['device'], c['fsdp'])
    # out_dir/.lock held to the end (a used folder is refused); Ctrl-C and SIGTERM stop cleanly
    with run_folder(c, rank == 0), Stop(c, world) as stop:
        run(c, rank, world, stop)


def run(c, rank, world, stop):
    """One run, in phases: data and model, the training loop, the end-of-run samples and report."""
    device, master, resumed = c['device'], rank == 0, c['init_from'] == 'resume'
    torch.manual_seed(c['seed'] + rank)  # DMU/DTU draws, dropout, BERT's masks
    ctx = distributed.autocast_context(c['dtype'], device)
    data, raw_model, optimizer, psu, baara, diagnostics, data_gen, iter_num, latest = setup(
        c, rank, world, ctx)
    model = distributed.wrap_ddp(torch.compile(raw_model) if c['compile'] else raw_model, device)
    log = RunLog(c, iter_num, resumed) if master else None  # out_dir changes at its first row
    next_batch = lambda: batch(data.train, c, data.tok, data_gen, device, psu.fed_back)  # noqa
    splits = {'train': data.train, 'val': data.val}
    params = [p for p in raw_model.parameters() if p.requires_grad]
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # read at evals: no sync per step
    clock, iter_start = distributed.Throughput(c, world, iter_num), iter_num
    while True:
        # eval and checkpoint: losses on fixed batches, a Def. 3.1 record, the checkpoint
        logged_by_saver = resumed and iter_num == iter_start  # the saving run logged this eval
        eval_now = iter_num % c['eval_interval'] == 0 or iter_num == c['max_iters']
        if eval_now and not logged_by_saver:
            losses = estimate_loss(model, splits, c, data.tok, device, ctx)
            if nonfinite.item() or not all(math.isfinite(v) for v in losses.values()):
                stop_nonfinite(iter_num, c)
            diag = diagnostics.record(iter_num, param_norm(params).item(),
                                      float(latest['grad_norm']), float(latest['update_norm']),
                                      latest['losses'])
            latest['eval'] = eval_row(diag, losses, data, c, raw_model, ctx)  # the report's too
            if master:
                log.write(latest['eval'])
            if iter_num > iter_start:
                save_checkpoint(checkpoint_path(c), raw_model, optimizer, psu, baara, diagnostics,
                                data_gen, iter_num, latest, data.tok, c)
            clock.restart(iter_num)  # eval time is not training throughput
        # stop: the last step, or a Ctrl-C or SIGTERM on any rank (every rank stops here)
        if iter_num == c['max_iters'] or stop.agreed():
            break

        # one step: PSU's data channel (the stream rewritten when due), forward, PSU's feedback,
        # backward, BAARA's action, AdamW, PSU's pull
        if psu.fed_back:
            psu.fed_back.refresh(raw_model, iter_num)
        lr = get_lr(iter_num, c)
        logged_step = iter_num % c['log_interval'] == 0
        loss, latest['grad_norm'], update, logits, y = train_step(
            model, optimizer, next_batch, lr, psu, baara, c['gradient_accumulation_steps'],
            c['grad_clip'], ctx, measure=logged_step)
        nonfinite |= ~torch.isfinite(loss.detach())

        # log: this step's numbers (a host sync, so every log_interval steps only)
        if logged_step:
            latest['update_norm'], lossf = update, loss.item()
            if not math.isfinite(lossf):
                stop_nonfinite(iter_num, c)
            latest['losses'] = (latest['losses'] + [lossf])[-50:]
            speed, load = clock.lap(iter_num, raw_model)
            if master:
                numbers = logged_numbers(latest['grad_norm'], update, logits, y, psu, baara)
                log.write(dict(iter=iter_num, loss=lossf, lr=lr, **speed, **numbers, **load))
        iter_num += 1

    # a signal's stop: every rank saves (one collective checkpoint), then the one line
    if iter_num < c['max_iters']:
        save_checkpoint(checkpoint_path(c), raw_model, optimizer, psu, baara, diagnostics, data_gen,
                        iter_num, latest, data.tok, c)
        if master:
            log.close()
        stop.exit(iter_num, master)

    # end of run: samples and metrics, on rank 0 alone (a signal now stops at once)
    t_end = time.time()
    stop.end_phase()
    if c['fsdp']:
        raw_model = distributed.unsharded(raw_model, raw_model.config, device)
    if master:
        log.close()
        finish(raw_model, data, diagnostics, latest['eval'], iter_num, c, device, ctx)
        end_s, total_s = time.time() - t_end, time.time() - clock.t_start
        print(f"time: training loop {t_end - clock.t_start:.0f} s, end of run {end_s:.0f} s "
              f"({end_s / total_s:.0%})")
    distributed.teardown()


def setup(c, rank, world, ctx):
    """The run's data, model, AdamW, PSU, BAARA and Def. 3.1's records: from scratch, from GPT-2's
    weights, or resumed from out_dir with every state the checkpoint holds (checkpoint.py)."""
    data, raw_model, ckpt = load_run(c, world, rank)
    optimizer = raw_model.configure_optimizers(c['weight_decay'], c['learning_rate'],
                                               (c['beta1'], c['beta2']), c['device'].split(':')[0])
    fed_back = FedBack(c['psu_lambda'], c, data.tok, rank, ctx)  # PSU's data channel, if on
    psu = PSU(raw_model.parameters(), c['psu_lambda'], c['psu_beta'], c['psu_channels'],
              data.tok.eot, fed_back)
    reference = lambda g: batch(data.train, c, data.tok, g, c['device'])  # noqa: E731 BAARA's g_ref
    baara = None
    if c['baara']:
        baara = BAARA(raw_model, data.token_counts, c['seed'], reference, c['baara_cost'], ctx)
    diagnostics = Diagnostics()
    data_gen = torch.Generator().manual_seed(c['seed'] + rank)  # which windows this rank trains on
    iter_num, latest = 0, fresh_latest()
    if ckpt is not None:
        iter_num, latest = restore_checkpoint(ckpt, raw_model, optimizer, psu, baara, diagnostics,
                                              data_gen, c['device'], rank)
    return data, raw_model, optimizer, psu, baara, diagnostics, data_gen, iter_num, latest


def eval_row(diag, losses, data, c, model, ctx):
    """An eval's log row: Def. 3.1's record, the losses, and for a GPT the validation loss in bits
    per byte (comparable across tokenizers; BERT's loss covers the masked tokens only) and, on the
    synthetic corpus with its own words, the true entropy rate the loss can reach and Theorem 5.5's
    exact metrics on eval_dist_samples sentences (metrics.exact_metrics: their trajectory)."""
    row = dict(**diag, train_loss=losses['train'], val_loss=losses['val'])
    if c['model'] == 'gpt':
        row['val_bpb'] = data.bits_per_byte(losses['val'])
        if data.corpus is not None and data.tok.name == 'word':
            row['entropy_rate'] = data.corpus.entropy_rate()
            row.update(exact_metrics(model, data, c, ctx) if c['eval_dist_samples'] else {})
    return row


def finish(model, data, diagnostics, evaluation, iter_num, c, device, ctx):
    """End of run: samples.txt, and report.json: which run (config, iteration, decoder), its
    metrics, Def. 3.1's verdict, the last eval (`evaluation`, the log's row; None: old ckpt)"""
    decoder = {k: c[k] for k in ('temperature', 'top_k', 'top_p')}
    with ctx:
        texts = sample_texts(model, data.tok, c['num_samples'], c['sample_tokens'], device=device,
                             seed=c['seed'], **decoder)
    write_atomic(os.path.join(c['out_dir'], 'samples.txt'), '\n=====\n'.join(texts))
    verdict = diagnostics.verdict()
    metrics = sample_metrics(model, data, texts, decoder, c['batch_size'], c['dist_samples'],
                             device, c['seed'], ctx)
    # the last eval's row less Def. 3.1's record (reported as `stability`): all that eval measured
    losses = {k: v for k, v in (evaluation or {}).items() if k not in diagnostics.records[-1]}
    report = dict(config=c, iter_num=iter_num, decoder=decoder, stability=verdict, losses=losses,
                  metrics=metrics)
    write_atomic(os.path.join(c['out_dir'], 'report.json'), json.dumps(report, indent=1))
    print(summary(metrics))
    where = os.path.join(c['out_dir'], 'samples.txt')
    print(f"stability: {verdict['verdict']}; {len(texts)} samples in {where}, e.g.:")
    print('\n'.join('  ' + t.strip().replace('\n', ' / ')[:100] for t in texts[:3]))


if __name__ == '__main__':
    main(sys.argv[1:])
