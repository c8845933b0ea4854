"""
Speed of the paper's units, as ratios that hold on any machine, all from one run:

    python bench.py                          # about 7 minutes on 2 CPU cores (the logged rows: 3)
    python bench.py --steps=51               # steadier numbers
    python bench.py --threads=1              # on a machine shared with other jobs

Each row steps two training setups alternately (A, B, A, B, ...) and reports the median of B's
step time over that of the A step just before it, so that a busy machine, or one whose speed
drifts, slows both alike (denormal floats are flushed to zero meanwhile: timed() says why). A step
is train.train_step, the step train.py's loop takes: batch -> forward (+ PSU's feedback loss) ->
backward -> (BAARA's act) -> clip -> AdamW -> (BAARA's finish) -> (PSU's pull); two rows time a
logged step (every log_interval: train_step measuring, then train.logged_numbers) against an
unlogged one at GPT-2 124M, at LOGGED_SHAPES. One row trains from prepared bins (memory-mapped)
against the same tokens in memory; one line times data.prepare (GPT-2 BPE). Setups with periodic
work (BAARA's reference gradient every REF_EVERY steps) are timed over whole periods. The
sampling row steps train.py's end-of-run sampling instead, with and without the key/value cache;
the AdamW rows the optimiser step alone, fused against torch's default (foreach); with
--nanogpt=PATH to nanoGPT's model.py, one row steps our model against nanoGPT's at the same shape.
On a GPU it adds torch.compile against eager, tokens/s and MFU at GPT-2 size (124M, bf16).
"""
import importlib.util
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

from configurator import DEVICE, auto_device, auto_dtype, exit_if_help, parse_flags, validate

BENCH = dict(steps=25, warmup=3, seed=1337, metrics_words=1_000_000, distribution_n=5000,
             prepare_mb=10.0,  # MB of text for the data.prepare line
             threads=0,  # torch CPU threads; 0 = torch's default. On a shared machine 1 gives steadier ratios
             logged_size='gpt2',  # the logged / unlogged rows' model: GPT-2 124M (at LOGGED_SHAPES)
             nanogpt='',  # PATH to nanoGPT's model.py for the row against it ('' skips that row)
             device='auto',  # cuda where torch sees a GPU, else cpu
             dtype='auto')  # train.py's: bfloat16 on a GPU with native bf16, else float32
RULES = dict(steps='>= 1', warmup='>= 0', seed='[0, 1e18]', metrics_words='>= 1', distribution_n='>= 2', prepare_mb='> 0', threads='>= 0',
             logged_size='tiny | gpt2', nanogpt='any',  # nanogpt: '' or a .py file (load_nanogpt)
             device=DEVICE, dtype='auto | float32 | bfloat16')  # configurator.py's rules, as train.py's

# batch x block of the logged rows, and the goal: at a real batch (8 x 256: 2,048 tokens of 50k logits) the
# measuring costs at most 5%; a step as short as GPT-2 124M takes (1 x 64) shows its cost at least (no goal:
# eager torch's copy, subtraction and dot product of each piece of theta alone take ~0.1 s, over 10% of it)
LOGGED_SHAPES = (((8, 256), 1.05), ((1, 64), None))

if __name__ == '__main__':  # the config above comes before torch is imported, so that --help answers at once
    exit_if_help(sys.argv[1:], __doc__, BENCH, RULES)

import numpy as np
import torch

import distributed
import train
from baara import BAARA, REF_EVERY
from data import gpt2_encoding, load_data, prepare
from metrics import distribution_metrics, high_frequency_set, text_metrics
from model import GPT, MLP, GPTConfig
from stabilize import PSU, FedBack


