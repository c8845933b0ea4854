"""Metrics of Sec. 6; evaluate() computes them all at a run's end, into report.json (for tables.py).
Text metrics count words, not tokens, so that runs with different tokenizers compare, and also run
on the corpus cut like the samples, at the same size. Part two: Theorem 5.5's exact quantities."""
import math
import re
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from data import (SEP, Encoded, count_words as word_counts, encode, entropy, get_batch, ngrams,
                  reference_texts, row_sentences, sentence_keys, sentences, split_sentences,
                  template_labels, tokenize, true_logprobs)
from distributed import PIECE, is_rank0
from model import decoder_logits, mask_id, mask_tokens


def words(text):
    """The words of a text: maximal runs of [A-Za-z'], lowercased."""
    return ' '.join(re.findall(r"[A-Za-z']+", text)).lower().split()


def high_frequency_set(corpus_text, fraction=0.25):
    """Sec. 6's high-frequency words: the fewest most frequent words of a text or Counter (ranked
    by count, then a-z) that together make up `fraction` of its word occurrences."""
    assert 0 < fraction <= 1, fraction
    counts = corpus_text if isinstance(corpus_text, Counter) else word_counts(corpus_text)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    cum = np.cumsum([n for _, n in ranked])  # occurrences of the top 1, 2, ... words
    n_top = int(np.searchsorted(cum, fraction * cum[-1])) + 1  # the first top n reaching fraction
    return {w for w, _ in ranked[:n_top]}


def high_frequency_proportion(text, hf_set):
    """Sec. 6's high-frequency word proportion: the share of the words of `text` (a string, list
    of words or dict word -> count) in hf_set, the corpus's high_frequency_set; NaN for none."""
    counts = Counter(words(text) if isinstance(text, str) else text)
    total = sum(counts.values())
    return sum(counts[w] for w in hf_set) / total if total else float('nan')


