"""data.py: the offline GPT-2 BPE, the tokenizers' round trips, the synthetic corpus's stated
structure (entropy rate, modes), and one-line errors for bad data files."""
import math
import os

import numpy as np
import pytest
import torch

import data


@pytest.fixture(scope='module')
def enc():
    return data.gpt2_encoding()


TEXT = "Hello world! It's 2024: naïve café, 100 tokens\n\nand a second    paragraph.\n"


def test_gpt2_encoding_known_ids(enc):
    assert enc.encode_ordinary('Hello world') == [15496, 995]
    assert enc.encode_ordinary(' the') == [262]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT


def test_gpt2_tokenizer_full_and_compact_round_trip(enc):
    full = data.GPT2Tokenizer()
    assert full.vocab_size == 50257 and full.encode(TEXT) == enc.encode_ordinary(TEXT)
    assert full.decode(full.encode(TEXT)) == TEXT
    gids = enc.encode_ordinary(TEXT)
    keep = sorted(set(gids))
    tok = data.GPT2Tokenizer(keep)
    ids = tok.encode(TEXT)
    assert tok.vocab_size == len(keep) and max(ids) < len(keep)
    assert [keep[i] for i in ids] == gids
    assert tok.decode(ids) == TEXT
    rebuilt = data.tokenizer_from_state(tok.state())
    assert rebuilt.encode(TEXT) == ids and rebuilt.decode(ids) == TEXT
    with pytest.raises(KeyError) as missing:  # the text of the first GPT-2 token outside `keep`
        tok.encode('Zebra xylophone')
    assert missing.value.args[0] in 'Zebra xylophone' and enc.encode_ordinary(missing.value.args[0])[0] not in keep


def test_load_data_file_gpt2_compact_and_char(tmp_path):
    path = tmp_path / 'corpus.txt'
    text = TEXT * 40
    path.write_text(text, encoding='utf-8')
    train, val, tok, got, corpus = data.load_data(str(path), 'auto')
    assert corpus is None and got == text and tok.name == 'gpt2-compact'
    assert tok.decode(np.concatenate([train, val]).tolist()) == text
    assert len(val) == max(1, int((len(train) + len(val)) * 0.1))
    train, val, tok, _, _ = data.load_data(str(path), 'char')
    assert tok.name == 'char' and tok.vocab_size == len(set(text))
    assert tok.decode(np.concatenate([train, val]).tolist()) == text
    assert data.tokenizer_from_state(tok.state()).encode(text) == tok.encode(text)
    with pytest.raises(SystemExit, match='synthetic'):
        data.load_data(str(path), 'word')
    with pytest.raises(SystemExit, match='unknown tokenizer'):
        data.load_data(str(path), 'bpe')


@pytest.fixture(scope='module')
def corpus():
    return data.SyntheticCorpus(1337)


def test_synthetic_entropy_rate_matches_empirical(corpus):
    """Stated rate vs mean(-log P(sentence)) / mean(tokens incl. end-of-text) over 100k sampled
    sentences. The ratio estimator's standard error (delta method) is ~0.13% of the rate here,
    so the 1% tolerance is > 7 standard errors, and the test asserts that too."""
    rng = np.random.default_rng(0)
    sents = corpus.sample_sentences(100_000, rng)
    nll = np.array([-corpus.sentence_logprob(s) for s in sents])
    length = np.array([len(s) + 1 for s in sents], dtype=np.float64)
    assert np.isfinite(nll).all()
    true = corpus.entropy_rate()
    emp = nll.mean() / length.mean()
    cov = np.cov(nll, length)
    mx, my, n = nll.mean(), length.mean(), len(sents)
    se = math.sqrt((cov[0, 0] / my**2 - 2 * mx * cov[0, 1] / my**3 + mx**2 * cov[1, 1] / my**4) / n)
    assert 4 * se < 0.01 * true
    assert abs(emp - true) < 0.01 * true, (emp, true)


