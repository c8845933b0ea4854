"""Tests of metrics.py (each metric on inputs whose answer is known) and of tables.py on run folders."""
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import data
import metrics
import tables
from conftest import ROOT, run
from data import SyntheticCorpus, WordTokenizer
from model import GPT, GPTConfig

MESSY = "Don't STOP, café's naïve-test!\n\nx1y 'quoted' \x01a\x02b\r\n\tend'"


@pytest.fixture(scope='module')
def corpus():
    return SyntheticCorpus(1337)


def test_words_and_fast_tokenizer_agree():
    assert metrics.words("Don't STOP, me-now!") == ["don't", 'stop', 'me', 'now']
    assert metrics.word_counts(MESSY) == Counter(metrics.words(MESSY))
    vocab, ids = data.tokenize([MESSY, 'A b', ''])
    toks = [vocab[i] for i in ids]
    assert [t for t in toks if t not in ('\x01', '\x02')] == metrics.words(MESSY) + ['a', 'b']
    assert toks.count('\x02') == 3 and toks.count('\x01') == MESSY.count('\n')


def test_high_frequency_set_is_minimal_and_covers(corpus):
    text = corpus.text(2000, seed=1)
    counts = Counter(metrics.words(text))
    total = sum(counts.values())
    for fraction in (0.25, 0.5, 0.9):
        hf = metrics.high_frequency_set(text, fraction)
        assert sum(counts[w] for w in hf) >= fraction * total
        least = min(hf, key=lambda w: (counts[w], w))
        assert sum(counts[w] for w in hf - {least}) < fraction * total
        assert min(counts[w] for w in hf) >= max(counts[w] for w in counts if w not in hf)
    assert metrics.high_frequency_set("a a a a b b c d", 0.5) == {'a'}
    assert metrics.high_frequency_set("a a a a b b c d", 0.6) == {'a', 'b'}
    assert metrics.high_frequency_proportion("A b, a Z", {'a'}) == 0.5
    assert metrics.high_frequency_proportion(text, metrics.high_frequency_set(text)) >= 0.25