@torch.no_grad()
def predictive_entropy(logits, mask=None):
    """H_pred: mean over positions (where mask is True; NaN for none) of softmax(logits)'s entropy
    (nats), 0-dim (no host sync); PIECE elements at a time: ~1 MiB of fp32 temporaries."""
    z = logits.flatten(0, -2)  # (positions, V)
    weight = torch.ones(len(z), device=z.device) if mask is None else mask.reshape(-1).float()
    rows, total = max(1, PIECE // z.size(-1)), 0
    for piece, w in zip(z.split(rows), weight.split(rows)):  # piece: (rows, V)
        shifted = piece.float() - piece.amax(-1, keepdim=True).float()  # z - max z <= 0
        e = shifted.clamp_min_(-1e30).exp()  # a -inf logit (a decoder's): p = 0, adds 0 * -1e30
        z_sum = e.sum(-1)  # Z / exp(max z), (rows,); below, H = log Z - E_p[z] >= 0 per row
        total = total + ((z_sum.log() - (e * shifted).sum(-1) / z_sum) * w).sum()
    return total / weight.sum()


def eot_mass(logits, eot, mask=None):
    """Mean over positions of the probability the model gives the end-of-text token."""
    p = torch.softmax(logits.float(), dim=-1)[..., eot]
    return (p[mask] if mask is not None else p).mean().item()


def effective_rank(hidden):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of hidden."""
    h = hidden.detach().reshape(-1, hidden.shape[-1]).double()  # (N, d), not centred
    s = torch.linalg.svdvals(h)
    s = s[s > s.max() * torch.finfo(hidden.dtype).eps * max(h.shape)]  # numpy's rank tolerance
    return math.exp(torch.special.entr(s / s.sum()).sum().item())


def distinct_n(seqs, n):
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, over all sequences together."""
    c = np.sort(ngrams(seqs, n)[0])  # sort and compare: much faster than np.unique here
    return (1 + np.count_nonzero(c[1:] != c[:-1])) / len(c) if len(c) else float('nan')


def seq_rep_n(seqs, n=4):
    """seq-rep-n (Welleck et al. 2019): 1 - unique / total n-grams, averaged over the sequences."""
    codes, seq = ngrams(seqs, n)
    if not len(codes):
        return float('nan')
    order = np.lexsort((codes, seq))
    c, s = codes[order], seq[order]
    total = np.bincount(s)
    first = np.r_[True, (c[1:] != c[:-1]) | (s[1:] != s[:-1])]  # an n-gram's first in its sequence
    unique = np.bincount(s[first], minlength=len(total))
    return float(np.mean(1 - unique[total > 0] / total[total > 0]))  # those with an n-gram


def loop_share(seqs, max_period=10, tail=20):
    """Share of sequences stuck in a loop: seq[i] == seq[i - p] over their last `tail` positions
    for some period p <= max_period (3+ repeats for p <= tail / 2); never under tail + 1 tokens."""
    ids, lens, _ = seqs if isinstance(seqs, Encoded) else encode(seqs)
    if not len(lens):
        return float('nan')
    width, ends = tail + max_period, np.cumsum(lens)
    at = ends[:, None] - width + np.arange(width)  # the last `width` positions of each
    w = np.append(ids, 0)[np.clip(at, 0, len(ids))]
    w = np.where(at < (ends - lens)[:, None], -1 - np.arange(width), w)  # before a start: no match
    last = w[:, width - tail:]
    periodic = [(last == w[:, width - tail - p:width - p]).all(1) for p in range(1, max_period + 1)]
    return float(np.any(periodic, axis=0).mean())


def smallest_set(mass, eps):
    """Smallest number of outcomes holding 1 - eps of the mass (mass: counts or probabilities)."""
    m = np.sort(np.asarray(mass, dtype=np.float64))[::-1]
    return int(np.searchsorted(np.cumsum(m) / m.sum(), 1 - eps - 1e-12)) + 1


def mode_concentration(labels, eps=0.05, ks=(1, 5)):
    """Def. 3.2 on labels, each sentence's (or word's) mode or None (-1 in an int array): n_modes,
    the distinct modes; modes_for_mass, the fewest holding 1 - eps of the labelled; top{k}_mass,
    the k most frequent's share of them; none_share, the share of labels in no mode."""
    if not isinstance(labels, np.ndarray):  # None -> -1, the modes -> 0, 1, ... as they come
        index = {None: -1}
        labels = np.array([index.setdefault(x, len(index) - 1) for x in labels], dtype=np.int64)
    counts, n_none = np.bincount(labels[labels >= 0]), int((labels < 0).sum())
    counts = np.sort(counts[counts > 0])[::-1]
    n, total = counts.sum(), counts.sum() + n_none
    top = np.cumsum(counts) / max(n, 1)
    return dict(n_labels=int(total), none_share=float(n_none / total) if total else float('nan'),
                n_modes=len(counts), modes_for_mass=smallest_set(counts, eps) if n else None,
                **{f'top{k}_mass': float(top[min(k, len(top)) - 1]) if n else None for k in ks})


def text_metrics(texts, hf_set, corpus=None, drop_first=False, eps=0.05):
    """All text metrics of samples (sample_entropy: H_sample, the plug-in entropy of their word
    unigrams). With drop_first (BERT, whose window starts anywhere) no first sentence counts."""
    vocab, ids = tokenize(texts)
    word, sep = ids > SEP, ids == SEP
    sample = (np.cumsum(sep) - sep)[word]  # the sample of each word
    enc = Encoded(ids[word], np.bincount(sample, minlength=len(texts)), len(vocab))
    counts = np.bincount(enc.ids, minlength=len(vocab))
    sent, complete = sentences(ids)
    sent_words = np.bincount(sent[word], minlength=len(complete))
    first = sent[np.r_[0, np.flatnonzero(sep)[:-1] + 1]]  # the first sentence of each sample
    lengths = sent_words[first[complete[first]]]  # words before end-of-text, of those that emit one
    complete[first] &= not drop_first  # (BERT: read sentence_length_mean, not length_mean)
    labels = (enc.ids if corpus is None
              else template_labels(corpus, vocab, ids[word], sent[word], len(complete))[complete])
    hf = high_frequency_proportion(dict(zip(vocab, counts.tolist())), hf_set)
    hist = {str(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True))}
    mean, std = (float(lengths.mean()), float(lengths.std())) if len(lengths) else (None, None)
    sent_mean = float(sent_words[complete].mean()) if complete.any() else None
    return dict(n_samples=len(texts), n_words=len(enc.ids),
                sample_entropy=entropy(counts[counts > 0] / counts.sum()), hf_proportion=hf,
                **{f'distinct_{n}': distinct_n(enc, n) for n in (1, 2, 3)},
                seq_rep_4=seq_rep_n(enc, 4), loop_share=loop_share(enc),
                terminated=len(lengths) / len(texts), length_mean=mean, length_std=std,
                length_hist=hist, sentence_length_mean=sent_mean, **mode_concentration(labels, eps),
                modes_kind='words' if corpus is None else 'templates')