class Setup:
    """One training configuration from train.py's DEFAULTS plus overrides, stepped as train.py steps."""

    def __init__(self, data, b, **over):
        self.c = c = {**train.DEFAULTS, 'device': b['device'], 'dtype': b['dtype'], **over}
        self.ids, self.tok = data
        self.device = c['device']
        device_type = 'cuda' if self.device.startswith('cuda') else 'cpu'
        self.ctx = distributed.autocast_context(c['dtype'], self.device)
        torch.manual_seed(b['seed'])  # A and B start from the same weights
        config = GPTConfig(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                           vocab_size=self.tok.vocab_size, bias=c['bias'], dropout=c['dropout'],
                           dmu_p=c['dmu_p'], dmu_mode=c['dmu_mode'], dtu_r=c['dtu_r'])
        self.model = GPT(config).to(self.device)
        self.optimizer = self.model.configure_optimizers(c['weight_decay'], c['learning_rate'],
                                                         (c['beta1'], c['beta2']), device_type)
        fed_back = FedBack(c['psu_lambda'], c, self.tok, 0, self.ctx)  # PSU's data channel, when on
        self.psu = PSU(self.model.parameters(), c['psu_lambda'], c['psu_beta'], c['psu_channels'], self.tok.eot,
                       fed_back)
        self.baara, self.period, self.iter = None, 1, 0
        if self.psu.fed_back:  # a sample spans the steps from one rewrite of the stream to the next
            self.period = c['psu_data_every']
        if c['baara']:
            reference = lambda g: train.batch(self.ids, c, self.tok, g, self.device)
            self.baara = BAARA(self.model, np.bincount(self.ids), c['seed'], reference, c['baara_cost'], self.ctx)
            self.period = REF_EVERY
        self.forward = torch.compile(self.model) if c['compile'] else self.model
        self.gen = torch.Generator().manual_seed(b['seed'])
        self.tokens = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']

    def step(self, logged=False):
        """train.py's step; logged: as on its logged steps, measuring, then the loss and train.logged_numbers."""
        c, fed_back = self.c, self.psu.fed_back
        if fed_back:  # as train.py's loop: the stream rewritten when due
            fed_back.refresh(self.model, self.iter)
        self.iter += 1
        loss, grad_norm, update, logits, y = train.train_step(
            self.forward, self.optimizer, lambda: train.batch(self.ids, c, self.tok, self.gen, self.device, fed_back),
            c['learning_rate'], self.psu, self.baara, c['gradient_accumulation_steps'], c['grad_clip'], self.ctx, logged)
        if logged:
            loss.item()
            train.logged_numbers(grad_norm, update, logits, y, self.psu, self.baara)


class Logged:
    """A Setup stepped as train.py's logged steps: paired with the Setup itself, the same model alternates."""

    def __init__(self, setup):
        self.setup, self.period, self.tokens = setup, setup.period, setup.tokens

    def step(self):
        self.setup.step(logged=True)


class AdamWSetup:
    """The optimiser step alone on train.py's AdamW groups, default (foreach) or fused: every step
    the same gradients (seeded; A and B build the same parameters) on a model of the given shape."""

    def __init__(self, b, fused, n_layer, n_embd, vocab):
        torch.manual_seed(b['seed'])
        self.model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, vocab_size=vocab)).to(b['device'])
        for p in self.model.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
        groups = self.model.configure_optimizers(0.1, 3e-3, (0.9, 0.99), 'cpu').param_groups
        self.optimizer = torch.optim.AdamW([dict(params=g['params'], weight_decay=g['weight_decay']) for g in groups],
                                           lr=3e-3, betas=(0.9, 0.99), fused=fused)
        self.period, self.tokens = 1, 0

    def step(self):
        self.optimizer.step()


class NanoGPTSetup:
    """nanoGPT's model.py at the tiny model's shape, stepped as its train.py steps (forward, backward,
    clip 1.0, its AdamW) on the same batches as Setup. Its MLP's GELU is exact (erf), ours tanh's."""

    def __init__(self, nano, data, b):
        d, (self.ids, tok) = train.DEFAULTS, data
        self.c = {**d, 'device': b['device']}
        torch.manual_seed(b['seed'])
        self.model = nano.GPT(nano.GPTConfig(n_layer=d['n_layer'], n_head=d['n_head'], n_embd=d['n_embd'], bias=d['bias'],
                                             block_size=d['block_size'], vocab_size=tok.vocab_size, dropout=0.0))
        self.model.to(b['device'])
        self.optimizer = self.model.configure_optimizers(d['weight_decay'], d['learning_rate'], (d['beta1'], d['beta2']),
                                                         b['device'].split(':')[0])
        self.tok, self.gen, self.period = tok, torch.Generator().manual_seed(b['seed']), 1
        self.tokens, self.ctx = d['batch_size'] * d['block_size'], distributed.autocast_context(b['dtype'], b['device'])

    def step(self):
        x, y = (t.contiguous() for t in train.batch(self.ids, self.c, self.tok, self.gen, self.c['device']))  # nanoGPT views them
        with self.ctx:
            _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.c['grad_clip'])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def load_nanogpt(path):
    """nanoGPT's model.py (--nanogpt) as a module, loaded by main() before the rows: a wrong path or file is a
    one-line error at once, not a traceback (or a skipped row) minutes later."""
    if not path.endswith('.py') or not os.path.isfile(path):
        raise SystemExit(f"error: nanogpt={path!r} is not an existing .py file (nanoGPT's model.py; '' skips its row)")
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    nano = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(nano)
    except Exception as e:  # its own error, in one line
        raise SystemExit(f"error: nanogpt={path!r} failed to import ({type(e).__name__}: {' '.join(str(e).split())})")
    if not hasattr(nano, 'GPT') or not hasattr(nano, 'GPTConfig'):
        raise SystemExit(f"error: nanogpt={path!r} has no GPT and GPTConfig: it is not nanoGPT's model.py")
    return nano


