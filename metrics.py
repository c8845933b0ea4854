"""
Metrics of Sec. 6: plain functions on tokens, text, logits or hidden states; evaluate() computes
all of them at the end of a training run (train.py writes them to report.json), and a small CLI:

    python metrics.py RUN_DIR...                      # Table 6.2 (ours / paper), other metrics, cross-seed
    python metrics.py --fig3 RUN_DIR... [--out=fig3.png] [--bins=12]   # Fig. 3, loss-entropy density
    python metrics.py --corpus=FILE --text=FILE [--fraction=0.25]      # HF proportion of any text

Choices the paper leaves open, written down (DESIGN.md):
- Words are `[A-Za-z']+`, lowercased; the text metrics count words, not tokens, so that runs with
  different tokenizers compare.
- End-of-text in generated text is '\\n' (the synthetic corpus renders it so; in a text file it is
  a line end). A "sentence" is a segment closed by '\\n'; a sample's unfinished last segment is
  dropped, and for BERT (whose window starts anywhere in the corpus) its first one too.
- Mode concentration (Def. 3.2) is over sentences labelled by corpus.mode_of on the synthetic
  corpus, over words otherwise; sentences in no mode are counted in none_share only.
- The text metrics are also computed on the corpus cut like the samples (reference_texts), so
  that plug-in estimates (entropy, distinct-n) are compared at the same sample size.
"""
import json
import math
import os
import re
import sys
from collections import Counter, namedtuple
from contextlib import nullcontext

import numpy as np
import torch

WORD = re.compile(r"[A-Za-z']+")
EOT = '\n'
# Table 6.2 of the paper: high-frequency word proportion (%) at lambda = 0, 0.05, 0.2
PAPER = {('gpt', 2025, '1B'): (27.5, 67.8, 100.0), ('gpt', 2026, '1B'): (26.7, 61.2, 100.0),
         ('gpt', 2027, '1B'): (26.3, 68.3, 100.0), ('bert', 2026, '1B'): (23.5, 56.3, 100.0),
         ('gpt', 2026, '2B'): (24.2, 58.2, 100.0), ('gpt', 2026, '3B'): (21.9, 56.1, 100.0)}
PAPER_LAMBDAS = (0.0, 0.05, 0.2)
ABLATION = {'psu_channels': 'both', 'dmu_p': 1.0, 'dtu_r': 1.0, 'baara': False}  # shown in a row label when not this


def words(text):
    """The words of a text: maximal runs of [A-Za-z'], lowercased."""
    return ' '.join(WORD.findall(text)).lower().split()


def high_frequency_set(corpus_text, fraction=0.25):
    """The smallest set of the corpus's most frequent words covering `fraction` of its word
    occurrences: words ranked by count (ties alphabetically), the shortest prefix whose counts
    sum to >= fraction * total. corpus_text may be a Counter of words."""
    assert 0 < fraction <= 1, fraction
    counts = corpus_text if isinstance(corpus_text, Counter) else word_counts(corpus_text)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    cum = np.cumsum([n for _, n in ranked])
    k = int(np.searchsorted(cum, fraction * cum[-1])) + 1
    return {w for w, _ in ranked[:k]}


def word_counts(text):
    """Counter of words(text), computed fast by tokenize()."""
    vocab, ids = tokenize([text])
    return Counter({vocab[i]: int(c) for i, c in enumerate(np.bincount(ids)) if i > SEP and c})


def high_frequency_proportion(text, hf_set):
    """Share of the words of `text` (a string or a list of words) that are in hf_set."""
    ws = words(text) if isinstance(text, str) else text
    return sum(map(hf_set.__contains__, ws)) / len(ws) if ws else float('nan')


def predictive_entropy(logits, mask=None):
    """Mean over positions (those where mask is True) of the entropy, in nats, of softmax(logits)."""
    h = torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)
    return (h[mask] if mask is not None else h).mean().item()


def eot_mass(logits, eot, mask=None):
    """Mean over positions of the probability the model gives the end-of-text token."""
    p = torch.softmax(logits.float(), dim=-1)[..., eot]
    return (p[mask] if mask is not None else p).mean().item()