def test_entropy_eot_mass_and_effective_rank():
    V = 50
    # float32 against float64: log's <= 1 ulp (2 eps32, eps32 = 2^-24 float32's unit roundoff), then sums of equal terms
    assert metrics.predictive_entropy(torch.zeros(2, 3, V)).item() == pytest.approx(math.log(V), rel=8 * 2 ** -24)  # + 6 rows: <= 8 eps32
    peaked = torch.full((4, V), -1e4)
    peaked[:, 7] = 0
    assert metrics.predictive_entropy(peaked).item() == 0.0  # exp(-1e4) is 0 in float32, log 1 = 0: exact
    mask = torch.tensor([True, False, False, False])
    mixed = torch.cat([torch.zeros(1, V), peaked[1:]])
    assert metrics.predictive_entropy(mixed, mask).item() == pytest.approx(math.log(V), rel=2 * 2 ** -24)  # log 50 alone
    assert math.isnan(metrics.predictive_entropy(mixed, torch.zeros(4, dtype=torch.bool)).item())  # no position
    ruled_out = torch.zeros(2, V)
    ruled_out[:, V // 2:] = -math.inf  # a decoder's top-k: half the vocabulary, p = 0
    assert metrics.predictive_entropy(ruled_out).item() == pytest.approx(math.log(V // 2), rel=2 * 2 ** -24)  # log 25 (2 rows: exact)
    assert metrics.eot_mass(torch.zeros(3, V), 4) == pytest.approx(1 / V, rel=4 * 2 ** -24)  # 1 / 50, a mean of 3: <= 4 eps32
    assert metrics.eot_mass(peaked, 7) == 1.0  # exp(0) / (1 + 0): exact
    assert metrics.text_metrics(['a b', 'c d'], set())['sample_entropy'] == pytest.approx(math.log(4), rel=1e-12)  # fp64: ~1e-16
    assert metrics.text_metrics(['a ' * 9], set())['sample_entropy'] == 0
    q, _ = torch.linalg.qr(torch.randn(16, 5, dtype=torch.float64))
    assert metrics.effective_rank(q.T) == pytest.approx(5, rel=1e-12)  # 5 orthonormal vectors (fp64 QR, SVD: 1 +- ~1e-15)
    # float32's rounding leaves singular values <= eps32 s_max, 80x under the rank tolerance: one value, exp(0) = 1 exactly
    assert metrics.effective_rank(torch.randn(40, 1) * torch.randn(1, 16)) == 1.0
    assert 1 < metrics.effective_rank(torch.randn(2, 100, 16)) <= 16


def test_distinct_and_seq_rep():
    # counts over counts: each side one float64 division (and 1 - x, a mean of x and 0) of the same integers, exact
    assert metrics.distinct_n([['a', 'b', 'c'], ['a', 'b', 'd']], 1) == 4 / 6
    assert metrics.distinct_n([['a', 'b', 'c'], ['a', 'b', 'd']], 2) == 3 / 4
    assert metrics.distinct_n([['a', 'b'], ['b', 'c']], 2) == 1.0  # no n-gram across sequences
    loop = [0, 1, 2] * 10  # period 3, 30 tokens: 27 4-grams, 3 unique -> 1 - 3/27
    assert metrics.seq_rep_n([loop], 4) == 1 - 3 / 27
    assert metrics.seq_rep_n([[5] * 50], 4) == 1 - 1 / 47
    assert metrics.seq_rep_n([list(range(30))], 4) == 0
    assert metrics.seq_rep_n([loop, list(range(30)), [1, 2]], 4) == (1 - 3 / 27) / 2
    big = list(range(70_000))  # 70000**4 > 2**63: the hashed n-gram codes
    assert metrics.distinct_n([big, big[:10] * 2], 4) == (69_997 + 3) / (69_997 + 17)  # 3 new: 7890 8901 9012
    assert metrics.seq_rep_n([big[:10] * 2], 4) == 1 - 10 / 17


def test_loop_share():
    rng = np.random.default_rng(0)
    looped = list(rng.integers(1000, size=15)) + [1, 2, 3, 4, 5, 6, 7] * 5  # tail of period 7
    distinct = list(range(60))
    assert metrics.loop_share([looped, distinct, [3] * 10, [3] * 25, []], max_period=10, tail=20) == 0.4
    assert metrics.loop_share([list(range(10)) * 3], max_period=10, tail=20) == 1.0  # period 10, 30 tokens
    assert metrics.loop_share([list(range(10)) * 3], max_period=9, tail=20) == 0.0


def test_lengths_and_sentences():
    m = metrics.text_metrics(["a b c\nd e\nf", "a b c d", "\nx y\n"], {'a'})
    assert m['terminated'] == 2 / 3  # counts over counts: one float64 division each side, exact
    assert m['length_mean'] == 1.5 and m['length_hist'] == {'0': 1, '3': 1}
    assert m['sentence_length_mean'] == (3 + 2 + 0 + 2) / 4
    bert = metrics.text_metrics(["a b c\nd e\nf", "\nx y\n"], {'a'}, drop_first=True)
    assert bert['sentence_length_mean'] == 2
    assert m['hf_proportion'] == 2 / 12


def test_template_labels_equal_mode_of(corpus):
    rng = np.random.default_rng(3)
    sents = corpus.sample_sentences(300, rng)
    sents += [s[::-1] for s in sents[:50]] + [s[:-1] for s in sents[50:100]] + [s + s[:1] for s in sents[100:120]]
    sents += [s + ['zzz'] for s in sents[120:140]] + [[], ['zzz'] + sents[0], sents[1] * 3]
    first = min(corpus.slot_of.values())  # its words -> a non-word, in place: in no mode
    sents += [['zzz' if corpus.slot_of[w] == first else w for w in s] for s in sents[140:200]
              if first in map(corpus.slot_of.get, s)]
    vocab, ids = data.tokenize([''.join(' '.join(s) + '\n' for s in sents) + 'unfinished'])
    sent, complete = data.sentences(ids)
    word = ids > data.SEP
    labels = data.template_labels(corpus, vocab, ids[word], sent[word], len(complete))[complete]
    expected = [corpus.mode_of(s) for s in sents]
    assert labels.tolist() == [-1 if e is None else e for e in expected]
    assert sum(e is None for e in expected) > 50


def test_true_sampler_keeps_all_modes_constant_sampler_one(corpus):
    rng = np.random.default_rng(7)
    sents = corpus.sample_sentences(6000, rng)
    texts = [''.join(' '.join(s) + '\n' for s in sents[i:i + 10]) + 'half a sentence' for i in range(0, 6000, 10)]
    hf = metrics.high_frequency_set(corpus.text(3000, seed=2))
    m = metrics.text_metrics(texts, hf, corpus)
    assert m['n_labels'] == 6000 and m['none_share'] == 0
    assert m['n_modes'] >= 0.95 * len(corpus.templates)
    assert m['top1_mass'] == pytest.approx(corpus.mode_probs[0], abs=0.03)  # a share of 6000: se 0.0056, 0.03 = 5.4 se (~1e-7)
    # the 95% point of 6000 draws: se sqrt(.95 * .05 / 6000) = 0.0028 of mass, ~0.8 of a mode's 0.0035 there: 3 modes ~ 3.7 se (~2e-4)
    assert abs(m['modes_for_mass'] - metrics.smallest_set(corpus.mode_probs, 0.05)) <= 3
    assert m['loop_share'] == 0 and m['seq_rep_4'] < 0.1
    same = ' '.join(sents[0]) + '\n'
    c = metrics.text_metrics([same * 12] * 50, hf, corpus)
    assert (c['n_modes'], c['modes_for_mass'], c['top1_mass'], c['none_share']) == (1, 1, 1.0, 0.0)
    assert c['loop_share'] == 1.0 and c['distinct_1'] < 0.01
    labels = [corpus.mode_of(s) for s in sents]
    assert metrics.mode_concentration(labels)['n_modes'] == m['n_modes']
    assert metrics.mode_concentration(['x'] * 9 + [None])['none_share'] == 1 / 10  # exact: 0.1 is 1 / 10 rounded once
    w = metrics.text_metrics(['b a a a a'] * 3, hf)  # on other text the modes are words
    assert (w['modes_kind'], w['n_modes'], w['top1_mass'], w['modes_for_mass']) == ('words', 2, 0.8, 2)


def test_cross_seed():
    stats = tables.cross_seed([{'a': 1.0, 'b': 2, 's': 'x'}, {'a': 3.0, 'b': 2, 's': 'y'}])
    assert stats == {'a': (2.0, math.sqrt(2)), 'b': (2.0, 0.0)}  # std of [1, 3]: sqrt(2 / 1), correctly rounded: exact


@pytest.mark.parametrize('causal', [True, False])
def test_evaluate_on_a_tiny_model(corpus, causal):
    tok = WordTokenizer(corpus.words)
    text = corpus.text(300, seed=4)
    ids = np.array(tok.encode(text), dtype=np.int32)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size + (not causal),
                          causal=causal))
    texts = [text[:200], text[200:400]]
    m = metrics.evaluate(model, tok, text, corpus, texts, ids, batch_size=4, n_batches=2)
    # an untrained model is ~uniform: logits of variance n_embd 0.02^2 = 0.0064 put H at log V - 0.003; 0.1 is 30x that
    assert abs(m['predictive_entropy'] - math.log(model.config.vocab_size)) < 0.1
    assert 1 <= m['effective_rank'] <= 16 and 0 < m['eot_mass'] < 0.1
    assert 0.25 <= m['corpus_hf_proportion'] < 0.5 and m['n_modes_total'] == 64
    assert m['corpus']['n_samples'] == 2 and m['corpus']['none_share'] == 0  # pieces start at a sentence
    json.dumps(m)
    line = tables.summary(m)  # the proportions as percentages, then each table column
    assert line.startswith(f"metrics: high-frequency words {100 * m['hf_proportion']:.1f}% "
                           f"(corpus {100 * m['corpus_hf_proportion']:.1f}%) | H_pred {m['predictive_entropy']:.3f} | ")
    length = '-' if m['length_mean'] is None else f"{m['length_mean']:.2f}"
    assert line.endswith(f" | len {length} | eot {m['eot_mass']:.3f}")


def test_evaluate_takes_the_corpus_word_counts(corpus):
    """counts stand for the corpus where corpus_text is only a part of it (prepared bins)."""
    tok = WordTokenizer(corpus.words)
    text = corpus.text(300, seed=4)
    ids = np.array(tok.encode(text), dtype=np.int32)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=tok.vocab_size))
    texts, part, keys = [text[:200], text[200:400]], text[:300], ('hf_set_size', 'corpus_hf_proportion', 'hf_proportion')
    whole, given, alone = (metrics.evaluate(model, tok, t, corpus, texts, ids, batch_size=4, n_batches=2, counts=c)
                           for t, c in [(text, None), (part, Counter(metrics.words(text))), (part, None)])
    assert [given[k] for k in keys] == [whole[k] for k in keys] != [alone[k] for k in keys]


