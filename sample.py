"""
Sample from a trained model: python sample.py --out_dir=out [--num_samples=5 --top_k=40 ...]

GPT samples autoregressively: greedy at temperature 0, else temperature, top-k and top-p
(nucleus). BERT fills a row of [MASK] by iterative mask-predict. The tokenizer comes from the
checkpoint: no data file is needed. With --metrics=True it prints nothing per sample but writes
RUN/samples-<decoder>.txt and RUN/metrics-<decoder>.json (decoder e.g. t1.0-k0-p0.9): train.py's
report.json metrics for this decoder, the data rebuilt from the checkpoint's config.
"""
import json
import os
import sys
import time
from contextlib import nullcontext

from configurator import DEVICE, auto_device, exit_if_help, parse_flags, validate

# key=(default, valid values), as train.py's; device auto: cuda where torch sees a GPU, else cpu
KEYS = dict(out_dir=('out', 'PATH'), num_samples=(5, '>= 1'), max_new_tokens=(64, '>= 1'),
            temperature=(1.0, '>= 0'), top_k=(0, '>= 0'), top_p=(1.0, '(0, 1]'), start=('', 'any'),
            mask_steps=(10, '>= 1'), seed=(1337, '[0, 1e18]'), metrics=(False, 'any'),
            dist_samples=(5000, '>= 2'), device=('auto', DEVICE))
DEFAULTS = {key: default for key, (default, _) in KEYS.items()}
VALID = {key: rule for key, (_, rule) in KEYS.items()}

if __name__ == '__main__':  # before torch is imported, so that --help answers at once
    exit_if_help(sys.argv[1:], __doc__, DEFAULTS, VALID)

import torch

from checkpoint import load_trained
from data import load_run_data, tokenizer_from_state
from model import mask_id
from runfolder import write_atomic


def sample_texts(model, tok, *args, **kwargs):
    """n generated texts: sample_ids' rows, decoded (the same arguments)."""
    return [tok.decode(row) for row in sample_ids(model, tok, *args, **kwargs)]


@torch.no_grad()
def sample_ids(model, tok, n, max_new_tokens, temperature=1.0, top_k=0, start='', mask_steps=10,
               device='cpu', seed=1337, batch_size=100, top_p=1.0):
    """n generated rows of token ids. GPT continues `start` (default: end-of-text, or a newline
    when the tokenizer has none: prompt_ids); temperature 0 is greedy, top_p < 1 keeps the
    nucleus. BERT fills max_new_tokens [MASK] positions with the same decoder. Seeded and
    repeatable. Runs of several batches taking over 2 s print their progress to stderr."""
    prompt = prompt_ids(tok, start) if model.config.causal else None  # every batch starts from it
    was_training = model.training
    model.eval()
    top_k = top_k or None
    rows = []
    t0 = time.perf_counter()
    # the caller's RNGs stay as they were
    with torch.random.fork_rng(devices=[device] if device.startswith('cuda') else []):
        torch.manual_seed(seed)
        for i in range(0, n, batch_size):
            size = min(batch_size, n - i)
            if model.config.causal:
                idx = torch.tensor([prompt] * size, dtype=torch.long, device=device)
                out = model.generate(idx, max_new_tokens, temperature, top_k, top_p=top_p)
                out = out[:, len(prompt):]  # (size, max_new_tokens)
            else:
                mask = mask_id(model.config.vocab_size)
                length = min(max_new_tokens, model.config.block_size)
                idx = torch.full((size, length), mask, dtype=torch.long, device=device)
                out = model.generate_masked(idx, mask, mask_steps, temperature, top_k, top_p)
            rows += out.tolist()
            progress(len(rows), n, time.perf_counter() - t0, n > batch_size)
    model.train(was_training)
    return rows