def sample_entropy(tokens, counts=None):
    """Entropy (nats) of the unigram distribution of generated tokens or words (plug-in estimate);
    or, given `counts`, of the distribution proportional to them."""
    c = np.asarray(list(Counter(tokens).values()) if counts is None else counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def effective_rank(hidden):
    """Roy & Vetterli (2007): exp of the Shannon entropy of the singular values normalised to sum 1,
    of the (N, d) matrix of hidden states (any leading dims are flattened; not centred). Singular
    values below numpy's numerical-rank tolerance (s_max * max(N, d) * eps of the input dtype) are 0."""
    h = torch.as_tensor(hidden).detach()
    eps = torch.finfo(h.dtype if h.is_floating_point() else torch.float64).eps
    h = h.reshape(-1, h.shape[-1]).double()
    s = torch.linalg.svdvals(h)
    s = s[s > s.max() * eps * max(h.shape)]
    p = s / s.sum()
    return math.exp(-(p * p.log()).sum().item())


# Fast tokenisation for many texts at once, equal to words() (tested): bytes.translate keeps
# [A-Za-z'] (lowercased), turns '\n' into NL and every other byte (all of UTF-8's multi-byte
# characters too) into a space. Id 0 is end-of-text ('\n'), id 1 the end of a sample.
TABLE = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 39 else 1 if c == 10 else 32 for c in range(256))
NL, SEP = 0, 1
Encoded = namedtuple('Encoded', 'ids lens vocab')


def tokenize(texts):
    """-> (vocabulary: list of words, flat int64 ids: words >= 2, NL = '\\n', SEP after each text)."""
    big = b' \x02 '.join(t.encode('utf-8', 'replace').translate(TABLE) for t in texts) + b' \x02'
    tokens = big.replace(b'\x01', b' \x01 ').split()
    index = dict.fromkeys((b'\x01', b'\x02'))
    index.update(dict.fromkeys(tokens))
    index = {w: i for i, w in enumerate(index)}
    return [w.decode() for w in index], np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=len(tokens))


def encode(seqs):
    """Sequences of hashable tokens -> Encoded(flat int64 ids, lengths, vocabulary size)."""
    index = {}
    flat = [index.setdefault(t, len(index)) for s in seqs for t in s]
    return Encoded(np.array(flat, dtype=np.int64), np.array([len(s) for s in seqs], dtype=np.int64), len(index))


def ngrams(enc, n):
    """(codes, seq): one integer code per n-gram (n-grams never cross sequences) and the index of
    its sequence. Codes are exact when vocab**n < 2**63, else a 64-bit rolling hash."""
    ids, lens, vocab = enc
    seq = np.repeat(np.arange(len(lens)), lens)
    offset = np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.flatnonzero(offset <= lens[seq] - n)
    exact = max(vocab, 2) ** n < 2 ** 63
    base = np.int64(vocab) if exact else np.uint64(0x9E3779B97F4A7C15)
    codes = ids[pos] if exact else ids[pos].astype(np.uint64)
    with np.errstate(over='ignore'):
        for k in range(1, n):
            codes = codes * base + (ids[pos + k] if exact else ids[pos + k].astype(np.uint64))
    return codes, seq[pos]