def test_train_reports_hf_of_the_whole_prepared_corpus(tmp_path, monkeypatch, corpus):
    """With prepared bins train.py holds only an excerpt of the text (data.EXCERPT tokens): the report's
    high-frequency numbers come from the word counts of the whole corpus (meta.json's)."""
    import data
    src = tmp_path / 'corpus.txt'
    src.write_text(corpus.text(400, seed=5))
    data.prepare(str(src), str(tmp_path / 'bins'), tokenizer='char', val_fraction=0.1)
    monkeypatch.setattr(data, 'EXCERPT', 500)
    run(str(tmp_path / 'run'), f'--data={tmp_path}/bins', '--eval_interval=2', iters=2)
    m = json.load(open(tmp_path / 'run' / 'report.json'))['metrics']
    counts = Counter(metrics.words(src.read_text()))
    hf = metrics.high_frequency_set(counts)
    assert (m['hf_set_size'], m['corpus_hf_proportion']) == (len(hf), metrics.high_frequency_proportion(counts, hf))
    part = metrics.high_frequency_set(metrics.word_counts(data.load_data(str(tmp_path / 'bins'), 'auto').text))
    assert len(part) != len(hf)  # the excerpt alone would give other numbers


def write_run(path, seed, lam, hf, channels='both', **more):
    os.makedirs(path)
    config = dict(model='gpt', seed=seed, size='tiny', n_layer=1, n_embd=32, psu_lambda=lam, data='synthetic',
                  psu_channels=channels)
    config.update(more)
    m = dict(hf_proportion=hf, corpus_hf_proportion=0.277, predictive_entropy=2.0, n_modes=3)
    json.dump(dict(config=config, stability={'verdict': 'stable'}, metrics=m), open(f'{path}/report.json', 'w'))
    with open(f'{path}/log.jsonl', 'w') as f:
        for i in range(30):
            f.write(json.dumps(dict(iter=i, loss=5 - i / 10, entropy=6 - i / 8)) + '\n')
        f.write(json.dumps(dict(iter=30, val_loss=2.5, val_bpb=0.75)) + '\n')