class MLPSetup:
    """The MLP of one GPT-2 block alone (768 -> 3072 -> 768), with its own AdamW step: where DMU
    acts, without the attention, embeddings and head that dilute its saving in a whole model."""

    def __init__(self, b, dmu_p, n_embd=768, tokens=2048):
        device = b['device']
        torch.manual_seed(b['seed'])
        self.mlp = MLP(GPTConfig(n_embd=n_embd, dmu_p=dmu_p, dmu_mode='fix')).to(device)
        self.optimizer = torch.optim.AdamW(self.mlp.parameters(), lr=1e-4, fused=True)  # as train.py's
        self.x = torch.randn(tokens // 64, 64, n_embd, device=device)
        self.ctx = distributed.autocast_context(b['dtype'], device)
        self.period, self.tokens = 1, tokens

    def step(self):
        with self.ctx:
            loss = self.mlp(self.x).float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.mlp.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class SamplingSetup:
    """train.py's end-of-run sampling (num_samples x sample_tokens) as sample_texts runs it, in
    batches of 100 rows from the end-of-text token, from the tiny model at fresh weights."""

    def __init__(self, data, b, use_cache):
        d, tok = train.DEFAULTS, data[1]
        torch.manual_seed(b['seed'])
        config = GPTConfig(n_layer=d['n_layer'], n_head=d['n_head'], n_embd=d['n_embd'], block_size=d['block_size'],
                           vocab_size=tok.vocab_size, bias=d['bias'])
        self.model = GPT(config).to(b['device']).eval()
        n = d['num_samples']
        self.prompts = [torch.full((min(100, n - i), 1), tok.eot, dtype=torch.long, device=b['device'])
                        for i in range(0, n, 100)]
        self.ctx = distributed.autocast_context(b['dtype'], b['device'])
        self.use_cache, self.new_tokens = use_cache, d['sample_tokens']
        self.period, self.tokens = 1, n * d['sample_tokens']

    def step(self):
        with self.ctx:
            for prompt in self.prompts:
                self.model.generate(prompt, self.new_tokens, use_cache=self.use_cache)


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timed(setups, b):
    """Seconds per step of each setup, one list per setup, stepped alternately; a sample spans one period.
    Denormal floats are flushed to zero meanwhile (on the CPU): it computes with them ~100x slower, and a
    model whose attention probabilities underflow, as the tiny model's do after a few hundred steps in
    SDPA's backward, would time how far it trained, not the unit (BAARA's row read 1.22 so, 1.07 flushed)."""
    period = max(s.period for s in setups)
    times = [[] for _ in setups]
    torch.set_flush_denormal(True)
    try:
        for i in range(b['warmup'] + b['steps']):
            for s, t in zip(setups, times):
                sync(b['device'])
                t0 = time.perf_counter()
                for _ in range(period):
                    s.step()
                sync(b['device'])
                if i >= b['warmup']:
                    t.append((time.perf_counter() - t0) / period)
    finally:
        torch.set_flush_denormal(False)  # torch's default, for whatever runs next in this process
    return times


def machine(b):
    cpu = platform.processor() or platform.machine()
    if os.path.exists('/proc/cpuinfo'):
        names = [l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    return (f"machine: {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
            f"torch {torch.__version__}, {gpu}; {b['dtype']} on {b['device']}")


def metrics_time(corpus, corpus_text, n_words):
    """Seconds of metrics.text_metrics (every text metric, modes included) on n_words generated-like
    words: samples of 16 sentences drawn from the synthetic corpus."""
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences += corpus.text(n_words // 4, seed=len(sentences) + 1).split('\n')
    texts, count = [], 0
    for i in range(0, len(sentences), 16):
        texts.append('\n'.join(sentences[i:i + 16]) + '\n')
        count += sum(len(s.split()) for s in sentences[i:i + 16])
        if count >= n_words:
            break
    hf = high_frequency_set(corpus_text)
    t0 = time.perf_counter()
    out = text_metrics(texts, hf, corpus)
    dt = time.perf_counter() - t0
    return f"{dt:.2f} s for {out['n_words'] / 1e6:.2f}M words in {len(texts):,} samples ({out['n_words'] / dt / 1e3:,.0f}k words/s)"


def distribution_time(model, tok, corpus, ids, val_ids, b):
    """Seconds of metrics.distribution_metrics (n sentences from the corpus and n sampled, scored, the training
    split's distinct sentences) for the tiny model at fresh weights: every sampled sentence runs to the cap."""
    t0 = time.perf_counter()
    out = distribution_metrics(model, tok, corpus, ids, val_ids, n=b['distribution_n'], device=b['device'], seed=b['seed'])
    return f"{time.perf_counter() - t0:.2f} s (forward KL {out['forward_kl']:.2f}, {out['n_distribution_samples']:,} samples)"


def bins_data(corpus_text, folder, chars=2_000_000):
    """(ids, tokenizer) twice, for the same training tokens: in memory (load_data of a text file, int32) and
    memory-mapped from bins that data.prepare made of that file (uint16). The file is the synthetic corpus's
    first `chars` characters (whole sentences), tokenized by characters, so both give one vocabulary and model."""
    path, out = os.path.join(folder, 'corpus.txt'), os.path.join(folder, 'bins')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(corpus_text[:corpus_text.rfind('\n', 0, chars) + 1])
    memory = load_data(path, 'char')
    prepare(path, out, tokenizer='char')
    bins = load_data(out, 'auto')
    whole = np.concatenate([memory.train, memory.val])
    assert isinstance(bins.train, np.memmap) and bins.tok.chars == memory.tok.chars
    assert np.array_equal(np.concatenate([bins.train, bins.val]), whole), 'the bins hold other tokens than load_data'
    return (whole[:len(bins.train)], memory.tok), (bins.train, bins.tok)  # bins.train's tokens, in memory


def prepare_speed(corpus_text, mb, folder):
    """data.prepare (GPT-2 BPE, every core) on about mb MB: tinyshakespeare repeated if ../shared/data has it,
    else the synthetic corpus. The time includes loading the BPE tables, as `python data.py` takes them, and
    says how long that took (a fixed cost, however large the corpus) and the rate after it."""
    shakespeare = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'tinyshakespeare.txt')
    name, text = 'synthetic corpus', corpus_text
    if os.path.exists(shakespeare):
        name, text = 'tinyshakespeare', open(shakespeare, encoding='utf-8').read()
    repeats = max(1, math.ceil(mb * 1e6 / len(text.encode('utf-8'))))
    path = os.path.join(folder, 'prepare.txt')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text * repeats)
    size = os.path.getsize(path)
    gpt2_encoding.cache_clear()  # loaded afresh, as `python data.py` loads them
    t0 = time.perf_counter()
    gpt2_encoding()  # the tables, timed apart: prepare takes them from the cache
    t1 = time.perf_counter()
    meta = prepare(path, os.path.join(folder, 'prepare_bins'), tokenizer='gpt2')
    dt, load = time.perf_counter() - t0, t1 - t0
    tokens = sum(meta['splits'][s]['tokens'] for s in ('train', 'val'))
    return (f"{size / 1e6 / dt:.1f} MB/s on {size / 1e6:.1f} MB ({name} x {repeats}, {tokens:,} tokens in {dt:.2f} s, "
            f"{os.cpu_count()} threads; {load:.2f} s of it loading the BPE tables: {size / 1e6 / max(dt - load, 1e-9):.1f} "
            f"MB/s after)")


GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8, dropout=0.0)