@torch.no_grad()
def evaluate(model, tok, corpus_text, corpus, texts, val_ids, batch_size=8, n_batches=4,
             device='cpu', ctx=nullcontext(), fraction=0.25, eps=0.05, seed=0, counts=None):
    """Every metric of a trained model (raw GPT) and its texts, as a JSON-able dict: text_metrics,
    'corpus' (the same on reference_texts), H_pred, EOT mass, erank on validation batches. counts:
    the corpus's word Counter (data.Data.word_counts; for bins, corpus_text is only a part)."""
    counts = word_counts(corpus_text) if counts is None else counts
    cfg, was_training, mask, eot = model.config, model.training, None, tok.eot
    hf, bert = high_frequency_set(counts, fraction), not cfg.causal
    model.eval()
    gen, ent, eotm, hidden = torch.Generator().manual_seed(seed), [], [], []
    for _ in range(n_batches):  # fixed validation batches
        x, _ = get_batch(val_ids, batch_size, min(cfg.block_size, len(val_ids) - 2), gen, 'cpu')
        if bert:  # masked as in training: random replacements are the tokenizer's tokens
            x, y = mask_tokens(x, mask_id(cfg.vocab_size), tok.vocab_size, generator=gen)
            mask = (y != -1).to(device)
        with ctx:
            h = model.hidden(x.to(device))
            logits = model.lm_head(h)
        ent.append(predictive_entropy(logits, mask).item())
        eotm += [eot_mass(logits, eot, mask)] if eot is not None else []
        hidden.append(h.float())
    model.train(was_training)
    out = dict(fraction=fraction, eps=eps, hf_set_size=len(hf),
               corpus_hf_proportion=high_frequency_proportion(counts, hf),
               **text_metrics(texts, hf, corpus, bert, eps), predictive_entropy=float(np.mean(ent)),
               eot_mass=float(np.mean(eotm)) if eotm else None,
               effective_rank=effective_rank(torch.cat(hidden)), n_embd=cfg.n_embd,
               corpus=text_metrics(reference_texts(corpus_text, texts), hf, corpus, bert, eps),
               corpus_eot_rate=float(np.mean(np.asarray(val_ids) == eot)) if eotm else None)
    if corpus is not None:  # entropy_rate: nats per word-level token (as H_pred for tokenizer=word)
        out.update(n_modes_total=len(corpus.templates),
                   true_modes_for_mass=smallest_set(corpus.mode_probs, eps),
                   true_top1_mass=float(max(corpus.mode_probs)), entropy_rate=corpus.entropy_rate())
    return out


# -----------------------------------------------------------------------------
# Theorem 5.5 measured literally: the synthetic corpus knows p, its distribution over sentences
# (words and closing end-of-text), exactly; the model's q is estimated from samples of p and q.

@torch.no_grad()
def sentence_logprobs(model, rows, lengths, eot, decoder=None, device='cpu', ctx=nullcontext(),
                      batch_size=500):
    """log q(row) for rows (n, L): sum over t < lengths[i] of log q(token_t | end-of-text, tokens
    before t); q: the model's next-token distribution, or the decoder's (decoder_logits' kwargs)."""
    out = []
    for i in range(0, len(rows), batch_size):
        y = rows[i:i + batch_size].to(device)  # (B, L)
        x = torch.cat((torch.full_like(y[:, :1], eot), y[:, :-1]), dim=1)  # (B, L): shifted right
        with ctx:
            logits = model.lm_head(model.hidden(x))  # (B, L, V)
        logp = F.log_softmax(decoder_logits(logits, **(decoder or {})), dim=-1)
        picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, L): log q(y_t | before t)
        scored = torch.arange(y.size(1), device=device) < lengths[i:i + batch_size, None].to(device)
        out.append(torch.where(scored, picked, 0.0).sum(1).double().cpu())  # (B,)
    return torch.cat(out).numpy()