def test_cli_table_on_run_folders(tmp_path, capsys):
    real = str(tmp_path / 'real')
    run(real, '--max_iters=8', '--eval_interval=4', '--num_samples=8', '--seed=2026', '--psu_lambda=0.2')
    report = json.load(open(f'{real}/report.json'))
    assert report['stability'] == {'verdict': 'undetermined', 'reason': '3 evals, need 4'}  # iters 0, 4, 8
    ours = report['metrics']['hf_proportion']
    assert 0 < ours < 1 and report['metrics']['n_samples'] == 8
    assert tables.summary(report['metrics']) in capsys.readouterr().out  # train.py's last words
    write_run(str(tmp_path / 'a'), 2026, 0.0, 0.2345)
    write_run(str(tmp_path / 'b'), 2027, 0.0, 0.3)
    write_run(str(tmp_path / 'c'), 2026, 0.05, 0.5, channels='stats')
    tables.main([real, str(tmp_path / 'a'), str(tmp_path / 'b'), str(tmp_path / 'c')])
    out = capsys.readouterr().out
    assert f'{100 * ours:.1f}% / 100.0%' in out  # the real run: seed 2026, lambda 0.2
    assert '23.4% / 26.7%' in out and '- / 61.2%' in out and '30.0% / 26.3%' in out
    assert 'psu_channels=stats' in out and '50.0% / 61.2%' in out
    rows = {line.split('  ')[0]: line.split() for line in out.splitlines()}
    assert rows['gpt 2026 tiny(1x32) synthetic'][-3:] == ['2.5000', '0.7500', 'stable']  # last val_loss, val_bpb, verdict
    real_eval = [r for r in map(json.loads, open(f'{real}/log.jsonl')) if 'val_loss' in r][-1]
    assert rows['gpt 2026 tiny(2x32) synthetic'][-3:-1] == [f"{real_eval['val_loss']:.4f}", f"{real_eval['val_bpb']:.4f}"]
    assert rows['gpt 2026 tiny(2x32) synthetic'][-1] == 'undetermined'  # the real run
    hf = np.array([0.2345, 0.3])  # seeds 2026 and 2027 at lambda 0, the rest of their rows the same
    assert (f"gpt tiny(1x32) synthetic lambda=0 seeds [2026, 2027]: hf {hf.mean():.4g}±{hf.std(ddof=1):.2g}, "
            "H_pred 2±0") in out