def distinct_n(seqs, n):
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, over all sequences together."""
    codes, _ = ngrams(seqs if isinstance(seqs, Encoded) else encode(seqs), n)
    c = np.sort(codes)
    return float(1 + np.count_nonzero(c[1:] != c[:-1])) / len(c) if len(c) else float('nan')


def seq_rep_n(seqs, n=4):
    """seq-rep-n (Welleck et al. 2019): per sequence 1 - unique n-grams / total n-grams, averaged
    over the sequences that have an n-gram. A sequence looping with period p over L tokens scores
    1 - p / (L - n + 1) (close to 1, not 1); a sequence of distinct tokens scores 0."""
    enc = seqs if isinstance(seqs, Encoded) else encode(seqs)
    codes, seq = ngrams(enc, n)
    if not len(codes):
        return float('nan')
    order = np.lexsort((codes, seq))
    c, s = codes[order], seq[order]
    new = np.r_[True, (c[1:] != c[:-1]) | (s[1:] != s[:-1])]
    unique, total = np.bincount(s[new], minlength=len(enc.lens)), np.bincount(s, minlength=len(enc.lens))
    has = total > 0
    return float(np.mean(1 - unique[has] / total[has]))


def loop_share(seqs, max_period=10, tail=20):
    """Share of sequences stuck in a loop. A sequence is in a loop when its last tail + p tokens
    are periodic with some period p <= max_period (seq[i] == seq[i - p] over the last `tail`
    positions): at least 3 repeats for p <= tail / 2. Sequences shorter than tail + 1 never are
    (positions before a sequence's start are padded with values that match nothing)."""
    ids, lens, _ = seqs if isinstance(seqs, Encoded) else encode(seqs)
    if not len(lens):
        return float('nan')
    width = tail + max_period
    at = np.cumsum(lens)[:, None] - width + np.arange(width)  # the last `width` positions of each
    pad = at < (np.cumsum(lens) - lens)[:, None]
    w = np.where(pad, -1 - np.arange(width), ids[np.clip(at, 0, max(len(ids) - 1, 0))] if len(ids) else 0)
    loop = np.zeros(len(lens), dtype=bool)
    for p in range(1, max_period + 1):
        loop |= (w[:, width - tail:] == w[:, width - tail - p:width - p]).all(1)
    return float(loop.mean())


def smallest_set(mass, eps):
    """Smallest number of outcomes holding 1 - eps of the mass (mass: counts or probabilities)."""
    m = np.sort(np.asarray(mass, dtype=np.float64))[::-1]
    return int(np.searchsorted(np.cumsum(m) / m.sum(), 1 - eps - 1e-12)) + 1


def mode_concentration(labels, eps=0.05, ks=(1, 5), counts=None, n_none=0):
    """Def. 3.2 on generated samples. labels: the mode of each generated sentence (or word), None =
    in no mode. Over the labelled ones: modes_for_mass = the smallest number of modes holding
    1 - eps of the generated mass, top{k}_mass = the mass on the k most frequent modes, n_modes =
    the number of distinct modes produced; none_share = the share of labels that are None.
    Given `counts` (of each mode) and n_none instead of labels, the same from those."""
    if labels is not None:
        tally = Counter(labels)
        n_none, counts = tally.pop(None, 0), np.array(list(tally.values()), dtype=np.int64)
    counts = np.sort(counts[counts > 0])[::-1]
    n, total = counts.sum(), counts.sum() + n_none
    out = dict(n_labels=int(total), none_share=float(n_none / total) if total else float('nan'),
               n_modes=len(counts), modes_for_mass=smallest_set(counts, eps) if n else None)
    top = np.cumsum(counts) / n if n else None
    out.update({f'top{k}_mass': float(top[min(k, len(top)) - 1]) if n else None for k in ks})
    return out


def template_labels(corpus, vocab, ids, sent, n_sent):
    """corpus.mode_of of every sentence, vectorised (equal to it, tested); -1 = no mode. A sentence
    is coded as sum_k slot(word_k) * S**k, S = number of slots + 1, slot 0 = not a corpus word."""
    slots = sorted(set(corpus.slot_of.values()))
    base, longest = len(slots) + 1, max(map(len, corpus.templates))
    assert base ** (longest + 1) < 2 ** 53, "too many slots for exact float64 codes"
    symbol = {s: k + 1 for k, s in enumerate(slots)}
    sym = np.array([symbol.get(corpus.slot_of.get(w), 0) for w in vocab], dtype=np.int64)[ids]
    first = np.searchsorted(sent, np.arange(n_sent))  # sent is sorted: index of each sentence's first word
    k = np.arange(len(ids)) - first[sent]
    length = np.bincount(sent, minlength=n_sent)
    bad = (np.bincount(sent, weights=sym == 0, minlength=n_sent) > 0) | (length > longest) | (length == 0)
    code = np.bincount(sent, weights=np.where(k < longest, sym * float(base) ** np.minimum(k, longest), 0), minlength=n_sent)
    table = sorted((sum(symbol[s] * base ** i for i, s in enumerate(t)), m) for m, t in enumerate(corpus.templates))
    keys, modes = np.array([t[0] for t in table], dtype=np.int64), np.array([t[1] for t in table])
    at = np.minimum(np.searchsorted(keys, code.astype(np.int64)), len(keys) - 1)
    return np.where(~bad & (keys[at] == code.astype(np.int64)), modes[at], -1)


def sentences(ids, drop_first=False):
    """Sentences of tokenize()'s ids: (sentence index of every token, which sentences are complete).
    A sentence is a segment closed by end-of-text (NL); the unfinished last one of each sample is not
    complete, nor, with drop_first (BERT), the first one of each sample."""
    sep = ids == SEP
    sent = np.cumsum(np.r_[True, ((ids == NL) | sep)[:-1]]) - 1
    complete = np.zeros(int(sent[-1]) + 1 if len(sent) else 0, dtype=bool)
    complete[sent[ids == NL]] = True
    if drop_first:
        complete[sent[np.r_[0, np.flatnonzero(sep)[:-1] + 1]]] = False
    return sent, complete


def text_metrics(texts, hf_set, corpus=None, drop_first=False, eps=0.05):
    """All text metrics of a list of generated samples (see the module docstring for sentences).
    Lengths: words before the first end-of-text of each sample; length_mean/std over the samples
    that emit one, terminated = the share that do (for BERT read sentence_length_mean instead)."""
    vocab, ids = tokenize(texts)
    word, nl, sep = ids > SEP, ids == NL, ids == SEP
    sample = np.cumsum(sep) - sep
    enc = Encoded(ids[word], np.bincount(sample[word], minlength=len(texts)), len(vocab))
    in_hf = np.array([w in hf_set for w in vocab], dtype=bool)
    out = dict(n_samples=len(texts), n_words=len(enc.ids),
               hf_proportion=float(in_hf[enc.ids].mean()) if len(enc.ids) else float('nan'),
               sample_entropy=sample_entropy(None, np.bincount(enc.ids)),
               **{f'distinct_{n}': distinct_n(enc, n) for n in (1, 2, 3)},
               seq_rep_4=seq_rep_n(enc, 4), loop_share=loop_share(enc))
    # lengths until the first end-of-text of each sample
    words_before = np.cumsum(word) - word
    starts = np.r_[0, np.flatnonzero(sep)[:-1] + 1]
    nl_pos = np.flatnonzero(nl)
    has, first_nl = np.unique(sample[nl_pos], return_index=True)
    lengths = words_before[nl_pos[first_nl]] - words_before[starts[has]]
    out.update(terminated=len(has) / len(texts),
               length_mean=float(lengths.mean()) if len(has) else None,
               length_std=float(lengths.std()) if len(has) else None,
               length_hist={str(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True))})
    sent, complete = sentences(ids, drop_first)
    sent_len = np.bincount(sent[word], minlength=len(complete))[complete]
    out['sentence_length_mean'] = float(sent_len.mean()) if len(sent_len) else None
    if corpus is not None:
        labels = template_labels(corpus, vocab, ids[word], sent[word], len(complete))[complete]
        out.update(mode_concentration(None, eps, counts=np.bincount(labels[labels >= 0]), n_none=int((labels < 0).sum())),
                   modes_kind='templates')
    else:
        out.update(mode_concentration(None, eps, counts=np.bincount(enc.ids)), modes_kind='words')
    return out


