"""Metrics of Sec. 6 as plain functions on tokens, text, logits or hidden states; evaluate()
computes them all at the end of a training run (train.py writes them to report.json, and
tables.py reads them from there). Text metrics count words, not tokens, so that runs with different
tokenizers compare, and are also computed on the corpus cut like the samples, at the same size."""
import math
import re
from collections import Counter, namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from data import WORD_BYTES, count_words as word_counts, entropy, get_batch, row_sentences, sentence_keys, split_sentences
from model import decoder_logits, mask_id, mask_tokens
from stabilize import PIECE


def words(text):
    """The words of a text: maximal runs of [A-Za-z'], lowercased."""
    return ' '.join(re.findall(r"[A-Za-z']+", text)).lower().split()


def high_frequency_set(corpus_text, fraction=0.25):
    """The fewest most frequent words (count, then a-z) of a text or Counter covering `fraction`."""
    assert 0 < fraction <= 1, fraction
    counts = corpus_text if isinstance(corpus_text, Counter) else word_counts(corpus_text)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    cum = np.cumsum([n for _, n in ranked])
    return {w for w, _ in ranked[:int(np.searchsorted(cum, fraction * cum[-1])) + 1]}


def high_frequency_proportion(text, hf_set):
    """Share of the words of `text` (a string, list of words or dict word -> count) in hf_set."""
    counts = Counter(words(text) if isinstance(text, str) else text)
    total = sum(counts.values())
    return sum(counts[w] for w in hf_set) / total if total else float('nan')