def random_tokens(vocab):
    """(ids, tokenizer) of random tokens for the rows at GPT-2 size: timing ignores the data."""
    ids = np.random.default_rng(0).integers(vocab - 47, size=2_000_000).astype(np.int32)
    return ids, SimpleNamespace(vocab_size=vocab, eot=None)


def gpu_rows(b, pair, size=GPT2, label='GPT-2 124M', vocab=50304):
    """compile against eager, tokens/s and MFU, and the units at GPT-2 size (where they save real
    work on a GPU; the tiny model is launch-bound there). Random tokens: timing ignores the data."""
    data = random_tokens(vocab)
    what = f"{label} ({size['batch_size']}x{size['block_size']} tokens)"
    eager, comp = Setup(data, b, **size), Setup(data, b, compile=True, **size)
    t_eager, t_comp = pair(f'compile / eager, {what}', eager, comp)
    peak = distributed.peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    parts = []
    for name, s, t in (('eager', eager, t_eager), ('compiled', comp, t_comp)):
        rate = s.tokens / t
        mfu = f', MFU {s.model.estimate_mfu(rate, peak):.1%}' if peak else ' (no peak FLOPs known for this GPU)'
        parts.append(f'{name} {rate:,.0f} tok/s{mfu}')
    pair(f'DMU p=0.5 / p=1, {what}', eager, Setup(data, b, dmu_p=0.5, **size))
    pair(f'DTU r=0.5 / r=1, {what}', eager, Setup(data, b, dtu_r=0.5, **size))
    pair(f'PSU lambda=0.2 both / off, {what}', eager, Setup(data, b, psu_lambda=0.2, **size), 1.05)
    return f"{label}, {b['dtype']}: " + '; '.join(parts)