def test_cli_rows_are_the_settings_that_differ(tmp_path, capsys):
    """A row per setting (every config key whose values differ, but seed, lambda and bookkeeping) and
    seed: three tokenizers on one text are three rows, and two seeds of one setting a cross-seed mean."""
    text = dict(data='/data/tinyshakespeare.txt', max_iters=600)
    for name, seed, hf, tok in [('char', 2026, 0.234, 'char'), ('bpe', 2026, 0.27, 'gpt2'),
                                ('compact', 2026, 0.061, 'gpt2-compact'), ('char2', 2027, 0.3, 'char')]:
        write_run(str(tmp_path / name), seed, 0.0, hf, tokenizer=tok, out_dir=name, device=name, **text)
    tables.main([str(tmp_path / name) for name in ('char', 'bpe', 'compact', 'char2')])
    out = capsys.readouterr().out
    table62 = out.split('\n\n')[0].splitlines()[2:-1]
    assert [line.split('  ')[0] for line in table62] == [
        'gpt 2026 tiny(1x32) tinyshakespeare.txt tokenizer=char', 'gpt 2026 tiny(1x32) tinyshakespeare.txt tokenizer=gpt2',
        'gpt 2026 tiny(1x32) tinyshakespeare.txt tokenizer=gpt2-compact', 'gpt 2027 tiny(1x32) tinyshakespeare.txt tokenizer=char']
    assert [line.split()[5] for line in table62] == ['23.4%', '27.0%', '6.1%', '30.0%']  # none is the mean of three
    hf = np.array([0.234, 0.3])
    seeds = out.split('\n\n')[2].splitlines()[1:]
    assert seeds == [f"gpt tiny(1x32) tinyshakespeare.txt tokenizer=char lambda=0 seeds [2026, 2027]: "
                     f"hf {hf.mean():.4g}±{hf.std(ddof=1):.2g}, H_pred 2±0, modes 3±0"]
    write_run(str(tmp_path / 'a' / 'input'), 2026, 0.0, 0.2, data='/a/input.txt')  # same basename: whole paths
    write_run(str(tmp_path / 'b' / 'input'), 2026, 0.0, 0.2, data='/b/input.txt')
    tables.main([str(tmp_path / 'a' / 'input'), str(tmp_path / 'b' / 'input')])
    rows = [line.split('  ')[0] for line in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == ['gpt 2026 tiny(1x32) /a/input.txt', 'gpt 2026 tiny(1x32) /b/input.txt']


def test_cli_help_prints_the_usage(capsys):
    r = subprocess.run([sys.executable, 'tables.py', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == tables.__doc__.strip() + '\n' and not r.stderr
    assert 'python tables.py --fig3 RUN_DIR...' in r.stdout
    with pytest.raises(SystemExit) as e:
        tables.main(['-h', 'anything'])
    assert e.value.code == 0 and capsys.readouterr().out == r.stdout


def test_cli_fig3_and_hf_of_any_text(tmp_path, capsys):
    write_run(str(tmp_path / 'a'), 2026, 0.0, 0.25)
    png = str(tmp_path / 'f.png')
    tables.main(['--fig3', str(tmp_path / 'a'), f'--out={png}', '--bins=4'])
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(png) > 0
    except ImportError:
        assert 'text table' in out and '30 steps' in out
    (tmp_path / 'corpus.txt').write_text('the the the cat dog\n')
    (tmp_path / 'text.txt').write_text('The cat.')
    tables.main([f'--corpus={tmp_path}/corpus.txt', f'--text={tmp_path}/text.txt'])
    assert '50.00% of 2 words (corpus: 60.00%' in capsys.readouterr().out
    for bad in (['--bogus'], [f'--corpus={tmp_path}/corpus.txt'], [], [str(tmp_path / 'missing')],
                ['--fraction=2', f'--corpus={tmp_path}/corpus.txt', f'--text={tmp_path}/text.txt'],
                [str(tmp_path)], ['--fig3', str(tmp_path / 'nowhere')]):
        with pytest.raises(SystemExit) as e:
            tables.main(bad)
        assert str(e.value).startswith('error:') and '\n' not in str(e.value)


def write_theorem_run(path, n, lam, fwd, train, mass, growth, verdict='stable', **more):
    write_run(path, 2026, lam, 0.3, n_sentences=n, max_iters=600, **more)
    report = json.load(open(f'{path}/report.json'))
    report['metrics'].update(forward_kl=fwd, reverse_kl=0.5, off_support=fwd / 10, model_entropy=3.0,
                             train_share=train, train_true_mass=mass)
    report['stability'] = dict(verdict=verdict, param_norm_growth=growth, grad_norm_slope=-growth,
                               update_norm_slope=growth - 1)
    json.dump(report, open(f'{path}/report.json', 'w'))


def test_cli_theorem55_table_and_stability_map(tmp_path, capsys):
    """--theorem55: a line per run, sorted by size then lambda, excess = train share - true mass;
    --map (text without matplotlib): Spearman's rank correlation of each Def. 3.1 component with
    each quality measure over the runs."""
    runs = [('b', 20000, 0.0, 0.2, 0.25, 0.05, 1.0), ('a', 2000, 0.05, 0.9, 0.60, 0.002, 1.2),
            ('c', 2000, 0.0, 0.1, 0.70, 0.002, 1.1), ('d', 20000, 0.2, 0.5, 0.01, 0.05, 1.3)]
    for name, n, lam, fwd, train, mass, growth in runs:
        write_theorem_run(str(tmp_path / name), n, lam, fwd, train, mass, growth, verdict='stable' if lam == 0 else 'not stable')
    dirs = [str(tmp_path / name) for name, *_ in runs]
    tables.main(['--theorem55'] + dirs)
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[:3] for line in lines] == [['2000', '0', '-'], ['2000', '0.05', 'both'],
                                                    ['20000', '0', '-'], ['20000', '0.2', 'both']]
    assert lines[0].split()[5:12] == ['0.100', '0.500', '1.0%', '3.000', '70.0%', '0.2%', '69.8%']
    assert lines[0].split()[-2:] == ['30.0%', 'stable'] and lines[3].split()[-3:] == ['30.0%', 'not', 'stable']
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        tables.main(['--map'] + dirs)
        out = capsys.readouterr().out
        rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()[2:]}
        # growth 1.0, 1.2, 1.1, 1.3 against forward KL 0.2, 0.9, 0.1, 0.5: ranks 0 2 1 3 vs 1 3 0 2
        assert rows['parameter-norm growth (cond. 1)'][0] == f"{np.corrcoef([0, 2, 1, 3], [1, 3, 0, 2])[0, 1]:+.2f}"
        assert rows['gradient-norm trend (cond. 2)'][0] == f"{np.corrcoef([3, 1, 2, 0], [1, 3, 0, 2])[0, 1]:+.2f}"
    with pytest.raises(SystemExit) as e:
        tables.main(['--map', dirs[0]])
    assert str(e.value).startswith('error: the map needs at least 2')


def test_theorem55_other_names_a_runs_unusual_settings_and_ties_share_a_rank(tmp_path, capsys):
    """'other' shows a setting only where it differs from the value most runs share; Spearman gives
    tied values their mean rank, so the map does not depend on the order of the runs."""
    for name, clip in (('a', 1.0), ('b', 1.0), ('c', 0.1)):
        write_theorem_run(str(tmp_path / name), 2000, 0.0, 0.1, 0.5, 0.01, 1.0, grad_clip=clip)
    tables.main(['--theorem55'] + [str(tmp_path / name) for name in 'abc'])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[-1] for line in lines] == ['stable', 'stable', 'grad_clip=0.1']
    tables.main(['--theorem55', str(tmp_path / 'c'), str(tmp_path / 'a')])  # a tie: the first run's value is usual
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()[2:]] == ['stable', 'grad_clip=1.0']
    x, y = np.array([0.0, 0.0, 1.0, 1.0]), np.array([1.0, 0.0, 2.0, 3.0])
    assert tables.spearman(x, y) == np.corrcoef([0.5, 0.5, 2.5, 2.5], [1, 0, 2, 3])[0, 1]  # the same ranks, the same corrcoef
    assert tables.spearman(x[::-1], y[::-1]) == tables.spearman(x, y)