@torch.no_grad()
def split_loss(model, ids, device='cpu', batch_size=500):
    """Mean next-token loss (nats/token) of a GPT over a whole split cut into consecutive windows
    of block_size tokens (each window's first token has no context, as a validation batch's)."""
    T = model.config.block_size
    windows = (len(ids) - 1) // T
    ids = torch.as_tensor(np.asarray(ids[:windows * T + 1], dtype=np.int64))
    x, y = (t.view(-1, T).split(batch_size) for t in (ids[:-1], ids[1:]))  # (<= batch_size, T)
    return sum(model(a.to(device), b.to(device))[1].item() * len(a) for a, b in zip(x, y)) / windows


def ratio_se(a, b):
    """(mean(a) / mean(b), its standard error by the delta method) over paired samples a, b."""
    r = a.mean() / b.mean()
    se = float((a - r * b).std(ddof=1) / math.sqrt(len(a)) / b.mean()) if len(a) > 1 else None
    return float(r), se


def kl_estimates(fwd_log_p, fwd_log_q, fwd_tokens, log_q, log_p, tokens):
    """Theorem 5.5's quantities (nats/token) with standard errors (key + '_se') from sentence
    log-probs: fwd_* of sentences from p, the rest of n from q (tokens: with end-of-text)."""
    # forward_kl = KL(p || q) = E_p[log p - log q] / E_p[tokens] (log p: data.true_logprobs)
    forward, forward_se = ratio_se(fwd_log_p - fwd_log_q, fwd_tokens)
    # off_support: the share of q's sentences off p's support S (p = 0); q(S) = 1 - off_support
    on, n = np.isfinite(log_p), len(log_p)
    q_on = on.mean()
    out = dict(forward_kl=forward, forward_kl_se=forward_se, off_support=float(1 - q_on),
               off_support_se=math.sqrt(q_on * (1 - q_on) / n), reverse_kl=None, reverse_kl_se=None)
    # model_entropy = -E_q[log q] / E_q[tokens], q's entropy rate
    out['model_entropy'], out['model_entropy_se'] = ratio_se(-log_q, tokens)
    # reverse_kl = KL(q_S || p) = E_{q_S}[log q - log p] - log q(S), q_S: q renormalised on S
    if on.any():
        per_token, se = ratio_se(log_q[on] - log_p[on], tokens[on])
        out['reverse_kl'] = per_token - math.log(q_on) / tokens[on].mean()
        if se is not None:  # plus log q(S)'s variance, (1 - q(S)) / (n q(S)) by the delta method
            log_qs_var = (1 - q_on) / (n * q_on) / tokens[on].mean() ** 2  # per token
            out['reverse_kl_se'] = math.sqrt(se ** 2 + log_qs_var)
    return out