def logged_rows(b, pair):
    """A logged step (train_step measuring ||theta_t - theta_{t-1}||, the entropy and the log's host
    syncs) over an unlogged one, on one model at logged_size (GPT-2 124M: few steps, each takes seconds),
    at each of LOGGED_SHAPES: the measuring costs about the same time at any batch, so the ratio is worst
    at the smallest. A quarter of --steps pairs (12 at --steps=51): on a 2-core host one pair's ratio at
    8x256 varies by 0.05-0.13 (steps of ~12 s) against ~0.03 of extra work, so few pairs say little."""
    n_layer, n_head, n_embd = train.SIZES[b['logged_size']]
    for (batch_size, block_size), goal in LOGGED_SHAPES:
        setup = Setup(random_tokens(50304), b, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      batch_size=batch_size, block_size=block_size)
        label = f"{b['logged_size']} ({setup.model.get_num_params() / 1e6:.0f}M), {batch_size}x{block_size} tokens"
        pair(f'logged / unlogged step, {label}', setup, Logged(setup), goal, steps=max(1, b['steps'] // 4))


def nanogpt_row(nano, b, data, tiny, pair, rows):
    """Our train step against nanoGPT's at the same shape: nano, its model.py (load_nanogpt), else None."""
    if nano is None:
        rows.append(('model step vs nanoGPT', None, None, 'skipped: no --nanogpt=PATH to its model.py', None))
        print('  model step vs nanoGPT: skipped (no --nanogpt=PATH to its model.py)', flush=True)
        return
    pair(f'model step ours / nanoGPT, {tiny}', NanoGPTSetup(nano, data, b), Setup(data, b))


def main(argv):
    b, _ = parse_flags(BENCH, argv, RULES)
    validate(b, RULES)
    nano = load_nanogpt(b['nanogpt']) if b['nanogpt'] else None
    b['device'], b['dtype'] = auto_device(b['device']), auto_dtype(b['dtype'])
    if b['threads'] > 0:
        torch.set_num_threads(b['threads'])
    if b['device'].startswith('cuda:'):
        torch.cuda.set_device(b['device'])  # the current GPU: what sync() waits for and machine() names
    print(machine(b))
    ids, val_ids, tok, corpus_text, corpus = load_data('synthetic', 'word')
    data = (ids, tok)
    d = train.DEFAULTS
    tiny = f"tiny model ({d['n_layer']}x{d['n_embd']}, {d['batch_size']}x{d['block_size']} tokens)"
    rows = []  # (what, ms A, ms B, ratio or text, goal)

    def pair(what, a, bb, goal=None, steps=None):
        times_a, times_b = timed([a, bb], b if steps is None else {**b, 'steps': steps, 'warmup': min(b['warmup'], 1)})
        ta, tb = statistics.median(times_a), statistics.median(times_b)
        ratio = statistics.median([y / x for x, y in zip(times_a, times_b)])
        rows.append((what, ta * 1e3, tb * 1e3, ratio, goal))
        print(f'  {what}: {ratio:.3f}', flush=True)
        return ta, tb

    print(f"timing: {b['steps']} steps after {b['warmup']} warm-up, each pair stepped alternately; B/A: median of the paired ratios")
    n = 16384 if b['device'].startswith('cuda') else 2048  # tokens per step
    pair(f'DMU p=0.5 / p=1, GPT-2 MLP alone (768->3072, {n} tok)', MLPSetup(b, 1.0, tokens=n),
         MLPSetup(b, 0.5, tokens=n), 0.65)
    pair(f'DMU p=0.5 / p=1, {tiny}', Setup(data, b), Setup(data, b, dmu_p=0.5))
    pair(f'DTU r=0.5 / r=1, {tiny}', Setup(data, b), Setup(data, b, dtu_r=0.5))
    off, _ = pair(f'PSU lambda=0.2 both / off, {tiny}', Setup(data, b),
                  Setup(data, b, psu_lambda=0.2, psu_channels='both'), 1.05)
    pair(f'BAARA on / off, {tiny}', Setup(data, b), Setup(data, b, baara=True), 1.10)
    pair(f"PSU data channel lambda=0.2 / off, every {d['psu_data_every']} steps, {tiny}", Setup(data, b),
         Setup(data, b, psu_lambda=0.2, psu_channels='data', warmup_iters=0), 1.3, steps=max(1, b['steps'] // 5))
    with tempfile.TemporaryDirectory() as folder:  # the bins are read while the pair steps
        in_memory, from_bins = bins_data(corpus_text, folder)
        pair(f'train step from bins / from memory, {tiny}', Setup(in_memory, b), Setup(from_bins, b), 1.02)
    for n_layer, n_embd in ((d['n_layer'], d['n_embd']), (8, 192)):  # the tiny model, and 3.6M parameters
        a = AdamWSetup(b, False, n_layer, n_embd, tok.vocab_size)
        pair(f"AdamW step fused / default, {n_layer}x{n_embd} ({a.model.get_num_params() / 1e6:.2f}M parameters)",
             a, AdamWSetup(b, True, n_layer, n_embd, tok.vocab_size))
    logged_rows(b, pair)
    nanogpt_row(nano, b, data, tiny, pair, rows)
    pair(f"sampling, cached / uncached, {d['num_samples']} x {d['sample_tokens']} tokens of the tiny model ({d['n_layer']}x{d['n_embd']})",
         SamplingSetup(data, b, use_cache=False), SamplingSetup(data, b, use_cache=True), 0.3,
         steps=min(b['steps'], 5))  # an uncached step takes seconds
    tok_s = f"{d['batch_size'] * d['block_size'] / off:,.0f} tok/s (tiny model, {b['device']}; no MFU without a GPU peak)"
    if b['device'].startswith('cuda'):
        tok_s = gpu_rows(b, pair)
    else:
        rows.append(('compile / eager', None, None, 'n/a: no GPU (compile is benchmarked on GPU only)', None))
    rows.append(('tokens/s, MFU', None, None, tok_s, None))
    rows.append((f"text metrics on {b['metrics_words'] / 1e6:g}M words", None, None,
                 metrics_time(corpus, corpus_text, b['metrics_words']), None))
    rows.append((f"distribution metrics on {b['distribution_n']:,} sentences", None, None,
                 distribution_time(Setup(data, b).model, tok, corpus, ids, val_ids, b), None))
    with tempfile.TemporaryDirectory() as folder:
        rows.append(('prepare (gpt2 BPE)', None, None, prepare_speed(corpus_text, b['prepare_mb'], folder), None))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'A ms':>8} {'B ms':>8}  B/A")
    for what, ta, tb, ratio, goal in rows:
        if isinstance(ratio, str):
            print(f'{what:{width}}  {ratio}')
            continue
        verdict = '' if goal is None else f"  goal <= {goal}: {'met' if ratio <= goal else 'NOT met'}"
        print(f'{what:{width}}  {ta:8.1f} {tb:8.1f}  {ratio:.3f}{verdict}')


if __name__ == '__main__':
    main(sys.argv[1:])