# ---------------------------------------------------------------- Theorem 5.5: distribution metrics

def test_kl_estimates_by_hand():
    """Two sentences from p, four from q (one off the support): each estimate as its formula says."""
    out = metrics.kl_estimates(np.array([-2.0, -4.0]), np.array([-3.0, -4.5]), np.array([3.0, 5.0]),
                               np.array([-1.0, -2.0, -3.0, -6.0]), np.array([-2.0, -2.5, -math.inf, -5.0]),
                               np.array([2.0, 3.0, 4.0, 5.0]))
    # float64 on both sides, a few roundings in other orders (~1e-16): rel 1e-12
    assert out['forward_kl'] == pytest.approx((1.0 + 0.5) / 2 / 4, rel=1e-12)  # mean(log p - log q) / mean tokens
    assert out['off_support'] == 0.25
    # E_{q|S}[log q - log p] = (1 + 0.5 - 1) / 3, log q(S) = log 0.75, per token of S: mean 10 / 3
    assert out['reverse_kl'] == pytest.approx(((1 + 0.5 - 1) / 3 - math.log(0.75)) / (10 / 3), rel=1e-12)
    assert out['model_entropy'] == pytest.approx(12 / 14, rel=1e-12)
    assert out['off_support_se'] == pytest.approx(math.sqrt(0.25 * 0.75 / 4), rel=1e-12)
    r = 1.5 / 8  # forward's ratio, and its delta-method standard error
    assert out['forward_kl_se'] == pytest.approx(np.std([1 - r * 3, 0.5 - r * 5], ddof=1) / math.sqrt(2) / 4, rel=1e-12)