@torch.no_grad()
def distribution_metrics(model, tok, corpus, train_ids, val_ids, n=5000, max_tokens=None,
                         decoder=None, device='cpu', ctx=nullcontext(), seed=0, batch_size=500,
                         val=True):
    """Theorem 5.5 on the synthetic corpus, p known exactly: kl_estimates; train_share, the share of
    the model's n sentences found verbatim in the training split, against train_true_mass, p's exact
    mass on the distinct training sentences (a perfect model's share; _se 0); excess = their
    difference, the theorem's excess mass on the empirical support. val_gap = val_split_loss -
    entropy_rate is not forward_kl: validation windows begin mid-sentence (a higher loss) and after
    other sentences (context a lone end-of-text lacks; val=False leaves both out). tail_lost: p's
    mass on the templates none of the model's sentences has (tail_lost_by_chance: what sampling p
    itself loses, on average). {}, or only distribution_skipped (why), when it cannot run."""
    if corpus is None or tok.name != 'word' or not model.config.causal:
        return {}
    longest, block_size = max(len(t) + 1 for t in corpus.templates), model.config.block_size
    if longest > block_size:
        why = f"block_size {block_size} < {longest}, the longest sentence's tokens"
        return dict(distribution_skipped=why)
    was_training, rng, eot = model.training, np.random.default_rng(seed), tok.eot
    max_tokens = min(max_tokens or 2 * longest, block_size)  # a row and its end-of-text start fit
    model.eval()
    # n sentences from p, scored by p and the model's own q (a truncating decoder's q could be 0)
    truth = [[tok.index[w] for w in s] + [eot] for s in corpus.sample_sentences(n, rng)]
    fwd_tokens = torch.tensor([len(s) for s in truth])
    rows = torch.tensor([s + [eot] * (max(map(len, truth)) - len(s)) for s in truth])  # (n, L)
    fwd_log_q = sentence_logprobs(model, rows, fwd_tokens, eot, None, device, ctx, batch_size)
    fwd_log_p = true_logprobs(corpus, tok, *row_sentences(rows, fwd_tokens))
    # n sentences from q, the decoder's, under their own seed (global RNG untouched), scored by it
    d = {'temperature': 1.0, 'top_p': 1.0, **(decoder or {})}
    d['top_k'] = d.get('top_k') or None  # 0: off, as for sample_texts
    drawn, cuda = [], [torch.device(device)] if str(device).startswith('cuda') else []
    with torch.random.fork_rng(devices=cuda), ctx:
        torch.manual_seed(seed)
        for i in range(0, n, batch_size):
            start = torch.full((min(batch_size, n - i), 1), eot, device=device)  # (B, 1)
            out = model.generate(start, max_tokens, d['temperature'], d['top_k'], eot, d['top_p'])
            drawn.append(out[:, 1:].cpu())  # (B, max_tokens): the start dropped
        drawn = torch.cat(drawn)  # (n, max_tokens), end-of-text after the first
    # a sentence's tokens: its words and first end-of-text, or all max_tokens if unclosed (p = 0)
    closed = (drawn == eot).any(1)
    tokens = torch.where(closed, (drawn == eot).int().argmax(1) + 1, max_tokens)  # (n,)
    log_q = sentence_logprobs(model, drawn, tokens, eot, d, device, ctx, batch_size)
    val_loss = split_loss(model, val_ids, device, batch_size) if val else None
    model.train(was_training)
    words, sent, _ = row_sentences(drawn, tokens)
    log_p = np.where(closed, true_logprobs(corpus, tok, words, sent, n), -math.inf)
    kl = kl_estimates(fwd_log_p, fwd_log_q, fwd_tokens.double().numpy(),
                      log_q, log_p, tokens.double().numpy())
    # Theorem 5.5's empirical support: the distinct training sentences, each with its exact log p
    train = split_sentences(train_ids, eot)
    train_lp = dict(zip(sentence_keys(*train), true_logprobs(corpus, tok, *train)))
    in_train = np.array([k in train_lp for k in sentence_keys(words, sent, n)]) & closed.numpy()
    share, mass = float(in_train.mean()), float(np.exp(list(train_lp.values())).sum())
    share_se = math.sqrt(share * (1 - share) / n)
    modes = template_labels(corpus, tok.words, words, sent, n)[closed.numpy()]
    p_mode = np.asarray(corpus.mode_probs)
    out = dict(**kl, train_share=share, train_share_se=share_se, train_true_mass=mass,
               train_true_mass_se=0.0, excess=share - mass, excess_se=share_se,
               tail_lost=float(np.delete(p_mode, modes[modes >= 0]).sum()),
               tail_lost_by_chance=float((p_mode * (1 - p_mode) ** n).sum()),
               n_distribution_samples=n)
    if val:
        out.update(val_split_loss=val_loss, val_gap=val_loss - corpus.entropy_rate())
    return out


# the exact quantities logged at every eval (train.eval_row), each against steps: a trajectory
EXACT = ('forward_kl', 'reverse_kl', 'off_support', 'model_entropy', 'train_share', 'excess',
         'tail_lost')


def exact_metrics(model, data, c, ctx=nullcontext()):
    """Theorem 5.5's exact quantities now: distribution_metrics on eval_dist_samples, no val loss,
    the run's decoder and seed (end of run's, at equal n); {} under FSDP, off rank 0 (it logs)"""
    if c['fsdp'] or not is_rank0():
        return {}
    m = distribution_metrics(model, data.tok, data.corpus, data.train, data.val, ctx=ctx, val=False,
                             n=c['eval_dist_samples'], device=c['device'], seed=c['seed'],
                             decoder={k: c[k] for k in ('temperature', 'top_k', 'top_p')})
    return {k: m[k] for k in EXACT if k in m}
