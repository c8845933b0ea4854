"""PSU's data channel (stabilize.FedBack: the model's own text fed back into its batches) and the exact
metrics of Theorem 5.5 at every eval: lambda 0 is no PSU bit for bit, the fed-back rows are the model's
own text, a stopped run resumes with its stream, the logged trajectory is the end of run's metrics."""
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import data
import train
from conftest import TINY, run, steps
from metrics import EXACT
from model import GPT, GPTConfig
from stabilize import FedBack


def untimed(log):
    return [{k: v for k, v in r.items() if k not in ('tok_per_s', 'eta_s')} for r in log]


def test_lambda_zero_is_no_psu_bit_for_bit(tmp_path):
    """--psu_channels=data at lambda 0 never generates: the log and the samples are the plain run's."""
    plain = untimed(run(tmp_path / 'plain', iters=12))
    fed = untimed(run(tmp_path / 'fed', '--psu_lambda=0.0', '--psu_channels=both+data', iters=12))
    assert fed == plain and 'psu_generated' not in fed[-1]
    assert (tmp_path / 'fed' / 'samples.txt').read_text() == (tmp_path / 'plain' / 'samples.txt').read_text()


def one_sentence_model(sentence, vocab_size):
    """A GPT that can only write `sentence` (token ids, ending in its end-of-text), over and over:
    its next token is a fixed function of the current one (hidden = the current token, one-hot)."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=vocab_size))
    successor = torch.zeros(vocab_size, vocab_size)
    for a, b in zip(sentence, sentence[1:] + sentence[:1]):
        successor[a, b] = 100.0  # after a comes b, with probability 1 - e^-100 (V e^-100: below 1e-40)
    model.hidden = lambda idx, caches=None: F.one_hot(idx, vocab_size).float()
    model.lm_head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
    model.lm_head.weight.data = successor.T.contiguous()  # logits = h @ successor
    return model


def test_fed_back_rows_are_the_models_own_text():
    """The model writes one sentence only: every fed-back window is that sentence, repeated, as a
    window of the corpus is a stretch of its stream; and batch() puts them in the last rows."""
    d = data.load_data('synthetic', 'word', n_sentences=200)
    sentence = [d.tok.index[w] for w in 'zo rimumo kavute'.split()] + [d.tok.eot]
    c = {**train.DEFAULTS, 'block_size': 16, 'batch_size': 8, 'psu_data_every': 3, 'warmup_iters': 2,
         'device': 'cpu'}
    fed = FedBack(0.5, c, d.tok, 0, torch.autocast('cpu', enabled=False))
    model = one_sentence_model(sentence, d.tok.vocab_size)
    fed.refresh(model, 1)  # before the warm-up ends: nothing yet
    assert fed.stream is None and fed.fed_rows == 0
    fed.refresh(model, 2)
    assert fed.fed_rows == 4 and fed.generated == 13  # ceil(3 steps * 4 rows * 17 / 16) rows
    cycle = [d.tok.eot] + sentence * 10  # the stream: end-of-text, then the sentence, over and over
    x, y = train.batch(d.train, c, d.tok, torch.Generator().manual_seed(0), 'cpu', fed)
    assert x.shape == y.shape == (8, 16)
    for row_x, row_y in zip(x[4:].tolist(), y[4:].tolist()):  # 17 tokens: a stretch of the cycle
        assert any(cycle[i:i + 17] == row_x + row_y[-1:] for i in range(len(sentence))), row_x
    assert any(row != x[4].tolist() for row in x[:4].tolist())  # the corpus rows stay the corpus's
    whole = FedBack(1.0, c, d.tok, 0, torch.autocast('cpu', enabled=False))  # lambda 1: all fed back
    whole.refresh(model, 2)
    x, _ = train.batch(d.train, c, d.tok, torch.Generator().manual_seed(0), 'cpu', whole)
    assert x.shape == (8, 16) and all(t in sentence for t in x.flatten().tolist())


def test_stopped_run_with_the_data_channel_resumes_exactly(tmp_path, monkeypatch):
    """The stream is checkpointed (per rank): a run stopped between two refreshes and resumed logs the
    unbroken run's numbers, the fed-back rows' losses included."""
    flags = ['--psu_lambda=0.5', '--psu_channels=data', '--psu_data_every=4', '--warmup_iters=2']
    reference = run(tmp_path / 'reference', *flags, iters=12)
    assert steps(reference)[-1]['psu_fed_rows'] == 4 and steps(reference)[-1]['psu_generated'] > 0
    out = tmp_path / 'stopped'
    real_step, calls = train.train_step, []

    def step_then_sigint(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 8:  # step 7: after the refreshes at 2 and 6
            os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(train, 'train_step', step_then_sigint)
    with pytest.raises(SystemExit) as e:
        run(out, *flags, iters=12)
    assert e.value.code == 130
    monkeypatch.undo()
    assert untimed(run(out, *flags, '--init_from=resume', iters=12)) == untimed(reference)


def test_trajectory_equals_the_end_of_run_metrics(tmp_path):
    """At the last eval the logged exact metrics are the report's when both use as many sentences
    (the same seed and decoder): the trajectory is the end-of-run measurement, repeated."""
    log = run(tmp_path / 'run', '--eval_dist_samples=50', '--n_sentences=2000', '--eval_interval=5',
              iters=10)
    report = json.load(open(tmp_path / 'run' / 'report.json'))['metrics']
    evals = [r for r in log if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 5, 10] and all(k in r for r in evals for k in EXACT)
    assert {k: evals[-1][k] for k in EXACT} == {k: report[k] for k in EXACT}
    assert 0 <= report['tail_lost'] <= 1 and 0 < report['tail_lost_by_chance'] < 1


@pytest.mark.parametrize('flags, line', [
    (['--psu_channels=data+stats'], "error: psu_channels='data+stats' is not one of stats | params | both | data"),
    (['--psu_data_every=0'], "error: psu_data_every=0 is not an int >= 1"),
    (['--eval_dist_samples=-1'], "error: eval_dist_samples=-1 is not an int in [0, 1e9]"),
])
def test_bad_values_of_the_new_keys_are_one_line(flags, line, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main([f'--out_dir={tmp_path / "run"}', *TINY, *flags])
    assert str(e.value.code).startswith(line), e.value.code
    assert not (tmp_path / 'run').exists()


def test_data_channel_refuses_fsdp():
    with pytest.raises(SystemExit) as e:
        train.get_config(['--psu_channels=data', '--fsdp=True', '--device=cpu'])
    assert e.value.code.startswith("error: psu_channels='data' feeds back the model's own text")


def test_tables_draw_the_trajectory_and_print_the_readings(tmp_path, monkeypatch, capsys):
    """tables.py --trajectory: a PNG with matplotlib, else a text table per exact metric (the eval
    steps and values); --readings: one line per reading x lambda with its seeds' count."""
    import sys
    import tables
    run(tmp_path / 'run', '--eval_dist_samples=20', '--n_sentences=2000', '--eval_interval=5',
        '--psu_lambda=0.2', '--psu_channels=data', '--warmup_iters=2', '--psu_data_every=3', iters=10)
    capsys.readouterr()
    tables.main(['--readings', str(tmp_path / 'run')])
    out = capsys.readouterr().out
    line = out.splitlines()[-1]
    assert line.startswith('synthetic gpt data (t=1)') and line.split()[4:6] == ['0.2', '1'], out
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # as where matplotlib is not installed
    tables.main(['--trajectory', str(tmp_path / 'run')])
    text = capsys.readouterr().out
    assert all(f'{k}:' in text for k in EXACT) and ' 0:' in text and ' 10:' in text, text
    monkeypatch.undo()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    tables.main(['--trajectory', str(tmp_path / 'run'), f'--out={tmp_path / "t.png"}'])
    assert (tmp_path / 't.png').stat().st_size > 10_000