def test_true_logprobs_of_true_sentences_are_finite_and_exact(corpus):
    """Sentences drawn from p are all on its support (off_support 0 for them), with corpus.sentence_logprob's values."""
    tok = data.WordTokenizer(corpus.words)
    sents = corpus.sample_sentences(300, np.random.default_rng(0))
    ids = [i for s in sents for i in [tok.index[w] for w in s] + [tok.eot]]
    lp = data.true_logprobs(corpus, tok, *data.split_sentences(ids, tok.eot))
    assert len(lp) == 300 and np.isfinite(lp).all()
    assert lp == pytest.approx([corpus.sentence_logprob(s) for s in sents], abs=1e-12)  # fp64, <= 9 terms |.| < 26: 2.5e-14
    assert data.true_logprobs(corpus, tok, *data.split_sentences([0, 0, 0, 0, tok.eot], tok.eot))[0] == -math.inf


@pytest.fixture(scope='module')
def small():
    d = data.load_data('synthetic', 'word', n_sentences=2000)
    torch.manual_seed(0)
    return d, GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=d.tok.vocab_size))


def test_distribution_metrics_on_a_random_model(small):
    """Every estimate finite with its standard error; a fresh model never closes a sentence of the truth's."""
    d, m = small
    out = metrics.distribution_metrics(m, d.tok, d.corpus, d.train, d.val, n=40)
    for k in ('forward_kl', 'model_entropy', 'train_true_mass', 'val_gap'):
        assert math.isfinite(out[k]), k
    assert 0 < out['forward_kl_se'] < out['forward_kl']  # KL of a random model: nats per token, known to 1e-2
    assert math.isfinite(out['model_entropy_se']) and out['n_distribution_samples'] == 40
    # a random model's entropy is near log V per token (it cannot exceed it)
    assert out['model_entropy'] <= math.log(d.tok.vocab_size) + 3 * out['model_entropy_se']
    assert out['off_support'] == 1.0 and out['reverse_kl'] is None and out['train_share'] == 0.0