def test_synthetic_mode_of_recovers_template(corpus):
    rng = np.random.default_rng(1)
    for _ in range(2000):
        m = int(rng.choice(len(corpus.templates), p=corpus.mode_probs))
        words = []
        for kind, i in corpus.templates[m]:
            if kind == 'w':
                words.append(corpus.function_words[i])
            else:
                words.append(corpus.classes[i][int(rng.choice(len(corpus.classes[i]), p=corpus.class_probs[i]))])
        assert corpus.mode_of(words) == m
    for s in corpus.sample_sentences(500, rng):  # and the corpus's own sampler
        assert corpus.mode_of(s) is not None
        assert corpus.sentence_logprob(s) <= 0
    assert corpus.mode_of(['notaword']) is None
    assert corpus.sentence_logprob(['notaword']) == -math.inf
    # probabilities of the modes and of each class sum to one (float64, <= 64 terms: the normaliser's sum, the divisions
    # and this sum err <= 3 * 64 eps64 = 2e-14)
    assert abs(sum(corpus.mode_probs) - 1) < 1e-12
    assert all(abs(p.sum() - 1) < 1e-12 for p in corpus.class_probs)


def test_synthetic_is_seeded(corpus):
    assert data.SyntheticCorpus(1337).text(50, 3) == corpus.text(50, 3)
    assert data.SyntheticCorpus(7).words != corpus.words


def test_word_tokenizer_round_trip(corpus):
    text = corpus.text(300, 5)
    tok = data.WordTokenizer(corpus.words)
    ids = tok.encode(text)
    assert tok.vocab_size == len(corpus.words) + 1 and tok.eot == len(corpus.words)
    assert ids.count(tok.eot) == text.count('\n')
    assert tok.decode(ids) == text
    assert data.tokenizer_from_state(tok.state()).decode(ids) == text
    with pytest.raises(KeyError, match='hello'):  # sample.prompt_ids names --start with it
        tok.encode('hello there')


def test_load_data_synthetic_default():
    train, val, tok, text, corpus = data.load_data('synthetic', 'auto', n_sentences=2000)
    assert tok.name == 'word' and corpus is not None
    assert tok.decode(np.concatenate([train, val]).tolist()) == text
    assert train.dtype == np.int32 and int(max(train.max(), val.max())) < tok.vocab_size


def test_get_batch_shapes_and_shift():
    ids = np.arange(1000, dtype=np.int32)
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch(ids, 4, 16, g, 'cpu')
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    x2, _ = data.get_batch(ids, 4, 16, torch.Generator().manual_seed(0), 'cpu')
    assert torch.equal(x, x2)  # the generator alone decides the batch


@pytest.mark.parametrize('content,match', [(None, 'does not exist'), (b'', 'is empty'),
                                           (b'  \n\t\n', 'is empty'), (b'ok \xff\xfe bad', 'not UTF-8')])
def test_bad_data_file_is_one_line_error(tmp_path, content, match):
    path = tmp_path / 'data.txt'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        data.load_data(str(path), 'auto')
    msg = str(e.value.code)
    assert match in msg and '\n' not in msg and str(path) in msg


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='no FIFOs here')
def test_data_file_that_is_not_a_regular_file(tmp_path):
    """A folder (tables.py --corpus=) or a FIFO (train.py --data= too) exists: it is named as not a regular
    file, not as missing, and never read."""
    os.mkfifo(tmp_path / 'fifo')
    for path in (str(tmp_path), str(tmp_path / 'fifo')):
        with pytest.raises(SystemExit) as e:
            data.read_text(path)
        assert e.value.code == f"error: data file {path!r} is not a regular file"


def test_block_size_is_checked_against_each_split():
    """A window takes block_size + 1 tokens, and drawing one needs one more: a 10-token split serves block_size 8 at most,
    and the error names the split that is short (the validation split, the smaller one, in a text file's 9:1)."""
    tok = data.CharTokenizer('ab')
    data.check_data(np.zeros(100), np.zeros(10), tok, None, {'block_size': 8, 'out_dir': 'out'})
    for train, val, split in ((100, 10, 'val'), (10, 100, 'train')):
        with pytest.raises(SystemExit) as e:
            data.check_data(np.zeros(train), np.zeros(val), tok, None, {'block_size': 9, 'out_dir': 'out'})
        assert str(e.value) == (f"error: block_size=9 is too long for the data's {split} split (10 tokens); "
                                f"use --block_size=8 or less, or more data")