def cross_seed(reports):
    """{metric: (mean, std)} over a list of metric dicts (one per seed), for the numeric metrics
    every dict has; std is the sample standard deviation (ddof=1), 0 for a single seed."""
    keys = [k for k, v in reports[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(isinstance(r.get(k), (int, float)) for r in reports)]
    arr = {k: np.array([r[k] for r in reports], dtype=np.float64) for k in keys}
    return {k: (float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0) for k, a in arr.items()}


def reference_texts(corpus_text, texts):
    """The corpus cut like the samples: len(texts) consecutive pieces of the mean sample length
    (characters), each starting just after a '\\n' (where a GPT sample starts)."""
    size = max(1, round(sum(map(len, texts)) / max(1, len(texts))))
    pieces, at = [], 0
    while len(pieces) < len(texts) and at < len(corpus_text):
        pieces.append(corpus_text[at:at + size])
        nl = corpus_text.find(EOT, at + size)
        at = nl + 1 if nl >= 0 else len(corpus_text)
    return pieces


@torch.no_grad()
def model_metrics(model, val_ids, eot=None, batch_size=8, n_batches=4, device='cpu', ctx=nullcontext(), seed=0):
    """On n_batches fixed validation batches: predictive entropy (all positions for GPT, masked
    ones for BERT), end-of-text mass, and the effective rank of the final hidden states."""
    from data import get_batch
    from model import mask_tokens
    was_training, block = model.training, min(model.config.block_size, len(val_ids) - 2)
    model.eval()
    gen, ent, eotm, hidden = torch.Generator().manual_seed(seed), [], [], []
    for _ in range(n_batches):
        x, _ = get_batch(val_ids, batch_size, block, gen, 'cpu')
        mask = None
        if not model.config.causal:
            mask_id = model.config.vocab_size - 1
            x, y = mask_tokens(x, mask_id, mask_id, generator=gen)
            mask = (y != -1).to(device)
        x = x.to(device)
        with ctx:
            logits = model.lm_head(h := model.hidden(x))
        ent.append(predictive_entropy(logits, mask))
        if eot is not None:
            eotm.append(eot_mass(logits, eot, mask))
        hidden.append(h.float().reshape(-1, h.size(-1)))
    model.train(was_training)
    return dict(predictive_entropy=float(np.mean(ent)), eot_mass=float(np.mean(eotm)) if eotm else None,
                effective_rank=effective_rank(torch.cat(hidden)), n_embd=model.config.n_embd)


def evaluate(model, tok, corpus_text, corpus, texts, val_ids, batch_size=8, n_batches=4, device='cpu',
             ctx=nullcontext(), fraction=0.25, eps=0.05, seed=0):
    """Every metric of a trained model (raw GPT) and its generated texts, as one JSON-able dict;
    'corpus' holds the same text metrics on reference_texts(corpus_text, texts)."""
    counts = word_counts(corpus_text)
    hf = high_frequency_set(counts, fraction)
    bert = not model.config.causal
    out = dict(fraction=fraction, eps=eps, hf_set_size=len(hf),
               corpus_hf_proportion=sum(counts[w] for w in hf) / sum(counts.values()),
               **text_metrics(texts, hf, corpus, bert, eps),
               **model_metrics(model, val_ids, tok.eot, batch_size, n_batches, device, ctx, seed))
    out['corpus'] = text_metrics(reference_texts(corpus_text, texts), hf, corpus, bert, eps)
    if corpus is not None:  # entropy_rate: nats per word-level token (comparable to H_pred for tokenizer=word)
        out.update(n_modes_total=len(corpus.templates), true_modes_for_mass=smallest_set(corpus.mode_probs, eps),
                   true_top1_mass=float(max(corpus.mode_probs)), entropy_rate=corpus.entropy_rate())
    if tok.eot is not None:
        out['corpus_eot_rate'] = float(np.mean(np.asarray(val_ids) == tok.eot))
    return out


def summary(m):
    """One line for the end of a run."""
    modes = f"{m['n_modes']}/{m['n_modes_total']}" if 'n_modes_total' in m else f"{m['n_modes']} words"
    return (f"metrics: high-frequency words {fmt(m['hf_proportion'], '%')} (corpus {fmt(m['corpus_hf_proportion'], '%')})"
            f" | entropy {m['predictive_entropy']:.3f} nats | eff. rank {m['effective_rank']:.1f}/{m['n_embd']} | "
            f"modes {modes}, top-1 {fmt(m['top1_mass'], '%')}, none {fmt(m['none_share'], '%')} | distinct-2 "
            f"{fmt(m['distinct_2'], '.3f')} | seq-rep-4 {fmt(m['seq_rep_4'], '.3f')} | loops {fmt(m['loop_share'], '%')} | "
            f"length {fmt(m['length_mean'], '.2f')} (corpus {fmt(m['corpus']['length_mean'], '.2f')}) | "
            f"eot mass {fmt(m['eot_mass'], '.3f')}")


def fmt(v, spec):
    """A number for a table: '-' for None or NaN, spec '%' for a percentage."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '-'
    return f'{100 * v:.1f}%' if spec == '%' else format(v, spec)


# -----------------------------------------------------------------------------
# the CLI

def load_run(path):
    """(config, metrics or {}, stability verdict, last logged val loss or None) of a run folder."""
    file = os.path.join(path, 'report.json')
    try:
        report = json.load(open(file))
        config = report['config']
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {file!r} is not a finished run's report ({type(e).__name__}: {e})")
    val = [r['val_loss'] for r in read_log(path) if 'val_loss' in r]
    return config, report.get('metrics') or {}, report.get('stability', {}).get('verdict', '-'), (val or [None])[-1]


def read_log(path):
    log = os.path.join(path, 'log.jsonl')
    return [json.loads(line) for line in open(log) if line.strip()] if os.path.isfile(log) else []


def row_of(c):
    """A run's row: (model, seed, size, data, ablation settings that differ from the default), and
    the paper's values for it: matched on (model, seed), its 2B/3B row when the size says so, else 1B."""
    extra = ' '.join(f"{k}={c[k]}" for k, d in ABLATION.items() if k in c and c[k] != d)
    data = c.get('data', '?')
    key = (c.get('model', '?'), c.get('seed'), f"{c.get('size', '?')}({c.get('n_layer')}x{c.get('n_embd')})",
           os.path.basename(data) or data, extra)
    scale = next((s for s in ('2B', '3B') if s.lower() in str(c.get('size', ''))), '1B')
    return key, PAPER.get((c.get('model'), c.get('seed'), scale))


COLUMNS = [('hf', 'hf_proportion', '%'), ('H_pred', 'predictive_entropy', '.3f'), ('H_sample', 'sample_entropy', '.3f'),
           ('erank', 'effective_rank', '.1f'), ('modes', 'n_modes', ''), ('m(1-eps)', 'modes_for_mass', ''),
           ('top1', 'top1_mass', '%'), ('none', 'none_share', '%'), ('dist-2', 'distinct_2', '.3f'),
           ('rep-4', 'seq_rep_4', '.3f'), ('loops', 'loop_share', '%'), ('len', 'length_mean', '.2f'),
           ('eot', 'eot_mass', '.3f')]


def table(runs):
    """Print Table 6.2 (ours / paper), the other metrics with the stability verdict, and the
    cross-seed mean and std of GPT rows that differ only in the seed."""
    rows, cells = {}, {}
    for config, m, verdict, val in runs:
        key, paper = row_of(config)
        rows[key] = paper
        cells.setdefault((key, float(config.get('psu_lambda', 0.0))), []).append((m, verdict, val))
    lams = sorted(set(PAPER_LAMBDAS) | {lam for _, lam in cells})
    label = lambda k: ' '.join(str(x) for x in k if x != '')
    width = max(len(label(k)) for k in rows) + 2
    print("Table 6.2: high-frequency word proportion, ours / paper")
    print('row'.ljust(width) + ''.join(f'lambda={lam:g}'.ljust(18) for lam in lams))
    for key, paper in rows.items():
        cell = lambda lam: [m['hf_proportion'] for m, _, _ in cells.get((key, lam), []) if m.get('hf_proportion') is not None]
        print(label(key).ljust(width) + ''.join(
            (f"{fmt(np.mean(cell(lam)) if cell(lam) else None, '%')} / "
             f"{fmt(paper[PAPER_LAMBDAS.index(lam)] / 100 if paper and lam in PAPER_LAMBDAS else None, '%')}").ljust(18)
            for lam in lams))
    corpus = sorted({fmt(m.get('corpus_hf_proportion'), '%') for ms in cells.values() for m, _, _ in ms if m})
    print("paper: its 1B row with the same (model, seed), or its 2B/3B row for sizes gpt2-2b/gpt2-3b; our runs "
          f"are the sizes shown (layers x width). The corpus's own proportion: {', '.join(corpus) or '-'}")
    print("\nOther metrics and the stability verdict; last rows: the text metrics of each corpus cut like the samples")
    print('row'.ljust(width) + 'lambda  ' + ''.join(n.ljust(10) for n, _, _ in COLUMNS) + 'val_loss  verdict')
    order = sorted(cells, key=lambda kl: (list(rows).index(kl[0]), kl[1]))
    for key, lam in order:
        for m, verdict, val in cells[key, lam]:
            print(label(key).ljust(width) + f'{lam:<8g}' + ''.join(fmt(m.get(k), f).ljust(10) for _, k, f in COLUMNS)
                  + fmt(val, '.4f').ljust(10) + verdict)
    refs = {key[3]: m['corpus'] for key, lam in order for m, _, _ in cells[key, lam] if m.get('corpus')}
    for data, ref in refs.items():
        print(f'corpus {data}'.ljust(width + 8) + ''.join(fmt(ref.get(k), f).ljust(10) for _, k, f in COLUMNS))
    groups = {}
    for key, lam in order:
        if key[0] == 'gpt':
            groups.setdefault((key[2:], lam), {}).update({key[1]: m for m, _, _ in cells[key, lam] if m})
    groups = {g: seeds for g, seeds in groups.items() if len(seeds) > 1}
    if groups:
        print("\nCross-seed mean ± std (GPT rows that differ only in the seed)")
    for (rest, lam), seeds in groups.items():
        stats = cross_seed(list(seeds.values()))
        print(f"gpt {label(rest)} lambda={lam:g} seeds {sorted(seeds)}: " + ', '.join(
            f"{n} {stats[k][0]:.4g}±{stats[k][1]:.2g}" for n, k, _ in COLUMNS if k in stats))


def fig3(run_dirs, out='fig3.png', bins=12):
    """Fig. 3: density of (training loss, entropy) over all logged steps of the runs; entropy is the
    logged 'entropy' (mean predictive entropy of the training batch) or else PSU's 'psu_entropy'.
    A hexbin PNG where matplotlib is installed, a table of counts per bin where it is not."""
    pts = [(r['loss'], r.get('entropy', r.get('psu_entropy'))) for d in run_dirs for r in read_log(d) if 'loss' in r]
    pts = np.array([p for p in pts if p[1] is not None], dtype=np.float64).reshape(-1, 2)
    if not len(pts):
        raise SystemExit("error: no logged step has both 'loss' and 'entropy' (or 'psu_entropy') in " + ', '.join(run_dirs))
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        counts, le, he = np.histogram2d(pts[:, 0], pts[:, 1], bins=bins)
        print(f"fig. 3 (matplotlib not installed, text table): logged steps per (loss, entropy) bin, {len(pts)} steps")
        print('entropy \\ loss ' + ''.join(f'{(a + b) / 2:>7.3f}' for a, b in zip(le[:-1], le[1:])))
        for j in range(bins - 1, -1, -1):
            print(f'{(he[j] + he[j + 1]) / 2:>15.3f}' + ''.join(f'{int(c):>7d}' if c else '      .' for c in counts[:, j]))
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    fig.colorbar(ax.hexbin(pts[:, 0], pts[:, 1], gridsize=2 * bins, bins='log', mincnt=1), label='logged steps')
    ax.set(xlabel='training loss (nats)', ylabel='predictive entropy (nats)', title=f'loss-entropy, {len(pts)} steps')
    fig.savefig(out, dpi=120, bbox_inches='tight')
    print(f"fig. 3: {len(pts)} logged steps of {len(run_dirs)} run(s) -> {out}")


def main(argv):
    flags = dict(a[2:].partition('=')[::2] for a in argv if a.startswith('--'))
    dirs = [a for a in argv if not a.startswith('--')]
    unknown = [k for k in flags if k not in ('corpus', 'text', 'fraction', 'fig3', 'out', 'bins')]
    if unknown:
        raise SystemExit(f"error: unknown option --{unknown[0]}; valid: --corpus= --text= --fraction= --fig3 --out= --bins=")
    try:
        fraction, bins = float(flags.get('fraction', 0.25)), int(flags.get('bins', 12))
        assert 0 < fraction <= 1 and bins >= 1
    except (ValueError, AssertionError):
        raise SystemExit("error: --fraction must be a number in (0, 1] and --bins an integer >= 1")
    if 'corpus' in flags or 'text' in flags:
        if not flags.get('corpus') or not flags.get('text') or dirs:
            raise SystemExit("error: usage: python metrics.py --corpus=FILE --text=FILE [--fraction=0.25]")
        from data import read_text
        counts = word_counts(read_text(flags['corpus']))
        hf = high_frequency_set(counts, fraction)
        ws = words(read_text(flags['text']))
        print(f"high-frequency word proportion: {high_frequency_proportion(ws, hf):.2%} of {len(ws):,} words "
              f"(corpus: {sum(counts[w] for w in hf) / sum(counts.values()):.2%}; "
              f"the {len(hf)} most frequent words, covering {fraction:g} of the corpus)")
        return
    if not dirs:
        raise SystemExit("error: usage: python metrics.py RUN_DIR... | --fig3 RUN_DIR... [--out=fig3.png] | --corpus=FILE --text=FILE")
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"error: run folder {missing[0]!r} does not exist")
    if 'fig3' in flags:
        fig3(dirs, flags.get('out') or 'fig3.png', bins)
    else:
        table([load_run(d) for d in dirs])


if __name__ == '__main__':
    main(sys.argv[1:])