def test_distribution_metrics_say_why_a_short_window_cannot_score_a_sentence(small):
    """A window shorter than the longest sentence: no estimate (one would be of sentences cut open), a reason instead."""
    d, _ = small
    longest = max(len(t) + 1 for t in d.corpus.templates)
    short = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=longest - 1, vocab_size=d.tok.vocab_size))
    out = metrics.distribution_metrics(short, d.tok, d.corpus, d.train, d.val, n=4)
    assert out == {'distribution_skipped': f"block_size {longest - 1} < {longest}, the longest sentence's tokens"}
    assert tables.summary(dict(hf_proportion=0.1, corpus_hf_proportion=0.1, **out)).endswith(out['distribution_skipped'])
    fits = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=longest, vocab_size=d.tok.vocab_size))
    assert math.isfinite(metrics.distribution_metrics(fits, d.tok, d.corpus, d.train, d.val, n=4)['forward_kl'])


def test_train_true_mass_matches_the_share_of_fresh_sentences_in_training(small):
    """train_true_mass (exact) against its estimate: the share of 20,000 fresh true sentences found
    in the training split, a binomial proportion, within 4 standard errors (false alarm ~6e-5)."""
    d, m = small
    mass = metrics.distribution_metrics(m, d.tok, d.corpus, d.train, d.val, n=2)['train_true_mass']
    train_text = d.tok.decode(d.train.tolist()).split('\n')[:-1]  # the closed sentences of the training split
    seen = set(train_text)
    fresh = d.corpus.sample_sentences(20_000, np.random.default_rng(1))
    share = np.mean([' '.join(s) in seen for s in fresh])
    assert 0.2 < mass < 0.8  # a small corpus: its training sentences hold a good part of p, but not all
    assert abs(share - mass) < 4 * math.sqrt(mass * (1 - mass) / 20_000)