def prompt_ids(tok, start):
    """GPT's prompt: `start`, else end-of-text, else a newline (text files' tokenizers have no
    end-of-text), else token 0 (the vocabulary of a text without a newline has none)."""
    if tok.eot is not None and not start:
        return [tok.eot]
    try:
        ids = tok.encode(start or '\n')
    except KeyError as e:  # a tokenizer's word for "not in this vocabulary"
        if not start:
            return [0]
        raise SystemExit(f"error: start={start!r} has {e}, which is not in this checkpoint's "
                         f"{tok.name} vocabulary")
    if not ids:  # a word tokenizer's spaces
        raise SystemExit(f"error: start={start!r} is no token of this checkpoint's {tok.name} "
                         f"vocabulary")
    return ids


def progress(done, n, elapsed, several_batches):
    """`sampling: 100/200 samples, eta 12s` on stderr after a batch, for runs of several batches
    over 2 s; the last line gives the total time."""
    if several_batches and elapsed > 2:
        end = f", eta {elapsed / done * (n - done):.0f}s" if done < n else f" in {elapsed:.0f}s"
        print(f"sampling: {done}/{n} samples{end}", file=sys.stderr, flush=True)


def main(argv):
    c, _ = parse_flags(DEFAULTS, argv, VALID)
    validate(c, VALID)
    c['device'] = auto_device(c['device'])
    path = f"{c['out_dir']}/ckpt.pt"
    ckpt, model = load_trained(path, c['device'])
    args = ckpt['model_args']
    bert = not args.get('causal', True)
    if bert and c['start']:
        raise SystemExit(f"error: start={c['start']!r} continues a GPT; {path!r} is a BERT, which "
                         f"fills [MASK] positions")
    if bert and c['max_new_tokens'] > args['block_size']:  # mask-predict fills one window
        raise SystemExit(f"error: max_new_tokens={c['max_new_tokens']} is more than the "
                         f"{args['block_size']} positions of the BERT in {path!r}; use "
                         f"--max_new_tokens={args['block_size']} or less")
    tok = tokenizer_from_state(ckpt['tokenizer'])
    texts = sample_texts(model, tok, c['num_samples'], c['max_new_tokens'], c['temperature'],
                         c['top_k'], c['start'], c['mask_steps'], c['device'], c['seed'],
                         top_p=c['top_p'])
    if c['metrics']:
        return write_metrics(model, ckpt, texts, c)
    for text in texts:
        print(text.rstrip('\n'))
        print('---------------')


def sample_metrics(model, data, texts, decoder, batch_size, n_dist, device, seed,
                   ctx=nullcontext()):
    """Every metric of a model and its sampled texts (metrics.evaluate), and on the synthetic
    corpus Theorem 5.5's (distribution_metrics, n_dist sentences, under decoder): train.py's
    report, and sample.py --metrics."""
    from metrics import distribution_metrics, evaluate  # here: plain sampling needs no metrics
    m = evaluate(model, data.tok, data.text, data.corpus, texts, data.val, batch_size=batch_size,
                 device=device, ctx=ctx, seed=seed, counts=data.word_counts)
    m.update(distribution_metrics(model, data.tok, data.corpus, data.train, data.val, n_dist,
                                  decoder=decoder, device=device, ctx=ctx, seed=seed))
    return m


def write_metrics(model, ckpt, texts, c):
    """--metrics=True: RUN/samples-<decoder>.txt and RUN/metrics-<decoder>.json, as train.finish."""
    from tables import summary  # here: plain sampling needs no metrics
    decoder = {k: c[k] for k in ('temperature', 'top_k', 'top_p')}
    name = f"t{c['temperature']}-k{c['top_k']}-p{c['top_p']}"
    run = ckpt['config']
    m = sample_metrics(model, load_run_data(run), texts, decoder, run['batch_size'],
                       c['dist_samples'], c['device'], run['seed'])
    write_atomic(os.path.join(c['out_dir'], f'samples-{name}.txt'), '\n=====\n'.join(texts))
    report = dict(decoder=decoder, iter_num=ckpt['iter_num'], metrics=m)
    write_atomic(os.path.join(c['out_dir'], f'metrics-{name}.json'), json.dumps(report, indent=1))
    print(summary(m))


if __name__ == '__main__':
    main(sys.argv[1:])