@torch.no_grad()
def predictive_entropy(logits, mask=None):
    """Mean over positions (those where mask is True; NaN for none) of the entropy (nats) of softmax(logits),
    0-dim (no host sync), PIECE elements (or a row) at a time: ~1 MiB of fp32 temporaries, not logits-sized."""
    z = logits.flatten(0, -2)  # (positions, V)
    weight = torch.ones(len(z), device=z.device) if mask is None else mask.reshape(-1).float()
    rows, total = max(1, PIECE // z.size(-1)), 0
    for piece, w in zip(z.split(rows), weight.split(rows)):  # piece: (rows, V)
        shifted = piece.float() - piece.amax(-1, keepdim=True).float()  # z - max z <= 0
        e = shifted.clamp_min_(-1e30).exp()  # a -inf logit (a decoder's): p = 0, and 0 * -1e30 adds nothing
        z_sum = e.sum(-1)  # Z / exp(max z), (rows,)
        total = total + ((z_sum.log() - (e * shifted).sum(-1) / z_sum) * w).sum()  # H = log Z - E_p[z]: terms >= 0
    return total / weight.sum()


def eot_mass(logits, eot, mask=None):
    """Mean over positions of the probability the model gives the end-of-text token."""
    p = torch.softmax(logits.float(), dim=-1)[..., eot]
    return (p[mask] if mask is not None else p).mean().item()


def effective_rank(hidden):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of hidden."""
    h = hidden.detach().reshape(-1, hidden.shape[-1]).double()  # (N, d): leading dims flattened, not centred
    s = torch.linalg.svdvals(h)
    s = s[s > s.max() * torch.finfo(hidden.dtype).eps * max(h.shape)]  # those above numpy's rank tolerance
    return math.exp(torch.special.entr(s / s.sum()).sum().item())


# tokenize() equals words() (tested), fast: data.py's WORD_BYTES, with '\n' as \x01, the word NL
BYTE_TO_WORD_CHAR = WORD_BYTES[:10] + b'\x01' + WORD_BYTES[11:]
NL, SEP = 0, 1
Encoded = namedtuple('Encoded', 'ids lens vocab')  # sequences: flat int64 ids, lengths, vocab size


def tokenize(texts):
    """Many texts -> (vocabulary, flat int64 ids: words >= 2, NL = '\\n', SEP ends a text)."""
    big = b' \x02 '.join(t.encode('utf-8', 'replace').translate(BYTE_TO_WORD_CHAR) for t in texts)
    tokens = (big + b' \x02').replace(b'\x01', b' \x01 ').split()
    index = {w: i for i, w in enumerate(dict.fromkeys([b'\x01', b'\x02'] + tokens))}
    ids = np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    return [w.decode() for w in index], ids


def encode(seqs):
    """Sequences of hashable tokens -> Encoded."""
    index = {}
    flat = [index.setdefault(t, len(index)) for s in seqs for t in s]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    return Encoded(np.array(flat, dtype=np.int64), lens, len(index))


def ngrams(seqs, n):
    """(codes, seq) of sequences (or an Encoded): a code per n-gram (none spans two) and its seq."""
    ids, lens, vocab = seqs if isinstance(seqs, Encoded) else encode(seqs)
    seq = np.repeat(np.arange(len(lens)), lens)
    pos = np.flatnonzero(np.arange(len(ids)) + n <= np.repeat(np.cumsum(lens), lens))
    base = np.uint64(vocab if max(vocab, 2) ** n < 2 ** 64 else 0x9E3779B97F4A7C15)  # else hashed
    codes = ids[pos].astype(np.uint64)
    for k in range(1, n):  # uint64 arithmetic wraps around
        codes = codes * base + ids[pos + k].astype(np.uint64)
    return codes, seq[pos]


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


def template_labels(corpus, vocab, ids, sent, n_sent):
    """corpus.mode_of of every sentence (equal to it, tested), -1 for none, fast: a sentence is
    coded as bytes, a byte per word, its slot (1, 2, ...; 0 = not a corpus word)."""
    slots = {s: k + 1 for k, s in enumerate(sorted(set(corpus.slot_of.values())))}
    assert len(slots) < 256, "too many slots for a byte each"
    code = np.array([slots.get(corpus.slot_of.get(w), 0) for w in vocab], np.uint8)[ids].tobytes()
    mode = {bytes(slots[s] for s in t): m for m, t in enumerate(corpus.templates)}
    ends = np.searchsorted(sent, np.arange(n_sent + 1)).tolist()  # sentence i: ends[i]:ends[i + 1]
    return np.array([mode.get(code[a:b], -1) for a, b in zip(ends, ends[1:])], dtype=np.int64)


def sentences(ids):
    """(sentence index of each of tokenize()'s ids, which sentences are complete): a sentence is a
    segment closed by end-of-text (NL); each sample's unfinished last one is not complete."""
    sent = np.cumsum(np.r_[True, ((ids == NL) | (ids == SEP))[:-1]]) - 1
    complete = np.zeros(sent.max(initial=-1) + 1, dtype=bool)
    complete[sent[ids == NL]] = True
    return sent, complete


def text_metrics(texts, hf_set, corpus=None, drop_first=False, eps=0.05):
    """All text metrics of generated samples; modes: corpus.mode_of's templates, else words. With
    drop_first (BERT, whose window starts anywhere) a sample's first sentence is not counted."""
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
    sentence_mean = float(sent_words[complete].mean()) if complete.any() else None
    return dict(n_samples=len(texts), n_words=len(enc.ids),  # sample_entropy: plug-in, of the words' unigrams
                sample_entropy=entropy(counts[counts > 0] / counts.sum()), hf_proportion=hf,
                **{f'distinct_{n}': distinct_n(enc, n) for n in (1, 2, 3)},
                seq_rep_4=seq_rep_n(enc, 4), loop_share=loop_share(enc),
                terminated=len(lengths) / len(texts), length_mean=mean, length_std=std,
                length_hist=hist, sentence_length_mean=sentence_mean, **mode_concentration(labels, eps),
                modes_kind='words' if corpus is None else 'templates')


def reference_texts(corpus_text, texts):
    """The corpus cut like the samples: len(texts) consecutive pieces of the mean sample length
    (characters), each starting just after a '\\n' (where a GPT sample starts)."""
    size = max(1, round(sum(map(len, texts)) / max(1, len(texts))))
    pieces, at = [], 0
    while len(pieces) < len(texts) and at < len(corpus_text):
        pieces.append(corpus_text[at:at + size])
        at = corpus_text.find('\n', at + size) + 1 or len(corpus_text)
    return pieces


@torch.no_grad()
def evaluate(model, tok, corpus_text, corpus, texts, val_ids, batch_size=8, n_batches=4,
             device='cpu', ctx=nullcontext(), fraction=0.25, eps=0.05, seed=0, counts=None):
    """Every metric of a trained model (raw GPT) and its texts, as a JSON-able dict: text_metrics,
    'corpus' = the same on reference_texts, and on validation batches H_pred, EOT mass, erank.
    counts: the Counter of the corpus's words (data.Data.word_counts), of which corpus_text is only
    a part for prepared bins; None: corpus_text's."""
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
# Theorem 5.5 measured literally: the synthetic corpus knows p, its distribution over sentences (words and
# closing end-of-text), exactly; the model's q is estimated from sentences drawn from p and from q.

def true_logprobs(corpus, tok, words, sent, n):
    """log p(s) of each of split_sentences' sentences: log P(template) + the sum of its words'
    log P(word | slot) (corpus.word_logprob); -inf where no template fits."""
    modes = template_labels(corpus, tok.words, words, sent, n)
    word_lp = np.array([corpus.word_logprob[w] for w in tok.words])
    lp = np.log(corpus.mode_probs)[modes] + np.bincount(sent, weights=word_lp[words], minlength=n)
    return np.where(modes >= 0, lp, -math.inf)


@torch.no_grad()
def sentence_logprobs(model, rows, lengths, eot, decoder=None, device='cpu', ctx=nullcontext(), batch_size=500):
    """log q(row) of each row of tokens (n, L), its first lengths[i] tokens scored from an
    end-of-text start: sum_t log q(token_t | end-of-text, tokens before t), q the model's next-token
    distribution, or the decoder's (dict of decoder_logits' arguments) when given."""
    out = []
    for i in range(0, len(rows), batch_size):
        y = rows[i:i + batch_size].to(device)                                   # (B, L)
        x = torch.cat((torch.full_like(y[:, :1], eot), y[:, :-1]), dim=1)       # (B, L): shifted right
        with ctx:
            logits = model.lm_head(model.hidden(x))                              # (B, L, V)
        logp = F.log_softmax(decoder_logits(logits, **(decoder or {})), dim=-1)
        picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)                   # (B, L)
        scored = torch.arange(y.size(1), device=device) < lengths[i:i + batch_size, None].to(device)
        out.append(torch.where(scored, picked, 0.0).sum(1).double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def split_loss(model, ids, device='cpu', batch_size=500):
    """Mean next-token loss (nats/token) of a GPT over a whole split cut into consecutive windows of
    block_size tokens (each window's first token has no context, as a validation batch's)."""
    T = model.config.block_size
    ids = torch.as_tensor(np.asarray(ids[:(len(ids) - 1) // T * T + 1], dtype=np.int64))
    x, y = ids[:-1].view(-1, T).split(batch_size), ids[1:].view(-1, T).split(batch_size)  # (<= batch_size, T) each
    return sum(model(a.to(device), b.to(device))[1].item() * len(a) for a, b in zip(x, y)) / ((len(ids) - 1) // T)


def ratio_se(a, b):
    """(mean(a) / mean(b), its standard error by the delta method) over paired samples a, b."""
    r = a.mean() / b.mean()
    return float(r), float((a - r * b).std(ddof=1) / math.sqrt(len(a)) / b.mean()) if len(a) > 1 else None


def kl_estimates(fwd_log_p, fwd_log_q, fwd_tokens, log_q, log_p, tokens):
    """Per-token estimates (nats) with standard errors from sentence log-probabilities: fwd_* of n
    sentences drawn from p, the others of sentences drawn from q (tokens: each one's, end-of-text included).
    forward_kl = KL(p || q) = mean(log p - log q) / mean tokens, on the sentences from p;
    off_support = the share of q's sentences with p = 0, q(S) = 1 - off_support the mass of p's support S;
    reverse_kl = KL(q_S || p), q_S = q restricted to S and renormalised: E_{q|S}[log q - log p] - log q(S),
    per token of the sentences in S;  model_entropy = -E_q[log q] / E_q[tokens]."""
    forward, forward_se = ratio_se(fwd_log_p - fwd_log_q, fwd_tokens)
    on, n = np.isfinite(log_p), len(log_p)
    q_on = on.mean()
    out = dict(forward_kl=forward, forward_kl_se=forward_se, off_support=float(1 - q_on),
               off_support_se=math.sqrt(q_on * (1 - q_on) / n), reverse_kl=None, reverse_kl_se=None)
    out['model_entropy'], out['model_entropy_se'] = ratio_se(-log_q, tokens)
    if on.any():  # log q(S) has variance (1 - q(S)) / (n q(S)) (delta method), added to the ratio's
        per_token, se = ratio_se(log_q[on] - log_p[on], tokens[on])
        out['reverse_kl'] = per_token - math.log(q_on) / tokens[on].mean()
        if se is not None:
            out['reverse_kl_se'] = math.sqrt(se ** 2 + (1 - q_on) / (n * q_on) / tokens[on].mean() ** 2)
    return out


@torch.no_grad()
def distribution_metrics(model, tok, corpus, train_ids, val_ids, n=5000, max_tokens=None, decoder=None,
                         device='cpu', ctx=nullcontext(), seed=0, batch_size=500):
    """kl_estimates from n sentences drawn from the corpus and n from the model (generated from an end-of-text
    by the decoder, at most max_tokens: twice the longest template's, within block_size; one left unclosed is
    off the support), and Theorem 5.5's counts: train_share, the share of the model's sentences found verbatim
    in the training split, against train_true_mass, p's exact mass on the distinct training sentences (_se 0);
    excess = their difference. forward_kl scores with the model's own q (a truncating decoder gives p's
    sentences q = 0), the rest with the decoder's. val_gap = validation loss - entropy_rate, not forward_kl:
    its windows begin mid-sentence (a higher loss) and after other sentences (context a lone end-of-text
    lacks). {} unless the corpus is synthetic with its word tokenizer and the model a causal GPT; only
    distribution_skipped (why) when block_size cannot hold the longest sentence with its end-of-text start."""
    if corpus is None or tok.name != 'word' or not model.config.causal:
        return {}
    longest, block_size = max(len(t) + 1 for t in corpus.templates), model.config.block_size
    if longest > block_size:
        return dict(distribution_skipped=f"block_size {block_size} < {longest}, the longest sentence's tokens")
    was_training, rng, eot = model.training, np.random.default_rng(seed), tok.eot
    max_tokens = min(max_tokens or 2 * longest, block_size)  # a drawn row and its end-of-text start fit in the window
    model.eval()
    truth = [[tok.index[w] for w in s] + [eot] for s in corpus.sample_sentences(n, rng)]
    fwd_tokens = torch.tensor([len(s) for s in truth])
    rows = torch.tensor([s + [eot] * (max(map(len, truth)) - len(s)) for s in truth])  # (n, longest)
    fwd_log_q = sentence_logprobs(model, rows, fwd_tokens, eot, None, device, ctx, batch_size)
    fwd_log_p = true_logprobs(corpus, tok, *row_sentences(rows, fwd_tokens))
    d = {'temperature': 1.0, 'top_p': 1.0, **(decoder or {})}
    d['top_k'] = d.get('top_k') or None  # 0: off, as for sample_texts
    with torch.random.fork_rng(devices=[torch.device(device)] if str(device).startswith('cuda') else []):
        torch.manual_seed(seed)
        with ctx:
            drawn = torch.cat([model.generate(torch.full((min(batch_size, n - i), 1), eot, device=device), max_tokens,
                                              d['temperature'], d['top_k'], eot, d['top_p'])[:, 1:].cpu()
                               for i in range(0, n, batch_size)])  # (n, max_tokens), end-of-text after the first
    closed = (drawn == eot).any(1)
    tokens = torch.where(closed, (drawn == eot).int().argmax(1) + 1, max_tokens)  # words + end-of-text, or the cap
    log_q = sentence_logprobs(model, drawn, tokens, eot, d, device, ctx, batch_size)
    val_loss = split_loss(model, val_ids, device, batch_size)
    model.train(was_training)
    words, sent, _ = row_sentences(drawn, tokens)
    log_p = np.where(closed, true_logprobs(corpus, tok, words, sent, n), -math.inf)
    train = split_sentences(train_ids, eot)
    train_lp = dict(zip(sentence_keys(*train), true_logprobs(corpus, tok, *train)))  # distinct sentence -> log p
    in_train = np.array([k in train_lp for k in sentence_keys(words, sent, n)]) & closed.numpy()
    share, mass = float(in_train.mean()), float(np.exp(list(train_lp.values())).sum())
    share_se = math.sqrt(share * (1 - share) / n)
    return dict(**kl_estimates(fwd_log_p, fwd_log_q, fwd_tokens.double().numpy(), log_q, log_p, tokens.double().numpy()),
                train_share=share, train_share_se=share_se, train_true_mass=mass, train_true_mass_se=0.0,
                excess=share - mass, excess_se=share_se, n_distribution_samples=n, val_split_loss=val_loss,
                val_gap=val_loss - corpus.entropy_rate())


# the table's columns: (name, metric, format; '%' = a percentage)
COLUMNS = [('hf', 'hf_proportion', '%'), ('H_pred', 'predictive_entropy', '.3f'), ('H_sample', 'sample_entropy', '.3f'),
           ('erank', 'effective_rank', '.1f'), ('modes', 'n_modes', ''), ('m(1-eps)', 'modes_for_mass', ''),
           ('top1', 'top1_mass', '%'), ('none', 'none_share', '%'), ('dist-2', 'distinct_2', '.3f'),
           ('rep-4', 'seq_rep_4', '.3f'), ('loops', 'loop_share', '%'), ('len', 'length_mean', '.2f'),
           ('eot', 'eot_mass', '.3f')]


def summary(m):
    """One line for the end of a run: the HF proportion (the corpus's too), the table's columns; and
    with distribution_metrics' keys a second: Theorem 5.5's estimates, each +- its standard error."""
    hf, corpus = fmt(m['hf_proportion'], '%'), fmt(m['corpus_hf_proportion'], '%')
    line = f"metrics: high-frequency words {hf} (corpus {corpus})" + ''.join(
        f" | {name} {fmt(m.get(k), spec)}" for name, k, spec in COLUMNS[1:])
    if 'forward_kl' not in m:  # not the synthetic corpus, or a window too short (then why)
        return line + (f"\ntheorem 5.5: not measured, {m['distribution_skipped']}" if 'distribution_skipped' in m else '')
    pm = lambda k, spec='.3f': f"{fmt(m[k], spec)}±{fmt(m[k + '_se'], spec)}"  # noqa: E731
    return (f"{line}\ntheorem 5.5: forward KL {pm('forward_kl')} | reverse KL {pm('reverse_kl')} | off-support "
            f"{pm('off_support', '%')} | entropy {pm('model_entropy')} (true {m['entropy_rate']:.3f}) | train share "
            f"{pm('train_share', '%')} (true mass {fmt(m['train_true_mass'], '%')}) | val gap {m['val_gap']:.3f}")


def fmt(v, spec):
    """A number for a table: '-' for None or NaN."""
    return '-' if v is None or math.isnan(v) else format(v, '.1%' if spec == '%' else spec)
